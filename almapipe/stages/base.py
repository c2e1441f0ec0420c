"""What every pipeline stage shares: its I/O handle, QA result and the registry.

A stage is a function ``fn(ctx, params, io) -> QA``. It reads the pipeline
context ``ctx`` (a JSON-able dict, ALMA's h_init/h_save context), fetches
the objects it needs through ``io``, writes new objects through ``io``
(never overwriting: keys are run/stage scoped), updates ``ctx`` in place and
returns its QA score. Services are thin shells around this call.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ParameterError
from ..heuristics.spectral_response import channel_correlation
from ..platform.store import CachedFetcher, ObjectStore

CONTEXT_VERSION = 1
log = logging.getLogger("almapipe.stage")


class StageError(RuntimeError):
    """A stage cannot proceed; the message names the problem (not retried)."""


@dataclass(frozen=True)
class Score:
    """What one QA metric says about a stage: a score in [0, 1] below 1, the reason
    (shown on the WebLog) and the evidence (a plot file name or a table id on the
    stage's page). `metric` is filled in by the Metric that returns it."""
    score: float
    reason: str
    evidence: str = ""
    metric: str = ""


@dataclass(frozen=True)
class Metric:
    """One QA metric of a stage (as the ALMA pipeline's QA scores each metric): its
    name ("stage.what"), a line saying what it measures and how it scores, its unit,
    and the function that scores the measured quantities. The function returns None
    (nothing wrong), a Score or a list of them; calling the Metric returns that list
    with each Score naming the metric. A stage declares its metrics with
    stage(qa=...), and its body adds what they return (``qa.add(metric(...))``)."""
    name: str
    doc: str
    fn: Callable
    unit: str = ""

    def __call__(self, *args, **kwargs) -> list:
        out = self.fn(*args, **kwargs)
        if out is None:
            return []
        return [dataclasses.replace(s, metric=self.name) for s in ([out] if isinstance(out, Score) else out)]


def metric(name: str, doc: str, unit: str = "") -> Callable[[Callable], Metric]:
    """Declare fn as the scoring function of QA metric `name`; the same function may
    score the metrics of several stages (metric("gaincal.x", ...)(fn))."""
    def deco(fn: Callable) -> Metric:
        return Metric(name, doc, fn, unit)
    return deco


@dataclass
class QA:
    """A stage's QA score in [0, 1] with the reasons, as the ALMA WebLog shows them.

    Each lowering is also kept as a structured entry in ``metrics`` (JSON-able dicts
    {score, reason, metric, evidence}), so the WebLog can list the lowest per-reason
    scores, name the metric and link the evidence: a plot file name or a table id
    on the stage's page. The stage's score stays the lowest of them. A stage adds
    the Scores its declared Metrics return (``add``); ``note`` keeps a reason
    that does not score."""
    score: float = 1.0
    reasons: list = field(default_factory=list)
    metrics: list = field(default_factory=list)

    def add(self, scores) -> None:
        """Lower by what a Metric returned: a list of Scores (none: nothing wrong)."""
        for s in ([scores] if isinstance(scores, Score) else scores or []):
            self.lower(s.score, s.reason, metric=s.metric, evidence=s.evidence)

    def lower(self, score: float, reason: str, metric: str = "", evidence: str = "") -> None:
        score = max(0.0, min(1.0, score))
        self.score = min(self.score, score)
        self.reasons.append(reason)
        self.metrics.append({"score": round(float(score), 4), "reason": reason, "metric": metric,
                             "evidence": evidence})

    def note(self, reason: str) -> None:
        self.reasons.append(reason)

    def extend(self, other: "QA") -> None:
        """Take in another QA's reasons and scores (a part of the stage made apart, as
        makeimages makes each image), after this one's."""
        self.score = min(self.score, other.score)
        self.reasons += other.reasons
        self.metrics += other.metrics


def qa_colour(score: float) -> str:
    """The ALMA WebLog colour of a QA score."""
    if score is None or score < 0:
        return "grey"
    if score >= 0.9:
        return "green"
    if score >= 0.66:
        return "blue"
    if score >= 0.33:
        return "yellow"
    return "red"


class _PutsBehind:
    """StageIO.puts_behind's uploads."""

    def __init__(self, io: "StageIO", threads: int):
        self.io, self.pending = io, []
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="put-behind")

    def put_file(self, local: str, name: str | None = None, sha256: str | None = None) -> None:
        name = name or os.path.basename(local)
        self.pending.append((name, self.pool.submit(self.io.store.put_file, local, self.io.key(name),
                                                    sha256=sha256)))

    def put_stream(self, name: str, chunks, length: int) -> None:
        """An object of length bytes given as chunks (ObjectStore.put_stream)."""
        self.pending.append((name, self.pool.submit(self.io.store.put_stream, self.io.key(name), chunks, length)))

    def assemble(self, name: str, segments: list) -> None:
        """An object made of segments, some of them objects in the store (ObjectStore.assemble)."""
        self.pending.append((name, self.pool.submit(self.io.store.assemble, self.io.key(name), segments)))

    def entries(self) -> list:
        """Each file's entry (as put_file returns it), in the order put, once uploaded."""
        done = [(name, f.result()) for name, f in self.pending]
        self.pending = []
        return [self.io._record(name, entry) for name, entry in done]


class StageIO:
    """Object access for one execution of one stage of one run. A stage may use it from
    several threads (makeimages makes two images at once): what it shares is guarded."""

    def __init__(self, store: ObjectStore, fetcher: CachedFetcher, run_id: str, stage_index: int,
                 stage: str, workdir: str):
        self.store, self.fetcher = store, fetcher
        self.run_id, self.stage_index, self.stage = run_id, stage_index, stage
        self.workdir = workdir
        self.outputs: list = []
        self._dirs: dict = {}
        self.log_lines: list = []
        self.visibilities = 0
        self._vstore = None
        self._bytes_at_start = None
        self._plots: list = []       # (render.Pending, its output record) not yet uploaded
        self._lock = threading.RLock()  # the store's first opening, fetched directories, counts

    # --- the visibility store (decision 0015)
    @property
    def vstore(self):
        """The worker process's visibility store (zarr arrays in S3, a bounded local cache)."""
        with self._lock:
            if self._vstore is None:
                self._vstore = visstore_for(self.store, self.fetcher.chunk_dir)
                self._vstore.begin_stage()
                self._bytes_at_start = self._vstore.counter.as_dict()
            return self._vstore

    def count_visibilities(self, n: int) -> None:
        """Count visibilities read (the stage's log reports them)."""
        with self._lock:
            self.visibilities += int(n)

    def vis(self, part: dict):
        """A partition of the context, to read and write through (``VisPartition``)."""
        from ..platform.visstore import VisPartition
        if "arrays" not in part:
            raise StageError(f"partition {part.get('name')} is not in the visibility store "
                             f"(a context from before decision 0015): run the pipeline again from importdata")
        return VisPartition(self.vstore, part, f"{self.stage_index:02d}_{self.stage}", self.fetch_meta,
                            f"runs/{self.run_id}/vis/{part['name']}")

    def fetch_meta(self, key: str) -> str:
        """The read-only local copy of an EB's MS shell (subtables), shared by the
        partitions of one stage execution."""
        return self.fetch_dir(key)

    def bytes_moved(self) -> dict:
        """Bytes this stage execution moved through the visibility store."""
        if self._vstore is None:
            return {}
        now = self._vstore.counter.as_dict()
        return {k: now[k] - self._bytes_at_start.get(k, 0) for k in now}

    @property
    def prefix(self) -> str:
        return f"runs/{self.run_id}/stages/{self.stage_index:02d}_{self.stage}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def fetch_dir(self, key: str) -> str:
        """A private, writable copy of the directory at key: one per stage execution,
        so a stage that reads a partition or table twice does not copy it twice."""
        with self._lock:         # two threads asking for one directory get one copy
            path = self._dirs.get(key)
            if path is None or not os.path.isdir(path):    # uvcontsub renames its copy
                path = self._dirs[key] = self.fetcher.dir(key, self.workdir)
            return path

    def fetch_raw(self, key: str) -> str:
        return self.fetcher.file(key, self.workdir, bucket=self.store.raw_bucket)

    def fetch_file(self, key: str) -> str:
        return self.fetcher.file(key, self.workdir)

    def put_dir(self, local_dir: str, name: str) -> dict:
        return self._record(name, self.store.put_dir(local_dir, self.key(name + ".tar")))

    def put_file(self, local: str, name: str | None = None) -> dict:
        name = name or os.path.basename(local)
        return self._record(name, self.store.put_file(local, self.key(name)))

    @contextlib.contextmanager
    def puts_behind(self, threads: int = 2):
        """Files put a few at a time in threads while the stage goes on (makes its next
        file): `with io.puts_behind() as up: up.put_file(path)`, then `up.entries()`,
        recorded in the order put. Leaving the block waits for every upload."""
        up = _PutsBehind(self, threads)
        try:
            yield up
        except BaseException:       # the stage failed: what has not started is not wanted
            up.pool.shutdown(wait=True, cancel_futures=True)
            raise
        up.pool.shutdown(wait=True)

    def put_bytes(self, data: bytes, name: str, content_type: str = "application/octet-stream") -> dict:
        return self._record(name, self.store.put_bytes(self.key(name), data, content_type))

    def put_json(self, doc, name: str) -> dict:
        return self._record(name, self.store.put_json(self.key(name), doc))

    def _record(self, name: str, entry: dict) -> dict:
        entry = dict(entry, name=name, stage=self.stage)
        self.outputs.append(entry)
        return entry

    def log(self, msg: str, *args) -> None:
        text = msg % args if args else msg
        self.log_lines.append(text)
        log.info("[%s %s] %s", self.run_id, self.stage, text)

    def log_summary(self, qa: "QA", params: dict, duration_s: float) -> None:
        """What every stage log ends with, whatever the stage logged itself: its
        parameters, how much it read, what it wrote, and its QA with the reasons."""
        lines = [f"parameters: {params_json(params)}"]
        if self.visibilities:
            lines.append(f"read {self.visibilities} visibilities")
        moved = self.bytes_moved()
        if moved:
            lines.append(f"visibility store: read {moved['s3_read']} B from S3 and {moved['cache_read']} B "
                         f"from the cache, wrote {moved['s3_written']} B")
        lines += [f"wrote {o['name']}" for o in self.outputs]
        lines.append(f"QA {qa.score:.2f} in {duration_s:.1f} s")
        lines += [f"  {r}" for r in qa.reasons]
        self.log_lines.extend(lines)

    def plot(self, fig, name: str) -> dict:
        """Save a matplotlib figure as PNG; the WebLog shows it on the stage's page. It is
        drawn in a helper process while the stage goes on (report/render.py); the record
        returned (its key known now) is completed when ``finish_plots`` uploads it."""
        from ..report import render
        path = os.path.join(self.workdir, name)
        entry = self._record(name, {"key": self.key(name)})
        self._plots.append((render.submit(fig, path, dpi=80, bbox_inches="tight"), entry))
        return entry

    def finish_plots(self, upload: bool = True) -> None:
        """Wait for the figures handed over by ``plot`` and upload them, completing their
        records in place; a failed stage's figures are dropped (upload=False)."""
        plots, self._plots = self._plots, []
        for pending, entry in plots:
            if not upload:
                pending.cancel()
                continue
            entry.update(self.store.put_file(pending.wait(), entry["key"]))


_VSTORES: dict = {}


def visstore_for(store: ObjectStore, chunk_dir: str):
    """One VisStore per worker process and chunk cache folder (its S3 client and cache
    are shared by the stage executions of the process)."""
    from ..platform.visstore import VisStore
    key = (store.cfg.s3_endpoint, store.cfg.bucket, chunk_dir)
    if key not in _VSTORES:
        _VSTORES[key] = VisStore(store.cfg, cache_dir=chunk_dir)
    return _VSTORES[key]


StageFn = Callable[[dict, dict, StageIO], QA]

# CASA's solint: 'int', 'scan', 'inf' or a duration ('30s', '1min'); combine: which
# boundaries a solution interval may cross
SOLINT = r"int|scan|inf|[0-9.]+\s*(s|sec|min)?"
COMBINE = r"((scan|field)(,\s*(scan|field))*)?"

# What a stage that solves on the calibrators reads: the fields, the data, the reference
# antenna, the flux models and the calibration library so far (its pre-apply)
CAL_READS = ("fields", "observation", "partitions", "refant", "models", "callibrary", "caltables")

# The WebLog's By Topic page, in this order; every stage names one (stage(topic=...)).
TOPICS = ("Data set", "Flagging", "Calibration", "Line finding and imaging", "Products")


@dataclass(frozen=True)
class Param:
    """One parameter of a stage, as a recipe or an override gives it.

    type: bool, int, float (an int is accepted), str, list or dict, or a tuple of
    them; a dict with `fields` is checked key by key against them (makeimages' image
    parameters); one without is free-form (field_roles). default None means "none": the
    stage decides (from its heuristics, or does without; the doc says which), and a
    recipe may say null for it. internal: set by the pipeline itself (a fan-out's piece,
    the WebLog's failure), never by a recipe."""
    name: str
    type: type | tuple
    default: Any = None
    doc: str = ""
    unit: str = ""
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    pattern: str = ""              # a regular expression a string value must match
    multiple_of: int = 0           # a number's: a multiple of this (0: any)
    fields: tuple = ()             # the Params of a dict value
    internal: bool = False

    def describe(self) -> str:
        """One line of `almapipe recipes --describe`: what the parameter takes."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        what = "|".join(t.__name__ for t in types)
        if self.choices:
            what += " one of " + ", ".join(map(str, self.choices))
        if self.min is not None and self.max is not None:
            what += f" in [{self.min:g}, {self.max:g}]"
        elif self.min is not None:
            what += f" >= {self.min:g}"
        elif self.max is not None:
            what += f" <= {self.max:g}"
        if self.multiple_of:
            what += f", a multiple of {self.multiple_of}"
        if self.pattern:
            what += f" matching {self.pattern}"
        if self.unit:
            what += f" ({self.unit})"
        default = "none" if self.default is None else json.dumps(self.default)
        return f"{what}, default {default}"


def _type_ok(value, types) -> bool:
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in (int, float) and isinstance(value, t):
            return True
    return False


def check_value(where: str, p: Param, value) -> None:
    """Raise ParameterError naming `where` (stage.param) and what it allows."""
    types = p.type if isinstance(p.type, tuple) else (p.type,)
    if value is None and p.default is None:
        return                                      # "none", said explicitly
    if not _type_ok(value, types):
        raise ParameterError(f"{where} = {json.dumps(value)[:40]}: expected {p.describe()}")
    if p.choices and value not in p.choices:
        raise ParameterError(f"{where} = {json.dumps(value)[:40]}: allowed {', '.join(map(str, p.choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            (p.min is not None and value < p.min) or (p.max is not None and value > p.max)):
        raise ParameterError(f"{where} = {value}: expected {p.describe()}")
    if p.multiple_of and isinstance(value, int) and value % p.multiple_of:
        raise ParameterError(f"{where} = {value}: expected {p.describe()}")
    if p.pattern and isinstance(value, (str, int, float)) and not re.fullmatch(p.pattern, str(value)):
        raise ParameterError(f"{where} = {json.dumps(value)[:40]}: expected {p.describe()}")
    if p.fields and isinstance(value, dict):
        check_params(where, p.fields, value)


def check_params(where: str, declared: tuple, params: dict) -> None:
    """Every parameter known, of its type and in its range; ParameterError otherwise."""
    known = {p.name: p for p in declared if not p.internal}
    for name, value in params.items():
        if name not in known:
            raise ParameterError(f"{where}: unknown parameter {name!r}; allowed: "
                                 f"{', '.join(sorted(known)) or 'none'} (see almapipe recipes --describe)")
        check_value(f"{where}.{name}", known[name], value)


def with_defaults(declared: tuple, params: dict) -> dict:
    """params with every declared parameter that is missing set to its default (dicts
    with fields too), so a stage body reads params["x"] and the default lives here."""
    out = dict(params)
    for p in declared:
        if p.name not in out:
            out[p.name] = copy.deepcopy(p.default)
        if p.fields and isinstance(out[p.name], dict):
            out[p.name] = with_defaults(p.fields, out[p.name])
    return out


def public_params(declared: tuple, params: dict) -> dict:
    """params without what the pipeline itself sets (Param(internal=True), at any depth:
    makeimages' `aggregate` inside its image parameters, a fan-out's `piece`, the
    WebLog's `failure`): what a recipe or an override may say, so what the WebLog shows
    and the command it prints pass check_params. A name not declared is kept."""
    by_name = {p.name: p for p in declared}
    out = {}
    for name, value in params.items():
        p = by_name.get(name)
        if p is not None and p.internal:
            continue
        out[name] = public_params(p.fields, value) if p is not None and p.fields and isinstance(value, dict) \
            else value
    return out


@dataclass
class StageSpec:
    """A stage as one unit: its function, the service that runs it, its parameters,
    its WebLog topic, the context keys it reads and writes (names in CONTEXT), its QA
    metrics (Metric) and its WebLog tables (tables(ctx) -> [{title, header, rows,
    evidence?}], the Results section of its page). What Home's triage names from it:
    outliers(ctx, link) -> [{what, why, href, also?, also_label?}], the antennas, spws
    or EBs it found wrong, link(stage, evidence="", anchor="") making the link to a
    stage's page; and, for a flagging stage, flag_reasons(ctx) -> [str], what it
    flagged and why (the flagging summary)."""
    name: str
    service: str
    fn: StageFn
    params: tuple = ()
    topic: str = ""
    reads: tuple = ()
    writes: tuple = ()
    qa: tuple = ()
    tables: Callable[[dict], list] | None = None
    outliers: Callable[[dict, Callable], list] | None = None
    flag_reasons: Callable[[dict], list] | None = None

    def check(self, params: dict) -> None:
        check_params(self.name, self.params, params)

    def with_defaults(self, params: dict) -> dict:
        return with_defaults(self.params, params)

    def public(self, params: dict) -> dict:
        return public_params(self.params, params)

    def metric(self, name: str) -> Metric | None:
        return next((m for m in self.qa if m.name == name), None)


REGISTRY: dict[str, StageSpec] = {}


def stage(name: str, service: str, params: tuple = (), topic: str = "", reads: tuple = (), writes: tuple = (),
          qa: tuple = (), tables: Callable[[dict], list] | None = None,
          outliers: Callable[[dict, Callable], list] | None = None, flag_reasons: Callable[[dict], list] | None = None):
    """Register fn as the implementation of stage `name`, run by `service`, taking
    `params`, shown under `topic` on the WebLog, reading and writing those context keys,
    scored by the `qa` metrics, its WebLog page showing what `tables(ctx)` returns, Home
    naming what `outliers(ctx, link)` returns and the flagging summary what
    `flag_reasons(ctx)` returns (StageSpec)."""
    if topic and topic not in TOPICS:
        raise ValueError(f"stage {name}: unknown topic {topic!r}; topics: {TOPICS}")
    unknown = [k for k in (*reads, *writes) if k not in CONTEXT]
    if unknown:
        raise ValueError(f"stage {name}: context keys {unknown} are not declared in CONTEXT")
    if not all(isinstance(m, Metric) for m in qa):
        raise ValueError(f"stage {name}: qa takes Metrics (stages.base.metric)")
    declared = {m.name for m in qa}
    if len(declared) != len(qa):
        raise ValueError(f"stage {name}: a QA metric declared twice")

    def deco(fn: StageFn) -> StageFn:
        # called by the worker or directly (tests), the body sees every declared parameter
        @functools.wraps(fn)
        def run(ctx: dict, given: dict, io: StageIO) -> QA:
            # the stage ends with its plots in S3 (an io of a unit test may have none)
            finish_plots = getattr(io, "finish_plots", None) or (lambda upload=True: None)
            try:
                result = fn(ctx, with_defaults(tuple(params), given), io)
            except BaseException:
                finish_plots(upload=False)
                raise
            finish_plots()
            # every score names a metric the stage declared: the WebLog lists them from here
            undeclared = sorted({m["metric"] for m in result.metrics} - declared)
            if undeclared:
                raise StageError(f"{name}: QA metric(s) {', '.join(undeclared)} not declared in its "
                                 f"stage(qa=...): {', '.join(sorted(declared)) or 'none'}")
            return result
        REGISTRY[name] = StageSpec(name, service, run, tuple(params), topic, tuple(reads), tuple(writes),
                                   tuple(qa), tables, outliers, flag_reasons)
        return run
    return deco


def specs_in_run_order(ctx: dict) -> list:
    """The registered stages in the order the context's recipe runs them, then the
    others in the registry's order: the order the WebLog lists what stages report."""
    names = [st.get("stage") or st.get("name") for st in (ctx.get("recipe") or {}).get("stages", [])]
    names += [r["name"] for r in ctx.get("stage_results", [])]
    order = {n: i for i, n in reversed(list(enumerate(names)))}
    return sorted(REGISTRY.values(), key=lambda spec: order.get(spec.name, len(order)))


# The pipeline context's keys (ALMA's context, as JSON): what each holds. A stage's
# declaration names the keys it reads and writes from here; tests/test_stage_unit.py
# checks that every key the code writes is declared.
CONTEXT = {
    "version": (int, "context format version (CONTEXT_VERSION)"),
    "run_id": (str, "the run"),
    "recipe": (dict, "the recipe the run follows"),
    "input_key": (str, "the input's key in the raw bucket"),
    "user": (dict, "what came with the request: flag_template, cont_dat, mous_id, antennapos, ..."),
    "observation": (dict, "listobs summary: antennas, spws, fields, scans, telescope"),
    "fields": (list, "fields with their intents (roles)"),
    "ms_name": (str, "the MS's base name"),
    "input_format": (str, "what the input was read as"),
    "partitions": (list, "per science spw: its entry in the visibility store (calibrated: applycal's gains, decision 0021)"),
    "aux_partitions": (dict, "partitions that are not science data (the WVR spw)"),
    "flags": (dict, "per flagging stage: what it flagged"),
    "flag_summary": (dict, "per spw after applycal: flagged fraction per field and per antenna (WebLog)"),
    "bandpass_antennas": (dict, "bandpass: antennas without solutions and outliers, for the WebLog"),
    "refant": (dict, "reference antenna ranking"),
    "tsys": (dict, "Tsys summary per spw"),
    "antpos": (dict, "antenna position corrections"),
    "wvr": (dict, "WVR phase correction summary"),
    "models": (dict, "flux density model per field id"),
    "setjy": (list, "flux density models per field and spw"),
    "callibrary": (list, "calibration tables to apply, in order"),
    "caltables": (dict, "calibration tables by name"),
    "bandpass_phaseup": (dict, "the bandpass phase-up interval per spw"),
    "spwphaseup": (dict, "the spw map of narrow spws to wide ones, with the SNRs"),
    "fluxscale": (list, "derived flux densities per field and spw"),
    "flux_csv_key": (str, "the flux.csv written by fluxscale"),
    "flux_consistency": (dict, "an MOUS's flux scale per EB"),
    "target_partitions": (list, "the target fields' calibrated MS partitions (split)"),
    "contsub_partitions": (list, "the continuum-subtracted target partitions"),
    "continuum": (list, "continuum ranges per field and spw (cont.dat)"),
    "cont_dat_key": (str, "the cont.dat uvcontsub wrote"),
    "images": (list, "image records of makeimages"),
    "fanout": (dict, "a stage's request for pieces in parallel (removed by the worker)"),
    "piece": (dict, "a fan-out piece's result"),
    "qa": (dict, "QA score and reasons per stage"),
    "stage_results": (list, "per stage: QA, parameters, outputs, log, visibility bytes, start and end "
                            "(a fanned-out stage's with its pieces')"),
    "manifest": (list, "objects written by the stages"),
    "failure": (dict, "the failed stage, on a failed run's WebLog"),
    "package": (dict, "the products package's objects"),
    "weblog_index_key": (str, "the WebLog's index.html"),
    "ebs": (list, "an MOUS's execution blocks (merged contexts)"),
    "mous_id": (str, "the MOUS"),
}


def new_context(run_id: str, recipe: dict, input_key: str, extras: dict) -> dict:
    return {"version": CONTEXT_VERSION, "run_id": run_id, "recipe": recipe, "input_key": input_key,
            "fields": [], "partitions": [], "callibrary": [], "caltables": {}, "qa": {},
            "images": [], "fluxscale": [], "flags": {}, "stage_results": [], "manifest": [],
            "user": extras}


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


# --- helpers on the context used by several stages

def fields_with(ctx: dict, intent: str) -> list:
    return [f for f in ctx["fields"] if intent in f["intents"]]


def field_ids_with(ctx: dict, intent: str) -> list:
    return [f["id"] for f in fields_with(ctx, intent)]


def require_intent(ctx: dict, intent: str, stage_name: str) -> list:
    ids = field_ids_with(ctx, intent)
    if not ids:
        known = ", ".join(f"{f['name']} ({'/'.join(f['intents']) or 'no intent'})" for f in ctx["fields"])
        raise StageError(f"{stage_name}: no field has intent {intent}; fields: {known}. "
                         f"Name one with the importdata parameter field_roles.")
    return ids


def spw_info(ctx: dict, spw: int) -> dict:
    """The observation summary's entry of a spectral window (frequencies, frame, ...)."""
    return next(s for s in ctx["observation"]["spws"] if s["id"] == spw)


def channel_rho(ctx: dict, spw) -> np.ndarray:
    """The noise correlation of a spw's neighbouring channels, from its effective bandwidth
    (heuristics.spectral_response); none for a spw the summary lacks or an aggregate
    ('5_7'), whose spws' noises are combined."""
    info = next((s for s in ctx.get("observation", {}).get("spws", []) if str(s["id"]) == str(spw)), {})
    return channel_correlation(info.get("chan_width_hz", 0.0), info.get("effective_bw_hz"))


def field_name(ctx: dict, fid: int) -> str:
    return next((f["name"] for f in ctx["fields"] if f["id"] == fid), str(fid))
