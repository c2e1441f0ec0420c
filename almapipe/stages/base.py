"""What every pipeline stage shares: its I/O handle, QA result and the registry.

A stage is a function ``fn(ctx, params, io) -> QA``. It reads the pipeline
context ``ctx`` (a JSON-able dict, ALMA's h_init/h_save context), fetches
the objects it needs through ``io``, writes new objects through ``io``
(never overwriting: keys are run/stage scoped), updates ``ctx`` in place and
returns its QA score. Services are thin shells around this call.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from ..platform.store import CachedFetcher, ObjectStore

CONTEXT_VERSION = 1
log = logging.getLogger("almapipe.stage")


class StageError(RuntimeError):
    """A stage cannot proceed; the message names the problem (not retried)."""


@dataclass
class QA:
    """A stage's QA score in [0, 1] with the reasons, as the ALMA WebLog shows them.

    Each lowering is also kept as a structured entry in ``metrics`` (JSON-able dicts
    {score, reason, metric, evidence}), so the WebLog can list the lowest per-reason
    scores, name the metric and link the evidence: a plot file name or a table id
    on the stage's page. The stage's score stays the lowest of them."""
    score: float = 1.0
    reasons: list = field(default_factory=list)
    metrics: list = field(default_factory=list)

    def lower(self, score: float, reason: str, metric: str = "", evidence: str = "") -> None:
        score = max(0.0, min(1.0, score))
        self.score = min(self.score, score)
        self.reasons.append(reason)
        self.metrics.append({"score": round(float(score), 4), "reason": reason, "metric": metric,
                             "evidence": evidence})

    def note(self, reason: str) -> None:
        self.reasons.append(reason)


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


class StageIO:
    """Object access for one execution of one stage of one run."""

    def __init__(self, store: ObjectStore, fetcher: CachedFetcher, run_id: str, stage_index: int,
                 stage: str, workdir: str):
        self.store, self.fetcher = store, fetcher
        self.run_id, self.stage_index, self.stage = run_id, stage_index, stage
        self.workdir = workdir
        self.outputs: list = []
        self._dirs: dict = {}
        self.log_lines: list = []
        self.visibilities = 0

    @property
    def prefix(self) -> str:
        return f"runs/{self.run_id}/stages/{self.stage_index:02d}_{self.stage}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def fetch_dir(self, key: str) -> str:
        """A private, writable copy of the directory at key: one per stage execution,
        so a stage that reads a partition or table twice does not copy it twice."""
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
        lines += [f"wrote {o['name']}" for o in self.outputs]
        lines.append(f"QA {qa.score:.2f} in {duration_s:.1f} s")
        lines += [f"  {r}" for r in qa.reasons]
        self.log_lines.extend(lines)

    def plot(self, fig, name: str) -> dict:
        """Save a matplotlib figure as PNG; the WebLog shows it on the stage's page."""
        path = os.path.join(self.workdir, name)
        fig.savefig(path, dpi=80, bbox_inches="tight")
        import matplotlib.pyplot as plt
        plt.close(fig)
        return self.put_file(path, name)


StageFn = Callable[[dict, dict, StageIO], QA]
REGISTRY: dict[str, tuple[str, StageFn]] = {}


def stage(name: str, service: str):
    """Register fn as the implementation of stage `name`, run by `service`."""
    def deco(fn: StageFn) -> StageFn:
        REGISTRY[name] = (service, fn)
        return fn
    return deco


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


def field_name(ctx: dict, fid: int) -> str:
    return next((f["name"] for f in ctx["fields"] if f["id"] == fid), str(fid))
