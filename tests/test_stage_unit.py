"""The stage as a unit (decision 0016), without the stack: every stage declares its
parameters, WebLog topic, context keys, QA metrics and WebLog tables; recipes and
overrides are checked against the declarations; the context's keys are declared; every
score names a metric its stage declares; the modules import without cycles."""
from __future__ import annotations

import ast
import os

import numpy as np
import pytest
from astropy.stats import mad_std

from almapipe import recipes
from almapipe.heuristics.robust import robust_rms, robust_sigma
from almapipe.stages.base import CONTEXT, REGISTRY, TOPICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("almapipe", "gateway", "services")


# ------------------------------------------------------------------ parameters

def test_every_recipe_validates_against_the_declarations():
    for name in recipes.available():
        recipe = recipes.load(name)            # validate() checks every stage's parameters
        for st in recipe["stages"]:
            spec = REGISTRY[st["stage"]]
            assert spec.topic in TOPICS, st["stage"]
            assert spec.fn.__doc__ or spec.params, st["stage"]


@pytest.mark.parametrize("override, words", [
    ({"bandpass.solintt": '"inf"'}, ["bandpass", "solintt", "allowed:", "solint"]),
    ({"gaincal.nosuchparam": "1"}, ["gaincal", "nosuchparam", "allowed:", "calmode"]),
    ({"makeimages.cube": '{"niter": "lots"}'}, ["makeimages.cube.niter", "lots", "int"]),
    ({"makeimages.cube": '{"nitre": 10}'}, ["makeimages.cube", "nitre", "niter"]),
    # the gridder (ducc0) takes even sizes only
    ({"makeimages.cube": '{"imsize": 127}'}, ["makeimages.cube.imsize", "127", "a multiple of 2"]),
    ({"bandpass.solint": "often"}, ["bandpass.solint", "often", "int|scan|inf"]),
    ({"flagdata.edge_fraction": "0.7"}, ["flagdata.edge_fraction", "0.7", "[0, 0.49]"]),
    ({"gaincal.calmode": '"x"'}, ["gaincal.calmode", "ap, p, a"]),
    ({"uvcontsub.fitorder": "true"}, ["uvcontsub.fitorder", "int"]),
    ({"weblog.failure": "{}"}, ["weblog", "failure"]),           # set by the pipeline only
])
def test_a_wrong_parameter_is_refused_with_stage_parameter_and_what_is_allowed(override, words):
    with pytest.raises(recipes.RecipeError) as e:
        recipes.apply_overrides(recipes.load("ngc5921"), override)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_recipe_document_is_checked_too():
    doc = {"stages": [{"stage": "importdata", "params": {"nmae": "x"}}]}
    with pytest.raises(recipes.RecipeError, match="importdata: unknown parameter 'nmae'"):
        recipes.validate(doc)


def test_overrides_that_tests_and_recipes_use_still_validate():
    recipes.apply_overrides(recipes.load("alma_calimage"), {
        "flagdata.edge_fraction": "0.05", "makeimages.calibrators": "false", "bandpass.solint": "30s",
        "makeimages.cube": '{"imsize": 128, "cell_arcsec": 20, "niter": 100}', "gaincal.solint": "60",
        "exportdata.requested_rms_jy": "0.001", "exportdata.requested_beam_arcsec": "[0.1, 10]",
        "importdata.field_roles": '{"3C286": "FLUX,BANDPASS"}', "refant.refant": "DA41"})


def test_a_stage_sees_every_declared_parameter_with_its_default():
    spec = REGISTRY["makeimages"]
    full = spec.with_defaults({"cube": {"niter": 10}})
    assert full["cube"]["niter"] == 10 and full["cube"]["robust"] == 0.5 and full["calibrator"]["niter"] == 1000
    assert full["target_cube"] is True and full["cube_chunks"] is None      # none: by memory (cube_piece_count)
    # the registered function fills them in itself, called by the worker or directly
    from almapipe.stages.base import QA, Param, stage
    seen = {}

    @stage("_probe", service="x", params=(Param("a", int, 3), Param("b", str, "")), topic="Products")
    def probe(ctx, params, io):
        seen.update(params)
        return QA()
    try:
        probe({}, {"b": "x"}, None)
        assert seen == {"a": 3, "b": "x"}
    finally:
        REGISTRY.pop("_probe")


def test_describe_prints_a_stages_parameters():
    text = recipes.describe("bandpass")
    for word in ("solint", "phaseup_solint", "minsnr", "default 3.0", "reads:", "writes:", "Calibration",
                 "QA metrics:", "bandpass.antenna_shape: antennas whose bandpass amplitude shape"):
        assert word in text, word
    assert "niter" in recipes.describe("makeimages")
    assert "parameters: none" in recipes.describe("weblog")          # failure: the pipeline's own
    with pytest.raises(recipes.RecipeError, match="unknown stage"):
        recipes.describe("nosuch")


def test_cli_refuses_a_bad_override_before_starting_anything(capsys):
    from almapipe.cli import main
    assert main(["run", "--param", "gaincal.nosuchparam=1"]) == 2
    err = capsys.readouterr().err
    assert "gaincal" in err and "nosuchparam" in err and "allowed" in err
    assert main(["recipes", "--describe", "gaincal"]) == 0
    assert "calmode" in capsys.readouterr().out


# ------------------------------------------------------------------ context schema

def _context_writes(tree) -> dict:
    """Context keys written in each function of a module: ctx["k"] = ..., ctx["k"][...] = ...,
    ctx["k"].append/extend/update(...), ctx.update(k=...), ctx.setdefault("k", ...)."""
    out = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        keys = set()
        for n in ast.walk(fn):
            target = None
            if isinstance(n, (ast.Assign, ast.AugAssign)):
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    while isinstance(t, ast.Subscript) and isinstance(t.value, ast.Subscript):
                        t = t.value
                    target = t
                    if _is_ctx_key(target):
                        keys.add(target.slice.value)
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                owner = n.func.value
                if _is_ctx_key(owner) and n.func.attr in ("append", "extend", "update", "setdefault"):
                    keys.add(owner.slice.value)
                if isinstance(owner, ast.Name) and owner.id == "ctx":
                    if n.func.attr == "update":
                        keys |= {k.arg for k in n.keywords if k.arg}
                    elif n.func.attr == "setdefault" and n.args and isinstance(n.args[0], ast.Constant):
                        keys.add(n.args[0].value)
        out[fn.name] = keys
    return out


def _is_ctx_key(node) -> bool:
    return (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "ctx"
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str))


# what a stage reads: ctx["k"] and ctx.get("k") in its body and in the almapipe functions it
# passes ctx to, transitively (same module, stages.base, heuristics, report)
_MUTATORS = ("append", "extend", "update", "setdefault")


def _module_file(module: str) -> str | None:
    base = os.path.join(ROOT, *module.split("."))
    for p in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(p):
            return p
    return None


def _absolute(path: str, node: ast.ImportFrom) -> str:
    """The dotted module an ImportFrom in the module at path names."""
    pkg = os.path.relpath(os.path.dirname(path), ROOT).split(os.sep)
    if node.level:
        pkg = pkg[:len(pkg) - (node.level - 1)]
        return ".".join(pkg + ([node.module] if node.module else []))
    return node.module or ""


class _Module:
    def __init__(self, path: str):
        with open(path) as f:
            self.tree = ast.parse(f.read())
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.names, self.modules = {}, {}      # imported function -> (module, name); alias -> module
        for n in ast.walk(self.tree):
            if isinstance(n, ast.ImportFrom):
                mod = _absolute(path, n)
                if not mod.startswith("almapipe"):
                    continue
                for a in n.names:
                    sub = f"{mod}.{a.name}"
                    if _module_file(sub):
                        self.modules[a.asname or a.name] = sub
                    else:
                        self.names[a.asname or a.name] = (mod, a.name)


_MODULES: dict = {}


def _parsed_module(name: str):
    if name not in _MODULES:
        path = _module_file(name)
        _MODULES[name] = _Module(path) if path else None
    return _MODULES[name]


def _direct_reads(fn) -> set:
    """ctx["k"] and ctx.get("k") in fn, except writes into a key (ctx["k"][...] = v,
    ctx["k"].append(v)) and reads of a key after fn set it itself (ctx["k"] = v)."""
    parents = {}
    for n in ast.walk(fn):
        for c in ast.iter_child_nodes(n):
            parents[c] = n
    set_at = {}
    for n in ast.walk(fn):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                if _is_ctx_key(t):
                    set_at[t.slice.value] = min(set_at.get(t.slice.value, n.lineno), n.lineno)
    keys = set()
    for n in ast.walk(fn):
        if (isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "ctx"
                and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str)
                and isinstance(n.ctx, ast.Load)):
            p = parents.get(n)
            # ctx["k"][...] = v and ctx["k"].append(v) write into the key; they do not read it
            if isinstance(p, ast.Subscript) and p.value is n and not isinstance(p.ctx, ast.Load):
                continue
            if isinstance(p, ast.Attribute) and p.attr in _MUTATORS and isinstance(parents.get(p), ast.Call):
                continue
            if n.lineno > set_at.get(n.slice.value, n.lineno):
                continue
            keys.add(n.slice.value)
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get"
              and isinstance(n.func.value, ast.Name) and n.func.value.id == "ctx"
              and n.args and isinstance(n.args[0], ast.Constant)):
            keys.add(n.args[0].value)
    return keys


def _callees(mod: _Module, modname: str, fn) -> list:
    """(module, function) of the calls in fn that pass ctx on."""
    out = []
    for n in ast.walk(fn):
        if not isinstance(n, ast.Call):
            continue
        args = list(n.args) + [k.value for k in n.keywords]
        if not any(isinstance(a, ast.Name) and a.id == "ctx" for a in args):
            continue
        f = n.func
        if isinstance(f, ast.Name):
            if f.id in mod.functions:
                out.append((modname, f.id))
            elif f.id in mod.names:
                out.append(mod.names[f.id])
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in mod.modules:
            out.append((mod.modules[f.value.id], f.attr))
    return out


def _context_reads(modname: str, fname: str, _seen=None) -> set:
    """Context keys function fname of module modname reads, itself and through the
    almapipe functions it passes ctx to (transitively)."""
    seen = _seen if _seen is not None else set()
    if (modname, fname) in seen:
        return set()
    seen.add((modname, fname))
    mod = _parsed_module(modname)
    if mod is None or fname not in mod.functions:
        return set()
    fn = mod.functions[fname]
    keys = _direct_reads(fn)
    for callee in _callees(mod, modname, fn):
        keys |= _context_reads(*callee, _seen=seen)
    return keys


def test_every_context_key_the_code_writes_is_declared():
    from almapipe.stages.base import new_context
    fresh = new_context("r", {}, "k", {})
    assert all(isinstance(v, CONTEXT[k][0]) for k, v in fresh.items() if k in CONTEXT)
    undeclared = set(fresh) - set(CONTEXT)
    for path in _modules():
        with open(path) as f:
            for fn, keys in _context_writes(ast.parse(f.read())).items():
                undeclared |= {f"{os.path.relpath(path, ROOT)}:{fn}:{k}" for k in keys - set(CONTEXT)}
    assert not undeclared, sorted(undeclared)


def test_each_stage_declares_what_its_body_writes():
    """The keys a stage function writes itself (not through helpers) are among its
    declared writes; every declared key is in CONTEXT (the decorator checks that)."""
    stage_dir = os.path.join(ROOT, "almapipe", "stages")
    missing = []
    for name in os.listdir(stage_dir):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(stage_dir, name)) as f:
            writes = _context_writes(ast.parse(f.read()))
        for spec in REGISTRY.values():
            if spec.fn.__module__ == f"almapipe.stages.{name[:-3]}":
                body = writes.get(spec.fn.__name__, set())
                missing += [f"{spec.name}: {k}" for k in body - set(spec.writes)]
    assert not missing, missing


def test_each_stage_declares_what_it_reads():
    """The context keys a stage reads, in its body and in the almapipe functions it
    passes ctx to (its module's helpers, stages.base, heuristics, the report code; for
    the weblog stage also the stages' tables and triage entries it renders), are
    among its declared reads, and are keys of CONTEXT."""
    shown = set()              # what the WebLog's pages show of each stage's declarations
    for spec in REGISTRY.values():
        for fn in (spec.tables, spec.outliers, spec.flag_reasons):
            if fn:
                shown |= _context_reads(fn.__module__, fn.__name__)
    missing, unknown = [], []
    for spec in REGISTRY.values():
        reads = _context_reads(spec.fn.__module__, spec.fn.__name__) | (shown if spec.name == "weblog" else set())
        missing += [f"{spec.name}: {k}" for k in sorted(reads - set(spec.reads))]
        unknown += [f"{spec.name}: {k}" for k in sorted(reads - set(CONTEXT))]
    assert not unknown, unknown
    assert not missing, missing


def test_the_read_finder_follows_helpers_and_skips_writes():
    tree = ast.parse('''
def helper(ctx):
    return ctx.get("fields"), ctx["observation"]["spws"]
def body(ctx, params, io):
    ctx["flags"]["x"] = 1
    ctx["callibrary"].append(2)
    ctx["refant"] = {"ranked": []}
    print(ctx["refant"]["ranked"], ctx["partitions"])
    helper(ctx)
''')
    functions = {n.name: n for n in tree.body}
    assert _direct_reads(functions["body"]) == {"partitions"}
    assert _direct_reads(functions["helper"]) == {"fields", "observation"}
    # through the module's imports: reporting.weblog passes ctx to report.weblog.render
    assert {"fluxscale", "ms_name", "recipe"} <= _context_reads("almapipe.stages.reporting", "weblog")


# ------------------------------------------------------------------ imports

def _modules():
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(d, f)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict:
    """module -> the project modules it imports, at the top or inside a function (a lazy
    import is an edge too: it only hides a cycle until that function runs)."""
    paths = {_module_name(p): p for p in _modules()}
    graph = {}
    for mod, path in paths.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read())
        edges = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(max(n.level - 1, 0)):
                    base = base.rpartition(".")[0]
                prefix = (base + ("." + n.module if n.module else "")) if n.level else n.module
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg
                names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in paths else prefix for a in n.names]
            else:
                continue
            for name in names:
                while name and name not in paths:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    edges.add(name)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict) -> list:
    """One import cycle as [a, b, ..., a], or []."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_no_import_cycles():
    graph = import_graph()
    assert "almapipe.stages.calibration" in graph and len(graph) > 50
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_heuristics_and_kernels_import_no_stage_module():
    """The heuristics (pure functions: flag templates, outlier tests, image sizes,
    solution intervals, flux consistency, ...) and the kernels of calibration, imaging
    and msio never reach into a stage module; a stage module imports them."""
    graph = import_graph()
    for mod, edges in graph.items():
        if mod.startswith(("almapipe.heuristics", "almapipe.calibration", "almapipe.imaging", "almapipe.msio",
                           "almapipe.simulate")):
            assert not [e for e in edges if e.startswith("almapipe.stages")], (mod, edges)


def test_the_cycle_finder_finds_a_lazy_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


# ------------------------------------------------------------------ robust statistics

def test_robust_statistics_are_astropys_mad_std():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2.0, 20001)
    x[:100] = 1e6                                  # outliers the MAD ignores
    assert robust_sigma(x) == pytest.approx(mad_std(x)) and robust_sigma(x) == pytest.approx(2.0, rel=0.03)
    img = np.where(np.arange(x.size) % 7 == 0, np.nan, x)
    assert robust_rms(img) == pytest.approx(mad_std(img[np.isfinite(img)]))
    assert robust_sigma(np.ones(5), floor=0.1) == 0.1 and robust_rms(np.array([np.nan])) == 0.0
    # ours is numpy's (astropy.stats is not imported by the imager): along an axis too, as findcont takes it
    from almapipe.heuristics import robust
    rows = rng.normal(0, 1, (7, 301)).astype(np.float32)
    np.testing.assert_allclose(robust.mad_std(rows, axis=1), mad_std(rows, axis=1), rtol=1e-6)


def test_bin_outliers_are_numpys_nanmedian_and_astropys_mad_std_thresholds():
    """The compiled bin_outliers (flagtargets' per-channel test in uv bins) flags what
    numpy's nanmedian and astropy's mad_std(ignore_nan=True) of each bin's sampled rows
    give: even and odd counts, ties, flagged and NaN samples, a column without a value,
    bins with too few samples, rows in no bin."""
    import warnings
    from almapipe.heuristics.kernels import bin_outliers

    def reference(amp, ok, bins, nbin, nhi, nlo, min_samples, stats_rows):
        out = np.zeros(amp.shape, bool)
        for b in range(nbin):
            r = bins == b
            if not r.any():
                continue
            a = np.where(ok[r], amp[r], np.nan)
            n = ok[r].sum(axis=0)
            sample = a[::max(1, -(-len(a) // stats_rows))]
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                med = np.nanmedian(sample, axis=0)
                sig = mad_std(sample, axis=0, ignore_nan=True).astype(np.float32)
            usable = (n >= min_samples) & (sig > 0)
            out[r] = ((a > med + nhi * sig) | (a < med - nlo * sig)) & usable[None]
        return out

    rng = np.random.default_rng(4)
    for nrow, nchan, ncorr, stats_rows in ((5001, 6, 2, 20000), (900, 3, 4, 101), (37, 2, 1, 5)):
        amp = rng.rayleigh(1.0, (nrow, nchan, ncorr)).astype(np.float32)
        amp[rng.random(amp.shape) < 0.001] = 30.0                # outliers
        amp[rng.random(amp.shape) < 0.001] = 1e-4
        amp[:, 1] = np.round(amp[:, 1], 1)                         # ties
        amp[rng.random(amp.shape) < 0.01] = np.nan                 # unflagged NaN
        ok = rng.random(amp.shape) > 0.2
        ok[:, 0, 0] = False                                        # a column without a value
        bins = rng.integers(-1, 5, nrow)                           # -1: in no bin
        for nhi, nlo, min_samples in ((3.0, 3.0, 20), (2.0, 1.0, 1), (12.0, 13.0, 2000)):
            want = reference(amp, ok, bins, 5, nhi, nlo, min_samples, stats_rows)
            got = bin_outliers(amp, ok, bins, 5, nhi, nlo, min_samples, stats_rows)
            assert (got == want).all(), (nrow, nhi, nlo, min_samples, int((got != want).sum()))
            if nrow > 100 and min_samples < 2000 and nhi == 3.0:
                assert want.any()


def test_uv_outliers_of_a_long_eb_take_their_statistics_from_a_sample_of_rows(monkeypatch):
    """flagtargets' bins of 60,000 rows: thresholds from 20,000 evenly spaced rows flag
    the injected outliers, and only them, as thresholds from every row do."""
    from almapipe.heuristics import outliers
    rng = np.random.default_rng(6)
    nrow = 600000
    amp = rng.rayleigh(1.0, (nrow, 4, 2)).astype(np.float32)
    bad = np.zeros(amp.shape, bool)
    bad[rng.choice(nrow, 40, replace=False), rng.integers(0, 4, 40), rng.integers(0, 2, 40)] = True
    amp[bad] = 40.0
    flag = np.zeros(amp.shape, bool)
    uvdist = rng.uniform(10, 1000, nrow)
    got = outliers.uv_outliers(amp, flag, uvdist)
    monkeypatch.setattr(outliers, "STATS_ROWS", nrow)
    assert (got == bad).all() and (outliers.uv_outliers(amp, flag, uvdist) == got).all()


def test_a_cubes_automatic_piece_count_keeps_each_piece_within_the_budget(monkeypatch):
    """makeimages' automatic cube_chunks (cube_piece_count): the fewest channel ranges
    whose visibilities, flags, weights and uvw fit the budget (and no fewer); a small cube
    is one piece, an FDM spw of 2 million rows 296 pieces of 13 channels at 1 GiB;
    ALMAPIPE_CUBE_PIECE_MB sets the budget."""
    from almapipe.stages.imaging import CUBE_PIECE_MB, cube_piece_budget, cube_piece_count

    def piece_bytes(nrow, nchan, ncorr, n):
        return nrow * ncorr * 9 * -(-nchan // n) + nrow * (ncorr * 4 + 24)
    assert cube_piece_count(24000, 1024, 2, 1 << 30) == 1
    for nrow, nchan, ncorr, budget in ((480000, 128, 2, 1 << 30), (2_000_000, 3840, 4, 1 << 30),
                                       (100000, 1024, 2, 64 << 20), (10**7, 8, 2, 256 << 20)):
        n = cube_piece_count(nrow, nchan, ncorr, budget)
        assert 1 <= n <= nchan
        assert piece_bytes(nrow, nchan, ncorr, n) <= budget or n == nchan
        if n > 1:                     # the fewest: one piece fewer would not fit
            assert piece_bytes(nrow, nchan, ncorr, n - 1) > budget
    assert cube_piece_count(2_000_000, 3840, 4, 1 << 30) == 296
    assert cube_piece_count(10**8, 16, 2, 1 << 30) == 16       # not even one channel fits: one a piece
    assert cube_piece_budget() == CUBE_PIECE_MB * 2**20
    monkeypatch.setenv("ALMAPIPE_CUBE_PIECE_MB", "256")
    assert cube_piece_budget() == 256 * 2**20
    assert cube_piece_count(480000, 128, 2) == 5


def test_a_cubes_pieces_share_its_channels_with_data_not_its_channels():
    """chunk_masks: ranges of whole planes with as many channels with data each, so that
    a flagged stretch (the first 240 of the 960 channels imaged here) is not one piece's
    whole share; without flags, or where a balanced range would span more channels than
    both a piece's memory budget and the widest equal range, equal ranges (np.array_split
    of the planes, as before balancing); binned cubes (nbin 2) cut between planes, a
    selection with gaps binned run by run, the channels that fill no plane left out."""
    from almapipe.imaging.imager import cube_planes, per_plane
    from almapipe.imaging.uvcontsub import parse_channels
    from almapipe.imaging.uvcontsub import format_channels
    from almapipe.stages.imaging import chunk_masks
    sel = np.zeros(3840, bool)
    sel[:960] = True
    has = np.ones(3840, bool)
    has[:240] = False
    spans = lambda masks: [format_channels(m) for m in masks]      # noqa: E731
    assert spans(chunk_masks(sel, 4)) == ["0~239", "240~479", "480~719", "720~959"]
    assert spans(chunk_masks(sel, 4, has_data=has)) == ["0~416", "417~597", "598~778", "779~959"]
    assert spans(chunk_masks(sel, 2, has_data=has)) == ["0~597", "598~959"]
    assert spans(chunk_masks(sel, 4, has_data=has, most=300)) == spans(chunk_masks(sel, 4))
    assert spans(chunk_masks(sel, 4, 2, has)) == ["0~417", "418~597", "598~779", "780~959"]
    assert spans(chunk_masks(sel, 4, has_data=has, most=400)) == spans(chunk_masks(sel, 4))   # 417 > 400
    assert spans(chunk_masks(np.ones(7, bool), 3)) == ["0~2", "3~4", "5~6"]
    assert spans(chunk_masks(np.ones(10, bool), 4)) == ["0~2", "3~5", "6~7", "8~9"]
    assert spans(chunk_masks(np.ones(3, bool), 5)) == ["0", "1", "2"]
    gaps = parse_channels("0~10;20~30", 40)
    assert [list(p) for p in cube_planes(np.flatnonzero(gaps), 2)][4:6] == [[8, 9], [20, 21]]
    assert len(cube_planes(np.flatnonzero(gaps), 2)) == 10 and len(cube_planes(np.arange(5), 3)) == 1
    assert spans(chunk_masks(gaps, 2, 2)) == ["0~9", "20~29"]
    line_free = parse_channels("0~3;8~39", 40)
    assert list(per_plane(line_free, np.flatnonzero(gaps), 2)) == [True, True, False, False, True] + [True] * 5


def test_makeimages_makes_its_cubes_one_at_a_time_beside_its_other_images_in_order():
    """run_in_lanes, which makeimages makes its images with: results in the tasks' order;
    a lane's tasks one after the other in order (the cubes cleaned in one piece; the other
    images, the aggregate after its spws' images), the two lanes side by side, so never
    two cubes at once; after a failure nothing more starts and the error is raised. With
    one at a time, every task in order."""
    import threading
    import time
    from almapipe.stages.imaging import run_in_lanes
    lock, running, events = threading.Lock(), set(), []

    def task(name, seconds=0.03, fail=False):
        def fn():
            with lock:
                running.add(name)
                events.append(("start", name, frozenset(running)))
            time.sleep(seconds)
            with lock:
                running.discard(name)
                events.append(("end", name, None))
            if fail:
                raise RuntimeError(f"{name} failed")
            return name
        return fn
    names = ["cal1", "cal2", "cont1", "cont2", "aggregate", "cube1", "cube2", "cube3"]
    tasks = [(task(n), "cubes" if n.startswith("cube") else "images") for n in names]
    assert run_in_lanes(tasks, 2) == names
    starts = [(name, beside) for kind, name, beside in events if kind == "start"]
    assert max(len(beside) for _, beside in starts) == 2
    assert all(sum(n.startswith("cube") for n in beside) <= 1 for _, beside in starts)
    at = {(kind, name): k for k, (kind, name, _) in enumerate(events)}
    for lane in (names[:5], names[5:]):        # each lane in its order, one at a time
        assert all(at["end", a] < at["start", b] for a, b in zip(lane, lane[1:]))
    assert "cube1" in {n for _, beside in starts for n in beside if "cal1" in beside}
    events.clear()
    assert run_in_lanes(tasks, 1) == names
    assert max(len(b) for kind, _, b in events if kind == "start") == 1
    # a failure: what was running ends, nothing more starts, its error is raised
    events.clear()
    failing = [(task("a", 0.1), "cubes"), (task("b", 0.01, fail=True), "images"), (task("c"), "images"),
               (task("d"), "cubes")]
    with pytest.raises(RuntimeError, match="b failed"):
        run_in_lanes(failing, 2)
    assert {name for kind, name, _ in events if kind == "start"} == {"a", "b"}
    assert ("end", "a") in {(kind, name) for kind, name, _ in events}


def test_the_imager_chooses_a_threading_layer_whose_kernels_two_threads_may_call_at_once():
    """prefer_threadsafe_layer (the imager worker calls it first): numba's OpenMP layer,
    under which two threads run parallel kernels at once; numba's default, workqueue,
    aborts the process instead. One image at a time where no such layer loads or
    ALMAPIPE_IMAGES_AT_ONCE=1."""
    import subprocess
    import sys
    child = ("import threading, numpy as np, numba\n"
             "from almapipe.imaging.clean_kernels import prefer_threadsafe_layer, threadsafe_layer\n"
             "from almapipe.stages.imaging import images_at_once\n"
             "prefer_threadsafe_layer()\n"
             "if not threadsafe_layer():\n"
             "    raise SystemExit('no threadsafe layer')\n"
             "@numba.njit(parallel=True)\n"
             "def total(a):\n"
             "    s = 0.0\n"
             "    for i in numba.prange(len(a)):\n"
             "        s += a[i]\n"
             "    return s\n"
             "a = np.ones(1 << 20)\n"
             "out = []\n"
             "ts = [threading.Thread(target=lambda: out.extend(total(a) for _ in range(20))) for _ in range(2)]\n"
             "[t.start() for t in ts]\n"
             "[t.join() for t in ts]\n"
             "print(threadsafe_layer(), numba.threading_layer(), len(out), images_at_once())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          env=dict(env, ALMAPIPE_THREADS="2"))
    if "no threadsafe layer" in proc.stderr:
        pytest.skip("no threadsafe numba threading layer here (no libgomp): images are made one at a time")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "omp", "40", "2"]
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          env=dict(env, ALMAPIPE_THREADS="2", ALMAPIPE_IMAGES_AT_ONCE="1"))
    assert proc.stdout.split()[-1] == "1"


# ------------------------------------------------------------------ QA metrics and WebLog tables

def test_every_stage_declares_its_metrics_each_named_and_described():
    from almapipe.stages.base import Metric
    names = {}
    for spec in REGISTRY.values():
        for m in spec.qa:
            assert isinstance(m, Metric) and m.doc, (spec.name, m)
            # stage.what: named for its stage (joincube scores makeimages' images)
            assert m.name.split(".")[0] in REGISTRY and m.name.count(".") == 1, m.name
            names.setdefault(m.name, m.doc)
            assert names[m.name] == m.doc, f"{m.name} declared twice with different docs"
    assert len(names) >= 35
    for name in ("bandpass", "flagdata", "lowgainflag", "applycal", "makeimages", "weblog"):
        assert REGISTRY[name].qa, name


def _stage_modules():
    stage_dir = os.path.join(ROOT, "almapipe", "stages")
    return [os.path.join(stage_dir, n) for n in sorted(os.listdir(stage_dir)) if n.endswith(".py") and n != "base.py"]


def test_stages_score_only_through_their_metrics():
    """No stage lowers its QA itself (QA.lower with a score and a reason); each adds
    what a Metric returns (qa.add), so every score names its metric."""
    found = []
    for path in _stage_modules():
        with open(path) as f:
            tree = ast.parse(f.read())
        for n in ast.walk(tree):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "lower"
                    and (n.args or n.keywords)):
                found.append(f"{os.path.basename(path)}:{n.lineno}")
    assert not found, found


def test_a_score_of_an_undeclared_metric_fails_the_stage():
    from almapipe.stages.base import QA, Score, StageError, metric, stage

    @metric("_probe.declared", "a metric the probe declares")
    def declared(x):
        return Score(0.5, f"x = {x}") if x else None

    @metric("_probe.other", "a metric the probe does not declare")
    def other():
        return Score(0.4, "other")

    @stage("_probe", service="x", qa=(declared,), topic="Products")
    def probe(ctx, params, io):
        qa = QA()
        qa.add(declared(ctx.get("x")))
        if ctx.get("other"):
            qa.add(other())
        return qa
    try:
        qa = probe({"x": 3}, {}, None)
        assert qa.score == 0.5 and qa.metrics == [{"score": 0.5, "reason": "x = 3", "metric": "_probe.declared",
                                                   "evidence": ""}]
        assert probe({}, {}, None).metrics == []
        with pytest.raises(StageError, match="_probe.other not declared"):
            probe({"other": True}, {}, None)
    finally:
        REGISTRY.pop("_probe")


def _declared(stage_name: str) -> set:
    return {m.name for m in REGISTRY[stage_name].qa}


def test_metric_functions_score_known_inputs_as_before():
    from almapipe.stages import alma, calibration, flagging, imaging, outlierflag, reporting
    from almapipe.stages.base import Score
    s, = flagging.flagged_fraction(0.3)
    assert s == Score(0.7, "30.0% of the data flagged beyond autocorrelations.", metric="flagdata.flagged_fraction")
    assert flagging.flagged_fraction(0.7)[0].score == 0.0 and flagging.flagged_fraction(0.05) == []
    s, = alma.low_gain_antennas(["DA48"], 10, 0.3)
    assert (s.score, s.evidence) == (pytest.approx(0.9), "table-low-gain")
    assert s.reason == "Flagged antenna(s) DA48: gain amplitude below 30% of the array's median."
    assert alma.low_gain_antennas([], 10, 0.3) == []
    s, = alma.low_gain_antennas(["DA48", "DV17"], 10, 0.3, ["DV17"])      # DV17 shadowed on the bandpass calibrator
    assert s.score == pytest.approx(0.8) and s.reason == (
        "Flagged antenna(s) DA48: gain amplitude below 30% of the array's median; DV17: no unflagged data on the "
        "bandpass calibrator (shadowed or flagged before), so no gain and no bandpass.")
    assert [x.score for x in alma.median_tsys(5, 1500.0, 1000.0)] == [0.6] and alma.median_tsys(5, 900.0, 1e3) == []
    assert alma.tsys_coverage(3)[0].reason == "No Tsys spw covers science spw 3: Tsys not applied there."
    assert alma.wvr_availability()[0].reason.startswith("No WVR spw in the EB")
    assert alma.wvr_improvement(0.8, 1.0)[0].score == 0.5 and alma.wvr_improvement(1.5, 1.0) == []
    flagged, missing = calibration.SOLUTION_METRICS["gaincal"]
    s, = flagged(0.25, "gaincal", "gaincal_spw0.png")
    assert (s.score, s.metric, s.evidence) == (0.75, "gaincal.flagged_solutions", "gaincal_spw0.png")
    assert missing(["DA45", "DA42"], 8, "gaincal")[0].score == pytest.approx(0.75)
    assert calibration.newly_flagged(0.2)[0].score == pytest.approx(0.8) and calibration.newly_flagged(0.05) == []
    assert calibration.derived_flux_snr("J1", 0, 5.0)[0].reason == "J1 spw 0: derived flux SNR only 5.0."
    assert calibration.refant_flagged("DA41", 0.3)[0].reason == "Reference antenna DA41 has 70% of its data flagged."
    assert outlierflag.gain_outlier_antennas(2, 10, 1)[0].score == pytest.approx(0.8)
    assert outlierflag.newly_flagged_targets(0.01, 5, 7)[0].score == pytest.approx(0.99)
    rec = {"file": "t.pbcor.fits", "qa_score": 0.6, "rms_jy_per_beam": 2e-3, "theoretical_rms_jy_per_beam": 1e-3}
    s, = imaging.image_rms(rec, "t.png")
    assert s == Score(0.6, "t.pbcor.fits: rms 2.00 mJy/beam vs theoretical 1.00.", "t.png", "makeimages.rms")
    assert imaging.not_imaged("T spw 0 (mfs)", "no data") == []
    assert reporting.weblog_weight(60e6, 1e6)[0].metric == "weblog.weight"
    s, = alma.large_corrections({"DA41": (0.002, 0.0, 0.0), "DA42": (0.0001, 0.0, 0.0)}, 0.001, 1.0)
    assert s == Score(0.9, "Position correction longer than 1 wavelength(s) (1.00 mm): DA41 2.0 mm.", "",
                      "antpos.large_corrections")
    assert alma.large_corrections({"DA42": (0.0001, 0.0, 0.0)}, 0.001, 1.0) == []
    s, = imaging.continuum_fraction("T", 5, 6, 128, 0.1)
    assert (s.score, s.evidence, s.metric) == (0.6, "table-continuum", "uvcontsub.continuum_fraction")
    assert s.reason.startswith("T spw 5: the continuum is fitted on 6 of 128 channels (5%, under 10%)")
    assert imaging.continuum_fraction("T", 5, 40, 128, 0.1) == []


def test_each_stages_scores_name_metrics_it_declares():
    """The metric functions of a few real stages, with inputs that lower them, through
    QA.add: every entry names a metric its stage declares."""
    import numpy as np
    from almapipe.calibration.caltable import CalSolutions
    from almapipe.stages import alma, calibration, flagging, imaging
    from almapipe.stages.base import QA
    cases = {
        "flagdata": [flagging.flagged_fraction(0.3)],
        "lowgainflag": [alma.low_gain_antennas(["DA48"], 10, 0.3)],
        "wvrgcal": [alma.wvr_radiometers(["DA44"]), alma.wvr_improvement(0.9, 1.0), alma.wvr_fit_phases(3)],
        "bandpass": [calibration.bandpass_outliers([{"antenna": "DA45", "spw": 5, "why": "amplitude shape off"}]),
                     calibration.phaseup_snr("J1924-2914", 5, 4.0, 20.0, "60s")],
        "makeimages": [imaging.not_imaged("T spw 0 (mfs)", "all data flagged"),
                       imaging.image_dynamic_range({"file": "c.fits", "qa_score": 0.5, "rms_jy_per_beam": 1e-3},
                                                   "c.png")],
    }
    for name, scores in cases.items():
        qa = QA()
        for s in scores:
            qa.add(s)
        assert qa.score < 1 and len(qa.metrics) == len(scores), name
        assert {m["metric"] for m in qa.metrics} <= _declared(name), (name, qa.metrics)
    # solution_qa, as the solves call it: a flagged antenna and flagged solutions
    ctx = {"observation": {"antennas": [{"id": i, "name": f"DA{41 + i}", "has_data": True} for i in range(4)]}}
    flag = np.zeros((4, 1, 2), bool)
    flag[3] = True
    flag[0, 0, 0] = True
    sol = CalSolutions("G", 0, np.array([1e11]), np.zeros(4), np.ones(4), np.zeros(4, int), np.ones(4, int),
                       np.arange(4), np.ones((4, 1, 2), complex), flag, np.full((4, 1, 2), 50.0))
    for stage_name, what in (("gaincal", "gaincal"), ("spwphaseup", "spw phase offset")):
        qa = QA()
        calibration.solution_qa(qa, [sol], what, ctx, stage_name)
        assert [m["metric"] for m in qa.metrics] == [f"{stage_name}.flagged_solutions",
                                                     f"{stage_name}.antennas_without_solutions"]
        assert {m["metric"] for m in qa.metrics} <= _declared(stage_name)
        assert qa.metrics[1]["reason"] == f"No {what} solutions for antenna(s) DA44: all their data are flagged."


class _LogIO:
    def __init__(self):
        self.lines = []

    def log(self, msg, *args):
        self.lines.append(msg % args if args else msg)


def test_a_real_stage_scores_through_its_declared_metrics():
    """fluxconsistency run as the worker runs it (the registered function): the EB off
    the others' flux scale is named by fluxconsistency.eb_outliers."""
    def eb(name, scale):
        return {"ms_name": name, "fluxscale": [{"field": "J1832-2039", "spw": s, "flux_jy": 0.5 * scale,
                                                "flux_err_jy": 0.001} for s in (0, 1)]}
    ctx = {"fields": [{"id": 1, "name": "J1832-2039", "intents": ["PHASE"]}], "target_partitions": [],
           "ebs": [eb("a", 1.0), eb("b", 1.08), eb("c", 0.998)]}
    qa = REGISTRY["fluxconsistency"].fn(ctx, {}, _LogIO())
    assert [(m["metric"], m["score"]) for m in qa.metrics] == [("fluxconsistency.eb_outliers", 0.6)]
    assert "EB b: flux scale +8.0% from the EBs' median" in qa.metrics[0]["reason"]
    ctx = dict(ctx, fields=[])                     # no phase calibrator: nothing compared
    qa = REGISTRY["fluxconsistency"].fn(ctx, {}, _LogIO())
    assert [m["metric"] for m in qa.metrics] == ["fluxconsistency.compared"] and qa.score == 0.8


def test_the_weblog_tables_come_from_the_stages_declarations():
    from almapipe.report import weblog
    with_tables = {n for n, spec in REGISTRY.items() if spec.tables}
    assert {"fluxscale", "fluxconsistency", "setjy", "refant", "lowgainflag", "bandpass", "flagdata",
            "uvcontsub", "spwphaseup", "makeimages"} <= with_tables
    for spec in REGISTRY.values():                   # each defined beside its stage
        if spec.tables:
            assert spec.tables.__module__ == spec.fn.__module__, spec.name
    ctx = {"flags": {"lowgainflag": ["DA48"]},
           "bandpass_antennas": {"outliers": [{"antenna": "DA45", "spw": 5, "why": "amplitude shape off"}],
                                 "no_solutions": {"5": ["DA48"]}}}
    t, = weblog._result_tables(ctx, "bandpass")
    assert t["evidence"] == "table-bandpass-antennas"
    assert t["rows"] == [["DA45", 5, "outlier: amplitude shape off"],
                         ["DA48", "5", "no solutions: its data are flagged (lowgainflag)"]]
    assert weblog._result_tables(ctx, "lowgainflag")[0]["evidence"] == "table-low-gain"
    assert weblog._result_tables(ctx, "fluxscale") == [] and weblog._result_tables(ctx, "nosuch") == []


# ------------------------------------------------------------------ the WebLog's command and triage

def _overrides_of(command: str) -> dict:
    """The --param overrides of an `almapipe run` command line, as the CLI reads them."""
    import shlex
    words = shlex.split(command)
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--param")


def test_the_weblog_command_of_every_stage_is_accepted_again():
    """The stage page's Equivalent command, with the stage's defaults filled in as the
    worker records them, passes the checks of --param (recipes.apply_overrides); the
    internal parameters (makeimages' aggregate inside its image parameters, weblog's
    failure) are neither in it nor in the page's Parameters table."""
    from almapipe.report import weblog
    for name in recipes.available():
        recipe = recipes.load(name)
        for st in recipe["stages"]:
            spec = REGISTRY[st["stage"]]
            recorded = spec.with_defaults(st["params"])            # platform/worker.py records these
            shown = weblog.shown_params(spec.name, recorded)
            command = weblog._command({"recipe": recipe}, spec.name, shown)
            assert f"--recipe {name}" in command
            overrides = _overrides_of(command)
            assert set(overrides) == {f"{spec.name}.{k}" for k in shown}, command
            recipes.apply_overrides(recipes.load(name), overrides)     # raises RecipeError if refused
    makeimages = REGISTRY["makeimages"]
    recorded = makeimages.with_defaults({})
    assert recorded["cont"]["aggregate"] is False                   # the worker's record has it ...
    shown = weblog.shown_params("makeimages", recorded)
    assert all("aggregate" not in shown[k] for k in ("calibrator", "cont", "cube"))    # ... the page does not
    assert weblog.shown_params("weblog", {"failure": {"stage": "x"}}) == {}
    assert weblog.shown_params("imagecube_chunk", {"piece": {}, "cube_chunks": 2}) == {"cube_chunks": 2}


def test_a_string_that_reads_as_json_is_quoted_in_the_command():
    from almapipe.report import weblog
    command = weblog._command({"recipe": {"name": "alma_calimage"}}, "refant",
                              {"refant": "5"})
    assert _overrides_of(command) == {"refant.refant": '"5"'}
    assert recipes.apply_overrides(recipes.load("alma_calimage"), _overrides_of(command))["stages"][4][
        "params"]["refant"] == "5"
    assert _overrides_of(weblog._command({}, "bandpass", {"solint": "30s", "combine": ""})) == {
        "bandpass.solint": "30s", "bandpass.combine": ""}


_FLAGGED = {"flags": {"lowgainflag": ["DA48"], "gainflag": {"5": ["DA45"]}, "tsysflag": ["DA41: Tsys high"],
                      "rawflagchans": {"7": [3, 4]}, "flagdata": {"fractions": {"shadow": 0.01}},
                      "fluxcalflag": {"Titan": {"5": [1, 2]}},
                      "flagtargets": {"template_fraction": 0.02, "outlier_fraction": 0.001}},
            "wvr": {"bad_antennas": ["PM01"]},
            "bandpass_antennas": {"outliers": [{"antenna": "DA45", "spw": 5, "why": "amplitude shape off"}]},
            "flux_consistency": {"outliers": ["uid___A002_b"]}}


def test_homes_outliers_and_the_flag_reasons_come_from_the_stages_declarations():
    """No stage is named in the report code: each stage declares what Home's triage
    names (stage(outliers=...)) and what the flagging summary says it flagged
    (stage(flag_reasons=...)), beside the stage; the report lists them in the run's order."""
    from almapipe.report import flagsummary, weblog
    for spec in REGISTRY.values():
        for fn in (spec.outliers, spec.flag_reasons):
            if fn:
                assert fn.__module__ == spec.fn.__module__, spec.name
    assert {n for n, s in REGISTRY.items() if s.outliers} == {
        "lowgainflag", "wvrgcal", "bandpass", "gainflag", "tsysflag", "rawflagchans", "fluxconsistency"}
    assert {n for n, s in REGISTRY.items() if s.flag_reasons} == {
        "flagdata", "fluxcalflag", "rawflagchans", "tsysflag", "lowgainflag", "gainflag", "flagtargets"}
    for name in ("weblog.py", "flagsummary.py"):            # no stage named one by one
        with open(os.path.join(ROOT, "almapipe", "report", name)) as f:
            text = f.read()
        assert not [s for s in ("lowgainflag", "wvrgcal", "tsysflag", "rawflagchans", "gainflag") if f'"{s}"' in text]
    ctx = dict(_FLAGGED, recipe=recipes.load("alma_calimage"))
    pages = {"lowgainflag": "stage11.html", "bandpass": "stage10.html", "tsyscal": "stage5.html"}
    out = weblog._outliers(ctx, pages)
    dead = next(o for o in out if o["what"] == "antenna DA48")
    assert dead == {"what": "antenna DA48", "why": "gain amplitude far below the array's: flagged (lowgainflag)",
                    "href": "stage11.html#ev-table-low-gain", "also": "stage10.html#ev-table-bandpass-antennas",
                    "also_label": "bandpass"}
    assert [o["what"] for o in out] == ["spw 7", "DA41", "antenna PM01", "antenna DA45 spw 5", "antenna DA48",
                                        "antenna DA45 spw 5", "EB uid___A002_b"]     # the recipe's order
    assert next(o for o in out if o["what"] == "DA41")["also"] == "stage5.html#plots"
    assert flagsummary.flag_reasons(ctx) == [
        ("flagdata", "shadow: 1.00% of the data"), ("fluxcalflag", "Titan spw 5: 2 channels on its lines"),
        ("rawflagchans", "spw 7: channels 3, 4 stand out in the raw spectra"), ("tsysflag", "DA41: Tsys high"),
        ("lowgainflag", "antenna DA48: gain amplitude far below the array's (all data)"),
        ("gainflag", "spw 5: antenna(s) DA45 with outlier gains"),
        ("flagtargets", "template 2.00%, amplitude outliers 0.10% of the target data")]
    assert weblog._outliers({}, {}) == [] and flagsummary.flag_reasons({}) == []


def test_the_readme_lists_every_stage():
    with open(os.path.join(ROOT, "README.md")) as f:
        row = next(line for line in f if line.startswith("| `almapipe/stages` |"))
    assert not [name for name in REGISTRY if f"`{name}`" not in row]


def test_an_object_store_outage_under_zarr_is_an_infrastructure_error():
    """The visibility store's S3 client (obstore) words a 5xx answer or a refused
    connection only in its error's text, once its own retries are spent: the worker
    waits those out instead of failing the stage (a 20 GB EB's uvcontsub failed three
    times in a row when the S3 server had no writable volume). A refusal is not one."""
    from obstore.exceptions import GenericError
    from almapipe.platform.bus import is_infrastructure_error
    status_500 = GenericError("Generic S3 error: Error performing PUT http://127.0.0.1:1/b/k/zarr.json in 2.9s, "
                              "after 10 retries - Status { status: 500, body: Some(\"<Error><Code>InternalError"
                              "</Code></Error>\") }")
    refused = GenericError("Generic S3 error: Error performing DELETE http://127.0.0.1:1/b/k - HTTP error: error "
                           "sending request ... ConnectError(\"tcp connect error\")")
    try:
        raise RuntimeError("the stage's write") from status_500
    except RuntimeError as wrapped:
        assert is_infrastructure_error(wrapped)
    assert is_infrastructure_error(refused)
    assert not is_infrastructure_error(GenericError("Generic S3 error: Status { status: 403, body: AccessDenied }"))


def test_the_local_s3_server_grows_with_the_disk_not_with_its_start_up_free_space():
    """weed's automatic volume count (-volume.max=0) is fixed from the disk free when it
    starts: the local stack names a count no disk reaches and a free-space floor."""
    import inspect
    from almapipe.platform import stack
    src = inspect.getsource(stack.Stack)
    assert '"-volume.max=0"' not in src and "-volume.minFreeSpace={S3_MIN_FREE}" in src


def test_the_aggregate_holds_its_spws_samples_only_within_a_pieces_budget(monkeypatch):
    """makeimages' aggregate continuum takes its spws' samples from their own images'
    passes (imaging.aggregate_feeds) only where holding them fits in a cube piece's
    memory budget: a TDM spw's do, an FDM spw's (3840 channels) do not, and then the
    aggregate reads as before; no aggregate, nothing is held."""
    from almapipe.stages import imaging

    class Part:
        def __init__(self, nrow):
            self.nrow = nrow

        def select(self, fids, cross_only=False):
            return np.arange(self.nrow)

    class IO:
        def vis(self, member):
            return Part(member["nrow"])

    def job(nchan, nrow=650_000, aggregate=True):
        pieces = [{"spw": s, "nchan": nchan, "chans": "", "nrow": nrow} for s in (9, 11, 13, 15)]
        return ("cont", [3], pieces, "DATA", {"aggregate": aggregate, "width": 8})
    # 4 spws x 650k rows x (16 bins x 12 B + 24 B): 0.56 GB, within 1 GiB
    assert imaging._feed_bytes(IO(), job(128)) == 4 * 650_000 * (16 * 12 + 24)
    assert imaging.aggregate_feeds(IO(), [job(128)]) == {}
    assert imaging.aggregate_feeds(IO(), [job(3840)]) is None
    assert imaging.aggregate_feeds(IO(), [("mfs", [0], {}, "CORRECTED_DATA", {})]) is None
    monkeypatch.setenv("ALMAPIPE_CUBE_PIECE_MB", "100")
    assert imaging.aggregate_feeds(IO(), [job(128)]) is None
