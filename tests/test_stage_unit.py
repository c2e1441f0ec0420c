"""The stage as a unit (decision 0016), without the stack: every stage declares its
parameters, WebLog topic and context keys; recipes and overrides are checked against
the declarations; the context's keys are declared; the modules import without cycles."""
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
    for word in ("solint", "phaseup_solint", "minsnr", "default 3.0", "reads:", "writes:", "Calibration"):
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
