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
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback

from . import bus, metrics
from .store import CachedFetcher, ObjectStore
from ..config import Config
from ..stages import REGISTRY
from ..errors import ParameterError
from ..stages.base import StageError, StageIO
from ..v1 import pipeline_pb2 as pb

log = logging.getLogger("almapipe.worker")
HEARTBEAT_S = 10.0


def execute(store: ObjectStore, fetcher: CachedFetcher, req: pb.StageRequest, workroot: str) -> tuple:
    """Run one stage request; returns (new context key, QA, outputs, duration, fan-out
    or None). Raises on failure.

    A stage may ask to fan out by leaving ctx["fanout"] ({piece_stage, join_stage,
    items}); the gateway then runs one piece per item and the join. A piece
    (shard >= 1) does not advance the context: it leaves ctx["piece"], written as
    its result for the join. A join folds its QA, outputs and log into the stage
    it belongs to."""
    service, fn = REGISTRY[req.stage]
    ctx = store.get_json(req.context_key)
    params = json.loads(req.params_json or "{}")
    workdir = tempfile.mkdtemp(prefix=f"{req.stage}-", dir=workroot)
    label = req.stage if req.shard == 0 else f"{req.stage}_{req.shard}"
    io = StageIO(store, fetcher, req.run_id, req.stage_index, label, workdir)
    t0 = time.time()
    try:
        qa = fn(ctx, params, io)
        duration = time.time() - t0
        metrics.VISIBILITIES.labels(service, req.stage).inc(io.visibilities)
        io.log_summary(qa, params, duration)
        if req.shard > 0:
            key = f"runs/{req.run_id}/pieces/{req.stage_index:02d}_{req.stage}_{req.shard}.json"
            store.put_json(key, {"piece": ctx.get("piece"), "outputs": io.outputs, "log": io.log_lines,
                                 "qa_score": qa.score, "qa_reasons": qa.reasons})
            return key, qa, io.outputs, duration, None
        fanout = ctx.pop("fanout", None)
        log_key = store.put_bytes(io.key("stage.log"), "\n".join(io.log_lines).encode(), "text/plain")["key"]
        name = req.part_of or req.stage
        result = {"index": req.stage_index, "name": name, "service": service, "qa_score": round(qa.score, 4),
                  "qa_reasons": qa.reasons, "duration_s": round(duration, 3), "params": params,
                  "outputs": io.outputs, "log": io.log_lines, "log_key": log_key, "attempt": req.attempt}
        before = next((r for r in ctx["stage_results"] if r["index"] == req.stage_index), None)
        if req.part_of and before is not None:      # a join: one stage, one result
            qa.score = min(qa.score, before["qa_score"])
            qa.reasons = before["qa_reasons"] + qa.reasons
            result.update(qa_score=round(qa.score, 4), qa_reasons=qa.reasons, params=before["params"],
                          outputs=before["outputs"] + io.outputs, log=before["log"] + io.log_lines,
                          duration_s=round(before["duration_s"] + duration, 3))
        ctx["stage_results"] = [r for r in ctx["stage_results"] if r["index"] != req.stage_index] + [result]
        ctx["qa"][name] = {"score": qa.score, "reasons": qa.reasons}
        ctx["manifest"] = [m for m in ctx["manifest"] if m.get("stage") != req.stage] + io.outputs
        new_key = f"runs/{req.run_id}/context/{req.stage_index:02d}_{req.stage}.json"
        store.put_json(new_key, ctx)
        return new_key, qa, io.outputs, duration, fanout
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class Worker:
    def __init__(self, service: str, cfg: Config):
        self.service = service
        self.cfg = cfg
        self.name = f"{service}@{socket.gethostname()}:{os.getpid()}"
        self.stopping = False

    async def run(self) -> None:
        metrics.serve(self.cfg.metrics_port)
        self.store = ObjectStore(self.cfg)
        self.store.ensure_buckets()
        self.fetcher = CachedFetcher(self.store, os.path.join(self.cfg.cache_dir, self.service))
        self.workroot = os.path.join(self.cfg.data_dir, "work", self.service)
        os.makedirs(self.workroot, exist_ok=True)
        self.nc, self.js = await bus.connect(self.cfg, self.name)
        sub = await bus.work_consumer(self.js, self.service, self.cfg)
        log.info("%s ready", self.name)
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
                await self.handle(msg)
        await self.nc.drain()

    async def publish(self, req: pb.StageRequest, status: int, **kw) -> None:
        ev = pb.StageEvent(run_id=req.run_id, stage_index=req.stage_index, stage=req.stage, status=status,
                           attempt=req.attempt, time_unix=time.time(), worker=self.name, shard=req.shard, **kw)
        name = pb.StageStatus.Name(status).replace("STAGE_STATUS_", "").lower()
        await self.js.publish(bus.event_subject(req.run_id, req.stage, name), ev.SerializeToString())

    async def handle(self, msg) -> None:
        req = pb.StageRequest()
        try:
            req.ParseFromString(msg.data)
        except Exception:
            log.error("undecodable stage request on %s; terminated", msg.subject)
            await msg.term()
            return
        delivered = msg.metadata.num_delivered
        req.attempt = delivered
        if req.stage not in REGISTRY:
            await self.publish(req, pb.STAGE_STATUS_FAILED, message=f"unknown stage {req.stage!r}")
            await msg.term()
            return
        metrics.STAGES_STARTED.labels(self.service, req.stage).inc()
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        t0 = time.time()
        try:
            key, qa, outputs, duration, fanout = await asyncio.to_thread(execute, self.store, self.fetcher, req,
                                                                         self.workroot)
        except Exception as exc:
            heartbeat.cancel()
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
            if final:
                await self.publish(req, pb.STAGE_STATUS_FAILED, message=reason, duration_s=time.time() - t0)
                await msg.term()
            else:
                await self.publish(req, pb.STAGE_STATUS_RETRYING, message=reason)
                await msg.nak(delay=min(2.0 * delivered, 10.0))
            return
        heartbeat.cancel()
        metrics.STAGE_DURATION.labels(self.service, req.stage, "succeeded").observe(duration)
        await self.publish(req, pb.STAGE_STATUS_SUCCEEDED, context_key=key, qa_score=qa.score,
                           qa_reasons=qa.reasons, duration_s=duration, fanout_json=json.dumps(fanout) if fanout else "",
                           outputs=[pb.Output(name=o["name"], key=o["key"], sha256=o["sha256"], size=o["size"])
                                    for o in outputs])
        await msg.ack()

    async def _heartbeat(self, msg) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await msg.in_progress()
            except Exception:
                return


def main(service: str) -> None:
    logging.basicConfig(level=os.environ.get("ALMAPIPE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    worker = Worker(service, Config.from_env())
    loop = asyncio.new_event_loop()

    def stop(*_):
        worker.stopping = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.run_until_complete(worker.run())
