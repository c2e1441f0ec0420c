"""The service shell every worker runs: take a stage request, run the stage, ack.

1. pull one StageRequest from the service's durable consumer;
2. load the context it names, run the stage in a thread while telling
   JetStream the message is in progress;
3. write the outputs and the new context to S3, publish a StageEvent,
   and only then ack. A worker that dies before the ack leaves the request
   to be redelivered; keys are deterministic, so a rerun rewrites the same
   objects and the gateway ignores the duplicate event.
A StageError (bad input, missing intent) or ParameterError fails the stage at once; any other
exception is retried until the delivery limit, then fails the stage with
the reason.

Outages of the servers are not failures of the stage (bus.is_infrastructure_error:
S3 refusing connections or answering 5xx, NATS away): the stage is run again here
with back-off for up to ALMAPIPE_INFRA_RETRY_S (default 600 s) without using up a
delivery, and the worker keeps its claim on the request meanwhile. The event of a
finished stage is published until NATS takes it (its result is already in S3), and
nothing a server does makes the worker process exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback

from . import bus, memory, metrics
from .warmup import CacheWarmer
from .store import CachedFetcher, ObjectStore
from ..config import CHUNK_FOLDER, Config
from ..imaging import frames
from ..stages import REGISTRY
from ..errors import ParameterError
from ..stages.base import QA, StageError, StageIO, visstore_for
from ..v1 import pipeline_pb2 as pb

# what a service's worker loads in a thread once it is ready, while it waits for its
# first stage: the imager's LSRK labels read astropy's Earth-orientation table, 1.5-2 s
# the first time in a process (a cube's join waited for it)
WARM_UPS = {"imager": frames.warm_up}

log = logging.getLogger("almapipe.worker")
WARMER = CacheWarmer()       # the process's chunk cache warming (platform/warmup.py)
# the services whose stages read visibilities in bulk (the importer writes them; the
# weblog's exportdata reads them only to export an MS, and a pod with a cache of its own
# would fetch the whole EB for nothing)
WARMING_SERVICES = ("calibrator", "imager")
# a stage's heartbeat interval: a third of the gateway's ALMAPIPE_HEARTBEAT_TIMEOUT_S at most
HEARTBEAT_S = float(os.environ.get("ALMAPIPE_HEARTBEAT_S", "10"))
INFRA_RETRY_S = float(os.environ.get("ALMAPIPE_INFRA_RETRY_S", "600"))


def _profiled(fn, req, label: str):
    """fn itself, or fn under cProfile when ALMAPIPE_PROFILE_DIR is set and the stage is
    among ALMAPIPE_PROFILE_STAGES (comma separated; empty: every stage): where a stage's
    seconds go on the machine and data it runs on (read the .prof files with pstats)."""
    where = os.environ.get("ALMAPIPE_PROFILE_DIR")
    wanted = set(filter(None, os.environ.get("ALMAPIPE_PROFILE_STAGES", "").split(",")))
    if not where or (wanted and req.stage not in wanted):
        return fn

    def run(*args):
        import cProfile
        prof = cProfile.Profile()
        try:
            return prof.runcall(fn, *args)
        finally:
            os.makedirs(where, exist_ok=True)
            prof.dump_stats(os.path.join(where, f"{req.run_id}_{req.stage_index:02d}_{label}.prof"))
    return run


def execute(store: ObjectStore, fetcher: CachedFetcher, req: pb.StageRequest, workroot: str) -> tuple:
    """Run one stage request; returns (new context key, QA, outputs, duration, fan-out
    or None). Raises on failure.

    A stage may ask to fan out by leaving ctx["fanout"] ({piece_stage, join_stage,
    items}); the gateway then runs one piece per item and the join. A piece
    (shard >= 1) does not advance the context: it leaves ctx["piece"], written as
    its result for the join. A join folds its QA, outputs and log into the stage
    it belongs to."""
    spec = REGISTRY[req.stage]
    service, fn = spec.service, spec.fn
    done = replay(store, req)
    if done is not None:
        return done
    ctx = store.get_json(req.context_key)
    if service in WARMING_SERVICES:
        # the visibilities this and later stages read, fetched in idle time; a warming
        # that cannot start costs the stages their cache hits, not their run
        try:
            WARMER.start(visstore_for(store, fetcher.chunk_dir), store.cfg,
                         ctx if "partitions" in spec.reads else {}, req.run_id)
        except Exception as exc:
            log.warning("the chunk cache's warming did not start: %s", exc)
    params = json.loads(req.params_json or "{}")
    # every declared parameter present: a stage body reads params["x"], its default declared once
    params = spec.with_defaults(params)
    workdir = tempfile.mkdtemp(prefix=f"{req.stage}-", dir=workroot)
    label = req.stage if req.shard == 0 else f"{req.stage}_{req.shard}"
    io = StageIO(store, fetcher, req.run_id, req.stage_index, label, workdir)
    t0 = time.time()
    try:
        qa = _profiled(fn, req, label)(ctx, params, io)
        duration = time.time() - t0
        metrics.VISIBILITIES.labels(service, req.stage).inc(io.visibilities)
        moved = io.bytes_moved()
        for direction in ("s3_read", "cache_read", "s3_written"):
            if moved.get(direction):
                metrics.VIS_BYTES.labels(service, req.stage, direction).inc(moved[direction])
        io.log_summary(qa, params, duration)
        span = {"started": round(t0, 3), "ended": round(t0 + duration, 3)}
        if req.shard > 0:
            key = f"runs/{req.run_id}/pieces/{req.stage_index:02d}_{req.stage}_{req.shard}.json"
            store.put_json(key, {"piece": ctx.get("piece"), "outputs": io.outputs, "log": io.log_lines,
                                 "qa_score": qa.score, "qa_reasons": qa.reasons, "qa_metrics": qa.metrics,
                                 "duration_s": round(duration, 3), "bytes": moved, **span})
            return key, qa, io.outputs, duration, None
        fanout = ctx.pop("fanout", None)
        if fanout:       # written before the context, whose existence says the stage is done
            store.put_json(f"{result_key(req)[:-5]}.fanout.json", fanout)
        log_key = store.put_bytes(io.key("stage.log"), "\n".join(io.log_lines).encode(), "text/plain")["key"]
        name = req.part_of or req.stage
        result = {"index": req.stage_index, "name": name, "service": service, "qa_score": round(qa.score, 4),
                  "qa_reasons": qa.reasons, "qa_metrics": qa.metrics, "duration_s": round(duration, 3),
                  "params": params, "outputs": io.outputs, "log": io.log_lines, "log_key": log_key,
                  "attempt": req.attempt, "bytes": moved, **span}
        before = next((r for r in ctx["stage_results"] if r["index"] == req.stage_index), None)
        if req.part_of and before is not None:      # a join: one stage, one result
            qa.score = min(qa.score, before["qa_score"])
            qa.reasons = before["qa_reasons"] + qa.reasons
            qa.metrics = before.get("qa_metrics", []) + qa.metrics
            result.update(qa_score=round(qa.score, 4), qa_reasons=qa.reasons, qa_metrics=qa.metrics,
                          params=before["params"],
                          outputs=before["outputs"] + io.outputs, log=before["log"] + io.log_lines,
                          duration_s=round(before["duration_s"] + duration, 3),
                          **joined_pieces(store, before, moved, params.get("pieces") or []))
        ctx["stage_results"] = [r for r in ctx["stage_results"] if r["index"] != req.stage_index] + [result]
        ctx["qa"][name] = {"score": qa.score, "reasons": qa.reasons}
        ctx["manifest"] = [m for m in ctx["manifest"] if m.get("stage") != req.stage] + io.outputs
        new_key = result_key(req)
        store.put_json(new_key, ctx)
        return new_key, qa, io.outputs, duration, fanout
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        memory.release()            # an idle worker holds only what it uses


def joined_pieces(store: ObjectStore, before: dict, moved: dict, piece_keys: list) -> dict:
    """What a joined stage's result says of all its parts (the stage, its pieces on
    whichever workers took them, the join): the visibility-store bytes they moved
    together, the seconds the pieces worked (summed over workers), and the stage's wall
    time from its start to the join's end ("started", "ended")."""
    pieces = [store.get_json(k) for k in piece_keys]
    total = dict(before.get("bytes") or {})
    for part in [moved] + [p.get("bytes") or {} for p in pieces]:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    out = {"bytes": total, "pieces": len(pieces),
           "pieces_s": round(sum(p.get("duration_s", 0.0) for p in pieces), 3)}
    if "started" in before:
        out["started"] = before["started"]
    return out


def result_key(req: pb.StageRequest) -> str:
    """Where a stage execution's result goes: the new context (a piece: its result), the
    last thing the execution writes."""
    if req.shard > 0:
        return f"runs/{req.run_id}/pieces/{req.stage_index:02d}_{req.stage}_{req.shard}.json"
    return f"runs/{req.run_id}/context/{req.stage_index:02d}_{req.stage}.json"


def replay(store: ObjectStore, req: pb.StageRequest) -> tuple | None:
    """The result of a stage execution that has already finished, or None. JetStream
    redelivers a request whose worker died after writing its result but before
    acknowledging it, and one the gateway dispatched again when the heartbeats stopped:
    running the stage again would rewrite its objects with other bytes (times in tar
    headers, FITS dates, logs) under the keys the run has recorded. Instead the finished
    execution's result is published again (the gateway ignores a duplicate)."""
    key = result_key(req)
    if not store.exists(key):
        return None
    log.info("stage %s of run %s already done (%s): its result is published again", req.stage, req.run_id, key)
    doc = store.get_json(key)
    if req.shard > 0:
        return key, QA(doc["qa_score"], list(doc["qa_reasons"]), list(doc.get("qa_metrics", []))), doc.get("outputs", []), 0.0, None
    result = next((r for r in doc["stage_results"] if r["index"] == req.stage_index), {})
    fanout_key = f"{key[:-5]}.fanout.json"
    fanout = store.get_json(fanout_key) if store.exists(fanout_key) else None
    qa = QA(result.get("qa_score", 1.0), list(result.get("qa_reasons", [])), list(result.get("qa_metrics", [])))
    return key, qa, result.get("outputs", []), float(result.get("duration_s", 0.0)), fanout


LOCK_GRACE_S = 30.0     # a work folder's lock file younger than this may not be locked yet


def claim_workroot(root: str) -> tuple[str, object]:
    """This worker process's own folder under the service's work root, after sweeping
    the folders of workers that are gone; returns (folder, the open lock file, to be
    kept open for the life of the process).

    Several workers of a service share the root, and a worker killed mid-stage (SIGKILL,
    OOM, a lost node) never runs its cleanup. So each worker holds an exclusive flock on
    ``w-<pid>-<random>.lock`` beside its folder ``w-<pid>-<random>``: the kernel releases
    the lock when the process dies, however it dies, and a pid reused later cannot make a
    dead worker's folder look alive. At start a worker removes every folder whose lock
    it can take, and anything else in the root (stage folders of the layout before this
    one); a live sibling's lock cannot be taken, so its folder stays."""
    import fcntl
    import uuid
    os.makedirs(root, exist_ok=True)
    name = f"w-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # the lock before the folder: a folder without its lock file is never a live worker's
    lock = open(os.path.join(root, name + ".lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    freed = sweep_workroot(root, keep=name)
    if freed:
        log.info("work root %s: removed %d folders of workers that are gone (%.1f MB)", root, len(freed),
                 sum(n for _, n in freed) / 1e6)
    folder = os.path.join(root, name)
    os.makedirs(folder)
    return folder, lock


def sweep_workroot(root: str, keep: str) -> list:
    """Remove what workers that are gone left under root (see claim_workroot); returns
    [(path, bytes)] of what was removed."""
    import fcntl
    freed = []
    entries = set(os.listdir(root))
    for entry in sorted(entries):
        base = entry[:-5] if entry.endswith(".lock") else entry
        if base == keep:
            continue
        lock_path = os.path.join(root, base + ".lock")
        if entry.endswith(".lock") or base + ".lock" in entries:
            try:
                fd = open(lock_path, "r+")
            except FileNotFoundError:      # its owner or another sweeper got there first
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:    # a live worker's
                    continue
                if time.time() - os.fstat(fd.fileno()).st_mtime < LOCK_GRACE_S:
                    continue               # just created: its owner is about to lock it
                path = os.path.join(root, base)
                if os.path.exists(path):
                    freed.append((path, _du(path)))
                    shutil.rmtree(path, ignore_errors=True)
                os.unlink(lock_path)       # last, while still locked
            finally:
                fd.close()
        else:                              # no lock file: a folder of the layout before
            path = os.path.join(root, entry)
            freed.append((path, _du(path)))
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    return freed


def _du(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path) if os.path.exists(path) else 0
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(d, f)).st_size
    return total


class Worker:
    def __init__(self, service: str, cfg: Config):
        self.service = service
        self.cfg = cfg
        self.name = f"{service}@{socket.gethostname()}:{os.getpid()}"
        self.stopping = False

    async def run(self) -> None:
        metrics.serve(self.cfg.metrics_port)
        self.store = ObjectStore(self.cfg)
        # directories in a folder of the service's, visibility chunks in one of the host's
        # for every service: the imager reads the target's chunks the calibrator fetched
        self.fetcher = CachedFetcher(self.store, os.path.join(self.cfg.cache_dir, self.service),
                                     chunk_dir=os.path.join(self.cfg.cache_dir, CHUNK_FOLDER))
        # <data_dir>/work/<service>/w-<pid>-<random>: stage folders under the worker's own,
        # which the next worker to start removes if this one is killed
        self.workroot, self._workroot_lock = claim_workroot(
            os.path.join(self.cfg.data_dir, "work", self.service))
        # a worker that starts while S3 or NATS is away waits for them (a supervisor
        # restarting it in a loop would do the same, noisier)
        wait = 1.0
        while not self.stopping:
            try:
                await asyncio.to_thread(self.store.ensure_buckets)
                self.nc, self.js = await bus.connect(self.cfg, self.name)
                sub = await bus.work_consumer(self.js, self.service, self.cfg)
                break
            except Exception as exc:
                log.warning("%s: cannot start yet (%s); trying again in %.0f s", self.name, str(exc)[:300], wait)
                await asyncio.sleep(wait)
                wait = min(2 * wait, 15.0)
        else:
            return
        log.info("%s ready", self.name)
        if self.service in WARM_UPS:
            threading.Thread(target=_warm_up, args=(WARM_UPS[self.service],), daemon=True, name="warm-up").start()
        while not self.stopping:
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except (asyncio.TimeoutError, TimeoutError):
                continue
            except Exception as exc:   # reconnecting: wait and retry
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                try:
                    await self.handle(msg)
                except Exception:   # never let one request end the process; it is redelivered
                    log.exception("%s: handling %s failed", self.name, msg.subject)
        try:
            await self.nc.drain()
        except Exception as exc:
            log.warning("drain: %s", exc)

    async def publish(self, req: pb.StageRequest, status: int, **kw) -> None:
        """Publish a StageEvent, retrying through a NATS outage until it is stored."""
        ev = pb.StageEvent(run_id=req.run_id, stage_index=req.stage_index, stage=req.stage, status=status,
                           attempt=req.attempt, time_unix=time.time(), worker=self.name, shard=req.shard, **kw)
        name = pb.StageStatus.Name(status).replace("STAGE_STATUS_", "").lower()
        msg_id = f"{req.run_id}-{req.stage_index}-{req.stage}-{req.shard}-{req.attempt}-{name}"
        await bus.publish_retrying(self.js, bus.event_subject(req.run_id, req.stage, name), ev.SerializeToString(),
                                   msg_id, f"{name} event of {req.run_id}/{req.stage}")

    async def _settle(self, msg, how: str, **kw) -> None:
        """ack / nak / term; a lost one only means the request comes back (a rerun
        rewrites the same keys, the gateway ignores the duplicate event)."""
        try:
            await getattr(msg, how)(**kw)
        except Exception as exc:
            log.warning("%s of %s failed (%s): it will be redelivered", how, msg.subject, exc)

    async def _execute(self, req: pb.StageRequest):
        """execute() in a thread; an infrastructure error is retried with back-off for up
        to INFRA_RETRY_S (not counted against the delivery limit), then raised."""
        t0, wait = time.monotonic(), 1.0
        while True:
            try:
                return await asyncio.to_thread(execute, self.store, self.fetcher, req, self.workroot)
            except Exception as exc:
                if not bus.is_infrastructure_error(exc) or self.stopping or time.monotonic() - t0 > INFRA_RETRY_S:
                    raise
                metrics.INFRA_RETRIES.labels(self.service).inc()
                log.warning("%s stage %s of run %s: infrastructure error (%s: %s); running it again in %.0f s, "
                            "not counted as a failure", self.name, req.stage, req.run_id, type(exc).__name__,
                            str(exc)[:200], wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 15.0)   # an outage over, the stage resumes within 15 s

    async def handle(self, msg) -> None:
        req = pb.StageRequest()
        try:
            req.ParseFromString(msg.data)
        except Exception:
            log.error("undecodable stage request on %s; terminated", msg.subject)
            await self._settle(msg, "term")
            return
        delivered = msg.metadata.num_delivered
        req.attempt = delivered
        if req.stage not in REGISTRY:
            await self.publish(req, pb.STAGE_STATUS_FAILED, message=f"unknown stage {req.stage[:60]!r}")
            await self._settle(msg, "term")
            return
        metrics.STAGES_STARTED.labels(self.service, req.stage).inc()
        heartbeat = asyncio.create_task(self._heartbeat(msg, req))
        t0 = time.time()
        try:
            key, qa, outputs, duration, fanout = await self._execute(req)
        except Exception as exc:
            wrong_request = isinstance(exc, (StageError, ParameterError))   # retrying cannot help
            final = wrong_request or delivered >= self.cfg.max_deliver
            if isinstance(exc, ParameterError):
                reason = f"{req.stage}: {exc}"
            elif isinstance(exc, StageError):
                reason = str(exc)
            else:
                reason = f"{type(exc).__name__}: {exc}"
            log.error("%s stage %s of run %s failed (attempt %d%s): %s", self.name, req.stage, req.run_id,
                      delivered, ", final" if final else "", reason)
            if not wrong_request:
                log.warning(traceback.format_exc())
            metrics.STAGE_FAILURES.labels(self.service, req.stage, str(final).lower()).inc()
            metrics.STAGE_DURATION.labels(self.service, req.stage, "failed").observe(time.time() - t0)
            try:    # the heartbeat goes on while the event waits for NATS
                if final:
                    await self.publish(req, pb.STAGE_STATUS_FAILED, message=reason, duration_s=time.time() - t0)
                    await self._settle(msg, "term")
                else:
                    await self.publish(req, pb.STAGE_STATUS_RETRYING, message=reason)
                    await self._settle(msg, "nak", delay=min(2.0 * delivered, 10.0))
            finally:
                heartbeat.cancel()
            return
        metrics.STAGE_DURATION.labels(self.service, req.stage, "succeeded").observe(duration)
        try:
            await self.publish(req, pb.STAGE_STATUS_SUCCEEDED, context_key=key, qa_score=qa.score,
                               qa_reasons=qa.reasons, duration_s=duration,
                               fanout_json=json.dumps(fanout) if fanout else "",
                               outputs=[pb.Output(name=o["name"], key=o["key"], sha256=o["sha256"], size=o["size"])
                                        for o in outputs])
            await self._settle(msg, "ack")
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, msg, req: pb.StageRequest) -> None:
        """Every HEARTBEAT_S (and at once): tell JetStream the request is still being worked
        on, and the gateway who works on it (core NATS, heartbeat.<service>), so a worker
        that dies mid-stage is noticed by the gateway. Through a NATS outage keep trying: a
        heartbeat that stopped would let the request go to another worker."""
        beat = json.dumps({"run_id": req.run_id, "stage_index": req.stage_index, "stage": req.stage,
                           "shard": req.shard, "part_of": req.part_of, "worker": self.name}).encode()
        while True:
            try:
                await self.nc.publish(f"heartbeat.{self.service}", beat)
            except Exception as exc:
                log.debug("heartbeat: %s", exc)
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await msg.in_progress()
            except Exception as exc:
                log.debug("heartbeat: %s", exc)


def _warm_up(fn) -> None:
    try:
        fn()
    except Exception as exc:        # the stage that needs it loads it then
        log.warning("warm-up %s failed: %s", fn.__name__, exc)


def main(service: str) -> None:
    logging.basicConfig(level=os.environ.get("ALMAPIPE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    memory.tune_malloc()            # before the worker's threads start
    worker = Worker(service, Config.from_env())
    loop = asyncio.new_event_loop()

    def stop(*_):
        worker.stopping = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.run_until_complete(worker.run())
