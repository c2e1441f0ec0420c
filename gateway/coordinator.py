"""Run coordination: run state in JetStream KV, stage dispatch, event handling.

The coordinator is event-driven: SubmitRun writes the run and dispatches its
first stage; each StageEvent from a worker (read from the durable EVENTS
consumer) advances the run. All state lives in KV and S3, so a restarted
gateway picks up where it stopped: unhandled events are redelivered, and a
stage recorded as pending is dispatched again (JetStream's duplicate window
drops a request published twice).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from almapipe import recipes
from almapipe.platform import bus, metrics
from almapipe.platform.store import ObjectStore
from almapipe.stages.base import new_context
from almapipe.v1 import pipeline_pb2 as pb

log = logging.getLogger("almapipe.gateway")
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


class RequestError(ValueError):
    """A malformed or impossible request; becomes INVALID_ARGUMENT / NOT_FOUND."""

    def __init__(self, msg: str, not_found: bool = False):
        super().__init__(msg)
        self.not_found = not_found


class Coordinator:
    def __init__(self, cfg, store: ObjectStore):
        self.cfg = cfg
        self.store = store
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        self.nc, self.js = await bus.connect(self.cfg, "gateway")
        self.kv = await bus.runs_kv(self.js)
        self.events = await bus.gateway_event_consumer(self.js)
        await self.resume()
        self.task = asyncio.create_task(self._event_loop())

    async def stop(self) -> None:
        self.task.cancel()
        await self.nc.drain()

    # ------------------------------------------------------------ run state
    async def load(self, run_id: str) -> dict:
        try:
            entry = await self.kv.get(run_id)
        except Exception:
            raise RequestError(f"no run {run_id!r}", not_found=True) from None
        return json.loads(entry.value)

    async def save(self, run: dict) -> None:
        run["updated"] = time.time()
        await self.kv.put(run["run_id"], json.dumps(run).encode())

    async def list_runs(self, limit: int) -> list:
        try:
            keys = await self.kv.keys()
        except Exception:   # no keys yet
            return []
        runs = [await self.load(k) for k in keys]
        runs.sort(key=lambda r: r["created"], reverse=True)
        return runs[:limit or len(runs)]

    # ------------------------------------------------------------ API actions
    async def submit(self, req: pb.SubmitRunRequest, recipe_doc: dict | None = None, owner: str = "") -> dict:
        if not req.input_key:
            raise RequestError("input_key is required: upload the input to the raw bucket first")
        if not self.store.exists(req.input_key, bucket=self.store.raw_bucket):
            raise RequestError(f"input {req.input_key!r} not found in bucket {self.store.raw_bucket}",
                               not_found=True)
        try:
            recipe = recipes.validate(recipe_doc) if recipe_doc else recipes.load(req.recipe or None)
            recipe = recipes.apply_overrides(recipe, dict(req.parameters))
        except recipes.RecipeError as exc:
            raise RequestError(str(exc)) from exc
        run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        ctx = new_context(run_id, recipe, req.input_key,
                          {"flag_template": req.flag_template, "cont_dat": req.cont_dat})
        ctx_key = f"runs/{run_id}/context/init.json"
        self.store.put_json(ctx_key, ctx)
        self.store.put_json(f"runs/{run_id}/recipe.json", recipe)
        run = {"run_id": run_id, "status": "RUNNING", "recipe": recipe["name"], "input_key": req.input_key,
               "label": req.label, "owner": owner, "created": time.time(), "updated": time.time(), "current_stage": 0,
               "context_key": ctx_key, "error": "",
               "stages": [{"index": i, "name": s["stage"], "service": s["service"], "status": "PENDING",
                           "qa_score": -1.0, "qa_reasons": [], "duration_s": 0.0, "attempts": 0, "error": "",
                           "params": s["params"]} for i, s in enumerate(recipe["stages"])]}
        async with self.lock:
            await self.save(run)
            await self.dispatch(run)
        metrics.RUNS_ACTIVE.inc()
        log.info("run %s submitted: recipe %s on %s", run_id, recipe["name"], req.input_key)
        return run

    async def cancel(self, run_id: str, by: str = "") -> dict:
        async with self.lock:
            run = await self.load(run_id)
            if run["status"] not in TERMINAL:
                run["status"] = "CANCELLED"
                run["error"] = f"cancelled by {by}" if by else "cancelled by request"
                await self.finish(run)
        return run

    # ------------------------------------------------------------ dispatch
    async def dispatch(self, run: dict) -> None:
        st = run["stages"][run["current_stage"]]
        await self.publish_request(run, st, st["name"], st["params"], run["context_key"])
        st["status"] = "DISPATCHED"
        await self.save(run)
        await self.run_event(run, pb.STAGE_STATUS_DISPATCHED, st, f"dispatched to {st['service']}")

    async def publish_request(self, run: dict, st: dict, stage: str, params: dict, context_key: str,
                              shard: int = 0) -> None:
        part_of = "" if stage == st["name"] else st["name"]
        req = pb.StageRequest(run_id=run["run_id"], stage_index=st["index"], stage=stage, service=st["service"],
                              params_json=json.dumps(params), context_key=context_key,
                              input_key=run["input_key"], shard=shard, part_of=part_of)
        # msg id: JetStream drops the same request published twice (gateway restart)
        msg_id = f"{run['run_id']}-{st['index']}" + (f"-{stage}-{shard}" if part_of else "")
        await self.js.publish(bus.work_subject(st["service"], stage), req.SerializeToString(),
                              headers={"Nats-Msg-Id": msg_id})

    async def fan_out(self, run: dict, st: dict, ev) -> None:
        """The stage asked for pieces in parallel (ev.fanout_json): dispatch one request
        per item; the join follows when all have succeeded (piece_done)."""
        fan = json.loads(ev.fanout_json)
        old = st.get("fanout") or {}
        # the same event again (redelivered after a gateway restart): keep the pieces done;
        # requests already published are dropped by their Nats-Msg-Id
        results = old.get("results", {}) if old.get("context_key") == ev.context_key else {}
        st["fanout"] = {"piece": fan["piece_stage"], "join": fan["join_stage"], "n": len(fan["items"]),
                        "context_key": ev.context_key, "results": results}
        st["status"] = "DISPATCHED"
        await self.save(run)
        for i, item in enumerate(fan["items"], 1):
            await self.publish_request(run, st, fan["piece_stage"], dict(st["params"], piece=item),
                                       ev.context_key, shard=i)
        await self.run_event(run, pb.STAGE_STATUS_DISPATCHED, st,
                             f"{len(fan['items'])} pieces of {st['name']} dispatched to {st['service']}")

    async def piece_done(self, run: dict, st: dict, ev) -> None:
        fan = st["fanout"]
        fan["results"][str(ev.shard)] = ev.context_key
        if len(fan["results"]) == fan["n"]:
            pieces = [fan["results"][str(i)] for i in range(1, fan["n"] + 1)]
            await self.publish_request(run, st, fan["join"], dict(st["params"], pieces=pieces), fan["context_key"])
        await self.save(run)

    async def run_event(self, run: dict, status: int, st: dict | None, message: str) -> None:
        ev = pb.StageEvent(run_id=run["run_id"], stage_index=st["index"] if st else -1,
                           stage=st["name"] if st else bus.RUN_EVENT_STAGE, status=status, message=message,
                           time_unix=time.time(), run_status=getattr(pb, "RUN_STATUS_" + run["status"]))
        subject = bus.event_subject(run["run_id"], bus.RUN_EVENT_STAGE, run["status"].lower())
        await self.js.publish(subject, ev.SerializeToString())

    async def resume(self) -> None:
        """After a restart: re-dispatch runs whose current stage was never dispatched."""
        for run in await self.list_runs(0):
            if run["status"] == "RUNNING" and run["stages"][run["current_stage"]]["status"] == "PENDING":
                log.info("resuming run %s at stage %s", run["run_id"], run["stages"][run["current_stage"]]["name"])
                await self.dispatch(run)

    # ------------------------------------------------------------ events
    async def _event_loop(self) -> None:
        while True:
            try:
                msgs = await self.events.fetch(10, timeout=1.0)
            except (asyncio.TimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                return
            except Exception as exc:
                log.warning("event fetch failed: %s", exc)
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                try:
                    await self.handle_event(msg.data)
                    await msg.ack()
                except Exception:
                    log.exception("handling event %s failed; will be redelivered", msg.subject)
                    await msg.nak(delay=2)

    async def handle_event(self, data: bytes) -> None:
        ev = pb.StageEvent()
        ev.ParseFromString(data)
        if ev.stage == bus.RUN_EVENT_STAGE:
            return
        async with self.lock:
            try:
                run = await self.load(ev.run_id)
            except RequestError:
                return
            if run["status"] != "RUNNING" or ev.stage_index != run["current_stage"]:
                return   # stale or duplicate
            st = run["stages"][ev.stage_index]
            st["attempts"] = max(st["attempts"], ev.attempt)
            fan = st.get("fanout")
            if fan and ev.stage == fan["piece"] and ev.status == pb.STAGE_STATUS_SUCCEEDED:
                await self.piece_done(run, st, ev)
                return
            if ev.status == pb.STAGE_STATUS_SUCCEEDED and ev.fanout_json and ev.stage == st["name"] \
                    and not run.get("finalizing"):
                await self.fan_out(run, st, ev)
                return
            if ev.status == pb.STAGE_STATUS_RETRYING:
                st["status"] = "RETRYING"
                st["error"] = ev.message
                await self.save(run)
            elif ev.status == pb.STAGE_STATUS_FAILED:
                st.update(status="FAILED", error=ev.message, duration_s=ev.duration_s, qa_score=0.0,
                          qa_reasons=[ev.message])
                if run.get("finalizing"):   # the failure WebLog itself failed
                    run["status"] = "FAILED"
                    run["error"] += f"; the WebLog could not be made: {ev.message}"
                    await self.finish(run)
                    return
                run["error"] = f"stage {st['index']} ({st['name']}) failed: {ev.message}"
                for later in run["stages"][st["index"] + 1:]:
                    later["status"] = "SKIPPED"
                if not await self.finalize_with_weblog(run, st):
                    run["status"] = "FAILED"
                    await self.finish(run)
            elif ev.status == pb.STAGE_STATUS_SUCCEEDED:
                st.update(status="SUCCEEDED", qa_score=ev.qa_score, qa_reasons=list(ev.qa_reasons),
                          duration_s=ev.duration_s, error="")
                run["context_key"] = ev.context_key
                if run.get("finalizing"):    # the WebLog of a failed run is done
                    run["status"] = "FAILED"
                    await self.finish(run)
                elif run["current_stage"] + 1 < len(run["stages"]):
                    run["current_stage"] += 1
                    await self.save(run)
                    await self.dispatch(run)
                else:
                    run["status"] = "SUCCEEDED"
                    await self.finish(run)

    async def finalize_with_weblog(self, run: dict, failed: dict) -> bool:
        """After a failure, still render the WebLog (and package what exists), as
        the ALMA pipeline does: the run stays RUNNING until that is done, then
        ends FAILED. Returns False when the recipe has no weblog stage to run."""
        wl = next((s for s in run["stages"] if s["name"] == "weblog" and s["index"] > failed["index"]), None)
        if wl is None:
            return False
        run["finalizing"] = True
        run["current_stage"] = wl["index"]
        wl["status"] = "PENDING"
        wl["params"] = dict(wl["params"], failure={"index": failed["index"], "name": failed["name"],
                                                   "service": failed["service"], "error": failed["error"]})
        await self.save(run)
        await self.dispatch(run)
        return True

    async def finish(self, run: dict) -> None:
        """Write summary.json and the products manifest, then record the run's end
        (run["status"] already says which) and announce it. In that order: a client that
        sees the run ended can fetch its products at once. A gateway that dies in
        between leaves the run RUNNING; the redelivered event finishes it again."""
        try:
            await asyncio.to_thread(self.write_products, run)
        except Exception as exc:
            log.exception("writing products of %s failed", run["run_id"])
            run["error"] = (run["error"] + "; " if run["error"] else "") + f"products: {exc}"
        await self.save(run)
        metrics.RUNS.labels(run["status"].lower()).inc()
        metrics.RUNS_ACTIVE.dec()
        await self.run_event(run, pb.STAGE_STATUS_UNSPECIFIED, None, run["error"] or run["status"].lower())
        log.info("run %s %s %s", run["run_id"], run["status"], run["error"])

    def write_products(self, run: dict) -> None:
        ctx = self.store.get_json(run["context_key"])
        summary = build_summary(run, ctx)
        pkg = dict(ctx.get("package", {}))
        pkg["summary.json"] = self.store.put_json(f"runs/{run['run_id']}/products/summary.json", summary)["key"]
        self.store.put_json(f"runs/{run['run_id']}/products/manifest.json", pkg)


def build_summary(run: dict, ctx: dict) -> dict:
    return {
        "run_id": run["run_id"], "status": run["status"], "error": run["error"], "recipe": run["recipe"],
        "input": run["input_key"],
        "stages": [{"name": s["name"], "status": s["status"], "qa_score": s["qa_score"],
                    "qa_reasons": s["qa_reasons"], "duration_s": s["duration_s"], "attempts": s["attempts"]}
                   for s in run["stages"]],
        "fluxscale": [{k: r[k] for k in ("field", "spw", "flux_jy", "flux_err_jy", "n")}
                      for r in ctx.get("fluxscale", [])],
        "images": [{k: img.get(k) for k in ("file", "field", "spw", "specmode", "peak_jy_per_beam",
                                            "rms_jy_per_beam", "theoretical_rms_jy_per_beam", "beam_arcsec",
                                            "qa_score", "chans", "peak_channel", "aggregate", "pointings", "dr_correction",
                                            "dirty_dynamic_range", "dynamic_range")}
                   for img in ctx.get("images", [])],
        "continuum": ctx.get("continuum", []),
        "refant": ctx.get("refant", {}).get("refant"),
        "calibration": {k: ctx.get(k) for k in ("tsys", "antpos", "wvr", "flags", "spwphaseup", "bandpass_phaseup",
                                                "callibrary")},
        "fields": ctx.get("fields", []),
    }
