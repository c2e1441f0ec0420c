"""Retention of finished runs: what `almapipe gc` deletes, and what it keeps.

A run writes a new version of a visibility array at every stage that changes it
(decision 0015): after flagdata, applycal, flagtargets... the store holds every
FLAG (and WEIGHT, applycal's gains, ...) version the run went through. Once the run has ended nothing can
read the intermediate ones: the final context points at the version each array is
at. The retention rule, for a run in a terminal state (SUCCEEDED, FAILED, CANCELLED
in its record in the NATS KV bucket, as the gateway's coordinator writes it):

* kept: the products (every key of ``products/manifest.json``), the caltables, the
  contexts, the logs, the plots, the MS shells (``entry["meta"]``): everything that is
  not visibilities;
* dropped: a cube's pieces' planes (``planes_*`` of the ``imagecube_chunk`` stage: the
  join assembled the cube's FITS products from them, decision 0020) and the parts an
  interrupted ``ObjectStore.assemble`` left (``<key>.partN``, ``<key>.unitN``);
* dropped: every object under ``runs/<id>/vis/`` that is not part of an array version
  the final context points at (``partitions``, ``target_partitions``,
  ``contsub_partitions``, ``aux_partitions``: a rerun of imaging starts from them; the
  continuum fit is a few numbers a row); the partition tars of the layout before the
  store (entries with a ``"key"``), unless the products name them;
* optionally, ``drop_vis_after_days`` (ALMAPIPE_VIS_RETENTION_DAYS) after the run
  ended: its whole visibility store. The package stays downloadable and restorable
  (`almapipe restore` rebuilds the calibrated MS from the raw EB and the package).

An EB's run of an MOUS is collected only once its MOUS run has ended too, keeping
what the MOUS run's final context points at (it reads the EBs' arrays). What a gc did
is recorded in ``runs/<id>/gc.json``; a second gc of the same run frees nothing.
"""
from __future__ import annotations

import re
import time

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}     # as gateway/coordinator.py records them
PARTITION_LISTS = ("partitions", "target_partitions", "contsub_partitions")
# a stage's objects nothing reads once the run has ended: the planes a cube's pieces
# stored for the join (stages/imaging.py's imagecube_chunk), and the temporary parts of
# ObjectStore.assemble
INTERMEDIATE = re.compile(r"/stages/\d+_imagecube_chunk/planes_[^/]*$|\.(part|unit)\d+$")


def partition_entries(ctx: dict) -> list:
    """Every partition entry of a context (calibration, target and auxiliary ones)."""
    out = [p for name in PARTITION_LISTS for p in ctx.get(name) or []]
    aux = ctx.get("aux_partitions") or {}
    out += list(aux.values()) if isinstance(aux, dict) else list(aux)
    return [p for p in out if isinstance(p, dict)]


def live_arrays(ctx: dict) -> set:
    """The array versions (zarr array keys) a context points at."""
    return {key for p in partition_entries(ctx) for key in (p.get("arrays") or {}).values()}


def _in_arrays(key: str, arrays: set) -> bool:
    """Whether an object key lies inside one of the array versions (its zarr.json or a chunk)."""
    parts = key.split("/")
    return any("/".join(parts[:i]) in arrays for i in range(1, len(parts)))


def plan(store, run: dict, extra_live: set = frozenset(), drop_vis: bool = False) -> dict:
    """What gc would delete from one run: {"delete": [(key, size)], "kept_bytes", ...}."""
    rid = run["run_id"]
    final = store.get_json(run["context_key"]) if run.get("context_key") else {}
    live = live_arrays(final) | set(extra_live)
    protected = set()
    manifest_key = f"runs/{rid}/products/manifest.json"
    if store.exists(manifest_key):
        protected |= set(store.get_json(manifest_key).values()) | {manifest_key}
    protected |= set((final.get("package") or {}).values())
    objs = store.list(f"runs/{rid}/")
    # partition tars of the layout before the visibility store, from every context of the run
    old_tars = set()
    for o in objs:
        if o.object_name.startswith(f"runs/{rid}/context/") and o.object_name.endswith(".json"):
            try:
                ctx = store.get_json(o.object_name)
            except Exception:      # not a context (a fan-out record is a list); nothing to learn
                continue
            if isinstance(ctx, dict):
                old_tars |= {p["key"] for p in partition_entries(ctx) if "key" in p and "arrays" not in p}
    delete, kept = [], 0
    vis_prefix = f"runs/{rid}/vis/"
    # zarr's group documents (<partition>/zarr.json, <partition>/<ARRAY>/zarr.json) above
    # a kept version stay, so the partition still opens as a zarr hierarchy
    groups = {"/".join(a.split("/")[:i]) for a in live for i in range(1, a.count("/") + 1)}
    for o in objs:
        k = o.object_name
        if k.startswith(vis_prefix):
            group_doc = k.endswith("/zarr.json") and k[:-len("/zarr.json")] in groups
            gone = drop_vis or not (_in_arrays(k, live) or group_doc)
        else:
            gone = (k in old_tars or bool(INTERMEDIATE.search(k))) and k not in protected
        if gone:
            delete.append((k, o.size))
        else:
            kept += o.size
    return {"run_id": rid, "delete": delete, "kept_bytes": kept, "live_arrays": sorted(live),
            "drop_vis": drop_vis, "old_tars": len(old_tars & {k for k, _ in delete})}


def delete_keys(store, keys: list) -> None:
    from minio.deleteobjects import DeleteObject
    for i in range(0, len(keys), 1000):          # S3's DeleteObjects takes 1000 keys a request
        errors = list(store.client.remove_objects(store.bucket, [DeleteObject(k) for k in keys[i:i + 1000]]))
        if errors:
            raise RuntimeError(f"gc: {len(errors)} objects not deleted, first {errors[0]}")


def collect(store, run: dict, parent: dict | None = None, drop_vis_after_days: float | None = None,
            dry_run: bool = False, now: float | None = None) -> dict:
    """Apply the retention rule to one run record; returns the report (bytes freed...)."""
    rid = run["run_id"]
    if run.get("status") not in TERMINAL:
        return {"run_id": rid, "skipped": f"run is {run.get('status', '?')}, not ended"}
    extra = set()
    if run.get("parent_run_id"):
        if parent is None or parent.get("status") not in TERMINAL:
            return {"run_id": rid, "skipped": f"its MOUS run {run['parent_run_id']} has not ended"}
        if parent.get("context_key"):
            extra = live_arrays(store.get_json(parent["context_key"]))
    now = time.time() if now is None else now
    ended_days = (now - float(run.get("updated", now))) / 86400.0
    drop_vis = drop_vis_after_days is not None and ended_days >= drop_vis_after_days
    p = plan(store, run, extra, drop_vis)
    freed = sum(s for _, s in p["delete"])
    report = {"run_id": rid, "status": run["status"], "freed_bytes": freed, "objects": len(p["delete"]),
              "vis_objects": sum(1 for k, _ in p["delete"] if k.startswith(f"runs/{rid}/vis/")),
              "old_partition_tars": p["old_tars"], "kept_bytes": p["kept_bytes"], "dropped_vis": drop_vis,
              "dry_run": dry_run}
    if not dry_run and p["delete"]:
        delete_keys(store, [k for k, _ in p["delete"]])
        store.put_json(f"runs/{rid}/gc.json", dict(report, time=now, live_arrays=p["live_arrays"]))
    return report


async def run_records(cfg) -> list:
    """Every run record, from the NATS KV bucket the gateway keeps them in."""
    from . import bus
    nc, js = await bus.connect(cfg, "gc")
    try:
        kv = await bus.runs_kv(js)
        return await bus.kv_values(kv)
    finally:
        await nc.close()


def gc(cfg, store, run_ids: list | None = None, older_than_days: float = 0.0,
       drop_vis_after_days: float | None = None, dry_run: bool = False) -> list:
    """Collect the named runs (default: every ended run that ended older_than_days ago);
    returns one report per run."""
    import asyncio
    records = asyncio.run(run_records(cfg))
    by_id = {r["run_id"]: r for r in records}
    if run_ids:
        missing = [r for r in run_ids if r not in by_id]
        if missing:
            raise ValueError(f"no run {', '.join(missing)}")
        chosen = [by_id[r] for r in run_ids]
    else:
        now = time.time()
        chosen = [r for r in records if r.get("status") in TERMINAL
                  and now - float(r.get("updated", now)) >= older_than_days * 86400.0]
    return [collect(store, r, by_id.get(r.get("parent_run_id", "")), drop_vis_after_days, dry_run)
            for r in sorted(chosen, key=lambda r: r.get("created", 0))]
