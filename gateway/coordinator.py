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
import os
import re
import time
import uuid

from almapipe import limits, recipes
from almapipe.errors import ParameterError
from almapipe.platform import bus, inputs as local_inputs, metrics
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


# bounds on a request's fields: what is stored in a run record (KV values are small)
# or in its context stays small, and nothing is echoed back at length
FIELD_MAX = {"input_key": 1024, "recipe": 64, "label": 200, "flag_template": 256 << 10, "cont_dat": 256 << 10,
             "mous_id": 200}
MAX_EBS = 50
RECIPE_NAME = re.compile(r"^[a-z0-9_]+$")
RUN_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
MAX_PARAMETERS, MAX_PARAMETER_BYTES = 200, 64 << 10
DEFAULT_PAGE, MAX_PAGE = 50, 1000
# a stage's worker sends a heartbeat every 10 s; three missed: it is presumed dead
HEARTBEAT_TIMEOUT_S = float(os.environ.get("ALMAPIPE_HEARTBEAT_TIMEOUT_S", "30"))


def check_submit(req) -> None:
    """Refuse a malformed SubmitRunRequest, naming the field (INVALID_ARGUMENT)."""
    if not req.input_key and not req.input_keys:
        raise RequestError("input_key (or input_keys, the EBs of an MOUS) is required: upload the input to the "
                           "raw bucket first (Upload)")
    if req.input_key and req.input_keys:
        raise RequestError("input_key and input_keys: give one EB as input_key, or an MOUS's EBs as input_keys")
    for field, cap in FIELD_MAX.items():
        if len(getattr(req, field)) > cap:
            raise RequestError(f"{field}: {len(getattr(req, field))} characters, at most {cap}")
    if len(req.input_keys) > MAX_EBS:
        raise RequestError(f"input_keys: {len(req.input_keys)} EBs, at most {MAX_EBS}")
    if len(set(req.input_keys)) != len(req.input_keys):
        raise RequestError("input_keys: the same execution block is given twice")
    for key in list(req.input_keys) or [req.input_key]:
        if len(key) > FIELD_MAX["input_key"]:
            raise RequestError(f"input_key: {len(key)} characters, at most {FIELD_MAX['input_key']}")
        if not local_inputs.is_local(key) and (".." in key.split("/") or key.startswith("/")):
            raise RequestError(f"input_key: {key[:100]!r} is not an object key (nor file:// and a path)")
    # a recipe is named, never a path: only the built-in recipes' names
    if req.recipe and (not RECIPE_NAME.match(req.recipe) or req.recipe not in recipes.available()):
        raise RequestError(f"recipe: unknown recipe {req.recipe[:64]!r} (a recipe name is lowercase letters, "
                           f"digits and _); available: {', '.join(recipes.available())}")
    if len(req.parameters) > MAX_PARAMETERS:
        raise RequestError(f"parameters: {len(req.parameters)} overrides, at most {MAX_PARAMETERS}")
    for k, v in req.parameters.items():
        if len(k) > 200 or len(v) > MAX_PARAMETER_BYTES:
            raise RequestError(f"parameters: override {k[:60]!r} is too long (key 200, value {MAX_PARAMETER_BYTES})")


async def page_start(js, stream: str, limit: int, page_token: str, prefix: str, rpc: str) -> tuple[int, int]:
    """(page size, sequence number to read down from) of a page of a stream listed newest
    first: the token's, else the stream's last; a bad limit or token is named."""
    limit = limit or DEFAULT_PAGE
    if not 0 < limit <= MAX_PAGE:
        raise RequestError(f"limit: {limit}; 1 to {MAX_PAGE} (0: {DEFAULT_PAGE})")
    if page_token:
        if not re.fullmatch(prefix + r"[0-9]{1,19}", page_token):
            raise RequestError(f"page_token: {page_token[:40]!r} is not a token from {rpc}")
        return limit, int(page_token[1:])
    return limit, (await js.stream_info(stream)).state.last_seq


def check_run_id(run_id: str) -> None:
    if not RUN_ID.match(run_id or ""):
        raise RequestError(f"run_id: {run_id[:80]!r} is not a run id" if run_id else "run_id is required")


class Coordinator:
    def __init__(self, cfg, store: ObjectStore):
        self.cfg = cfg
        self.store = store
        self.lock = asyncio.Lock()
        self.active: set = set()     # ids of runs not yet ended
        self.finish_hooks: list = []  # async fn(run) called when a run ends (gateway/trigger.py)

    async def start(self) -> None:
        self.nc, self.js = await bus.connect(self.cfg, "gateway")
        self.kv = await bus.runs_kv(self.js)
        await bus.run_index(self.js)
        self.events = await bus.gateway_event_consumer(self.js)
        await self.resume()
        self.task = asyncio.create_task(self._event_loop())
        self.poll_task = asyncio.create_task(self._poll_queues())
        self.beats: dict = {}
        await self.nc.subscribe("heartbeat.>", cb=self._on_heartbeat)
        self.beat_task = asyncio.create_task(self._watch_heartbeats())

    async def stop(self) -> None:
        self.task.cancel()
        self.poll_task.cancel()
        self.beat_task.cancel()
        await self.nc.drain()

    def _active(self, run_id: str, active: bool) -> None:
        """almapipe_runs_active is the size of a set, so a run finished twice (an event
        redelivered after a gateway restart) is not subtracted twice."""
        (self.active.add if active else self.active.discard)(run_id)
        metrics.RUNS_ACTIVE.set(len(self.active))

    # ------------------------------------------------------------ run state
    async def load(self, run_id: str) -> dict:
        check_run_id(run_id)
        from nats.js.errors import KeyDeletedError, KeyNotFoundError
        try:
            entry = await self.kv.get(run_id)
        except (KeyNotFoundError, KeyDeletedError):
            raise RequestError(f"no run {run_id!r}", not_found=True) from None
        except Exception as exc:
            # the run records cannot be read now (a NATS node lost, the KV without a leader
            # for a few seconds): UNAVAILABLE, so a client tries again, not NOT_FOUND, which
            # would make it give up on a live run (found by the resilience suite)
            raise bus.BusError(f"run records unavailable ({type(exc).__name__}: {str(exc)[:200]})") from exc
        return json.loads(entry.value)

    async def save(self, run: dict) -> None:
        run["updated"] = time.time()
        await self.kv.put(run["run_id"], json.dumps(run).encode())

    async def all_runs(self) -> list:
        """Every run record, in one pass over the KV bucket (a watcher delivers each key's
        latest value): for start-up only, never per request."""
        return await bus.kv_values(self.kv)

    async def list_runs(self, limit: int, page_token: str = "") -> tuple[list, str]:
        """A page of runs, newest first, and the token of the next page ("" at the end).

        The run index stream holds one message per run in creation order; a page
        reads limit sequence numbers downwards from the token's (get by sequence),
        and the records they name: O(page), whatever the number of runs. A run made
        while a client pages lands above the first page, so no run is seen twice or
        skipped."""
        limit, seq = await page_start(self.js, bus.RUN_INDEX_STREAM, limit, page_token, "s", "ListRuns")
        runs = []
        while seq > 0 and len(runs) < limit:
            try:
                msg = await self.js.get_msg(bus.RUN_INDEX_STREAM, seq=seq)
                runs.append(await self.load(msg.data.decode()))
            except RequestError:
                pass          # a run whose record was removed
            except Exception as exc:
                if "not found" not in str(exc).lower() and "no message" not in str(exc).lower():
                    raise
            seq -= 1
        return runs, (f"s{seq}" if seq > 0 else "")

    # ------------------------------------------------------------ API actions
    async def submit(self, req: pb.SubmitRunRequest, recipe_doc: dict | None = None, owner: str = "",
                     annotations: dict | None = None) -> dict:
        """annotations: fields added to the run record before it is saved (the trigger's)."""
        check_submit(req)
        inputs = list(req.input_keys) or [req.input_key]
        for key in inputs:
            if local_inputs.is_local(key):      # read in place by the importer (decision 0022)
                try:
                    local_inputs.local_path(key, self.cfg.import_roots)
                except local_inputs.InputError as exc:
                    raise RequestError(str(exc), not_found=exc.not_found) from None
            elif not self.store.exists(key, bucket=self.store.raw_bucket):
                raise RequestError(f"input_key: {key!r} not found in bucket {self.store.raw_bucket}", not_found=True)
        mous = len(inputs) > 1 or bool(req.mous_id)
        auto = not recipe_doc and not req.recipe and not mous
        try:
            if auto:     # chosen from the data's telescope once importdata has read it
                recipes.check_overrides_somewhere(dict(req.parameters), sorted(set(recipes.BY_TELESCOPE.values()))
                                                  + [recipes.DEFAULT])
                first = {k: v for k, v in req.parameters.items() if k.split(".")[0] in ("importdata", "0")}
                recipe = recipes.apply_overrides(recipes.auto(), first)
                for name in set(recipes.BY_TELESCOPE.values()) | {recipes.DEFAULT}:
                    candidate = recipes.load(name)
                    stages = {st["stage"] for st in candidate["stages"]}
                    limits.imaging_caps(recipes.apply_overrides(candidate, {
                        k: v for k, v in req.parameters.items() if k.split(".")[0] in stages}))
            else:        # an MOUS is ALMA's: its default recipe is ALMA's
                recipe = recipes.validate(recipe_doc) if recipe_doc else \
                    recipes.load(req.recipe or ("alma_calimage" if mous else None))
                recipe = recipes.apply_overrides(recipe, dict(req.parameters))
                limits.imaging_caps(recipe)    # caps no recipe or override can lift
        except ParameterError as exc:
            raise RequestError(str(exc)) from exc
        extras = {"flag_template": req.flag_template, "cont_dat": req.cont_dat, "mous_id": req.mous_id}
        if not mous:
            run = self.new_run(recipe, inputs[0], extras, req.label, owner)
            if auto:
                run["auto_overrides"] = dict(req.parameters)
            run.update(annotations or {})
            async with self.lock:
                await self.register(run)
                await self.dispatch(run)
            log.info("run %s submitted: recipe %s on %s", run["run_id"], recipe["name"], inputs[0])
            return run
        return await self.submit_mous(req, recipe, inputs, extras, owner, annotations)

    def new_run(self, recipe: dict, input_key: str, extras: dict, label: str, owner: str = "",
                run_id: str | None = None, context: dict | None = None) -> dict:
        """A run record (not yet saved) with its first context written to S3."""
        run_id = run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        ctx = context or new_context(run_id, recipe, input_key, extras)
        ctx_key = f"runs/{run_id}/context/init.json"
        self.store.put_json(ctx_key, ctx)
        self.store.put_json(f"runs/{run_id}/recipe.json", recipe)
        return {"run_id": run_id, "status": "RUNNING", "recipe": recipe["name"], "input_key": input_key,
                "label": label, "owner": owner, "created": time.time(), "updated": time.time(), "current_stage": 0,
                "context_key": ctx_key, "error": "",
                "stages": [{"index": i, "name": s["stage"], "service": s["service"], "status": "PENDING",
                            "qa_score": -1.0, "qa_reasons": [], "duration_s": 0.0, "attempts": 0, "error": "",
                            "params": s["params"]} for i, s in enumerate(recipe["stages"])]}

    async def register(self, run: dict) -> None:
        """Save a new run, put it in the run index (ListRuns) and count it active."""
        await self.save(run)
        await bus.publish_retrying(self.js, bus.RUN_INDEX_SUBJECT, run["run_id"].encode(), f"index-{run['run_id']}",
                                   f"index entry of {run['run_id']}", give_up_s=30)
        self._active(run["run_id"], True)

    async def submit_mous(self, req, recipe: dict, inputs: list, extras: dict, owner: str,
                          annotations: dict | None = None) -> dict:
        """An MOUS: one run per EB for the stages up to split (calibration, each EB on its
        own and in parallel across the workers), and the MOUS run, whose own stages (from
        the one after split: imaging, export, WebLog) start from the EBs' merged contexts
        when every EB's run has succeeded (eb_done)."""
        try:
            per_eb, mous_part = recipes.split_for_mous(recipe)
        except recipes.RecipeError as exc:
            raise RequestError(str(exc)) from exc
        mous_id = req.mous_id or "mous"
        parent_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        # the MOUS run first, then its EBs': records made in the order they are indexed
        parent = self.new_run(mous_part, inputs[0], extras, req.label, owner, run_id=parent_id,
                              context=new_context(parent_id, mous_part, inputs[0], extras))
        children = []
        for i, key in enumerate(inputs):
            child = self.new_run(per_eb, key, extras, f"{mous_id} EB {i + 1}/{len(inputs)}", owner,
                                 run_id=f"{parent_id}-eb{i + 1}")
            child["parent_run_id"] = parent_id
            children.append(child)
        parent.update(mous_id=mous_id, eb_run_ids=[c["run_id"] for c in children], input_keys=inputs,
                      waiting_for_ebs=True, **(annotations or {}))
        async with self.lock:
            await self.register(parent)
            for child in children:
                await self.register(child)
                await self.dispatch(child)
        log.info("MOUS run %s submitted: %d EBs, recipe %s", parent_id, len(inputs), recipe["name"])
        return parent

    async def cancel(self, run_id: str, by: str = "") -> dict:
        async with self.lock:
            run = await self.load(run_id)
            if run["status"] not in TERMINAL:
                run["status"] = "CANCELLED"
                run["error"] = f"cancelled by {by}" if by else "cancelled by request"
                await self.finish(run)
                for child_id in run.get("eb_run_ids", []):     # an MOUS: its EBs' runs too
                    child = await self.load(child_id)
                    if child["status"] not in TERMINAL:
                        child.update(status="CANCELLED", error=f"the MOUS run {run_id} was cancelled")
                        await self.finish(child)
        return run

    async def eb_done(self, child: dict) -> None:
        """An EB's run of an MOUS has ended (called with the lock held). When all have
        succeeded, the MOUS run starts from their merged contexts; when one failed, the
        MOUS run fails naming it, and the EBs still running are cancelled."""
        try:
            parent = await self.load(child["parent_run_id"])
        except RequestError:
            return
        if parent["status"] in TERMINAL or not parent.get("waiting_for_ebs"):
            return
        kids = [child if cid == child["run_id"] else await self.load(cid) for cid in parent["eb_run_ids"]]
        failed = [k for k in kids if k["status"] in ("FAILED", "CANCELLED")]
        if failed:
            k = failed[0]
            parent["status"] = "FAILED"
            parent["waiting_for_ebs"] = False
            parent["error"] = f"EB {k['label']} (run {k['run_id']}, {k['input_key']}) {k['status'].lower()}: {k['error']}"
            for later in parent["stages"]:
                later["status"] = "SKIPPED"
            await self.finish(parent)
            for other in kids:
                if other["status"] not in TERMINAL:
                    other.update(status="CANCELLED", error=f"another EB of MOUS run {parent['run_id']} failed")
                    await self.finish(other)
            return
        if any(k["status"] != "SUCCEEDED" for k in kids):
            return
        contexts = [await asyncio.to_thread(self.store.get_json, k["context_key"]) for k in kids]
        init = await asyncio.to_thread(self.store.get_json, f"runs/{parent['run_id']}/context/init.json")
        merged = merge_eb_contexts(init, parent, kids, contexts)
        key = f"runs/{parent['run_id']}/context/ebs.json"
        await asyncio.to_thread(self.store.put_json, key, merged)
        parent.update(context_key=key, waiting_for_ebs=False)
        await self.save(parent)
        await self.dispatch(parent)

    # ------------------------------------------------------------ dispatch
    async def dispatch(self, run: dict) -> None:
        if run.get("waiting_for_ebs"):
            return           # an MOUS run starts when its EBs' runs have succeeded
        st = run["stages"][run["current_stage"]]
        await self.publish_request(run, st, st["name"], st["params"], run["context_key"])
        st["status"] = "DISPATCHED"
        await self.save(run)
        await self.run_event(run, pb.STAGE_STATUS_DISPATCHED, st, f"dispatched to {st['service']}")

    async def publish_request(self, run: dict, st: dict, stage: str, params: dict, context_key: str,
                              shard: int = 0, again: int = 0) -> None:
        part_of = "" if stage == st["name"] else st["name"]
        req = pb.StageRequest(run_id=run["run_id"], stage_index=st["index"], stage=stage, service=st["service"],
                              params_json=json.dumps(params), context_key=context_key,
                              input_key=run["input_key"], shard=shard, part_of=part_of)
        # msg id: JetStream drops the same request published twice (gateway restart)
        msg_id = f"{run['run_id']}-{st['index']}" + (f"-{stage}-{shard}" if part_of else "") + \
            (f"-again{again}" if again else "")
        # through a NATS restart: retried until stored (a stage recorded DISPATCHED is never lost)
        await bus.publish_retrying(self.js, bus.work_subject(st["service"], stage), req.SerializeToString(),
                                   msg_id, f"stage request {msg_id}", give_up_s=600)

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
        await bus.publish_retrying(self.js, subject, ev.SerializeToString(), uuid.uuid4().hex,
                                   f"run event of {run['run_id']}", give_up_s=120)

    async def resume(self) -> None:
        """After a restart: count the active runs (almapipe_runs_active starts from the
        truth, not from 0), index runs made before the run index existed, re-dispatch runs
        whose current stage was never dispatched, and look again at MOUS runs waiting for
        their EBs (the last EB may have ended just before)."""
        runs = [r for r in await self.all_runs() if isinstance(r, dict) and "run_id" in r]
        self.active = {r["run_id"] for r in runs if r.get("status") not in TERMINAL}
        metrics.RUNS_ACTIVE.set(len(self.active))
        if runs and (await self.js.stream_info(bus.RUN_INDEX_STREAM)).state.last_seq == 0:
            for run in sorted(runs, key=lambda r: r.get("created", 0)):
                await bus.publish_retrying(self.js, bus.RUN_INDEX_SUBJECT, run["run_id"].encode(),
                                           f"index-{run['run_id']}", "run index", give_up_s=30)
        for run in runs:
            if run.get("status") == "RUNNING" and run.get("waiting_for_ebs"):
                async with self.lock:
                    await self.eb_done(await self.load(run["eb_run_ids"][-1]))
                continue
            # a record without its stages (written by another tool, or damaged) is left as it
            # is: it must not stop the gateway from starting
            stages, cur = run.get("stages") or [], run.get("current_stage", -1)
            if not isinstance(cur, int) or not 0 <= cur < len(stages):
                if run.get("status") == "RUNNING":
                    log.warning("run %s: record without a current stage; not resumed", run["run_id"])
                continue
            if run.get("status") == "RUNNING" and stages[cur].get("status") == "PENDING":
                log.info("resuming run %s at stage %s", run["run_id"], run["stages"][run["current_stage"]]["name"])
                await self.dispatch(run)

    # ------------------------------------------------------------ heartbeats
    async def _on_heartbeat(self, msg) -> None:
        try:
            b = json.loads(msg.data)
            self.beats[(b["run_id"], int(b["stage_index"]), b["stage"], int(b["shard"]))] = \
                (time.monotonic(), b.get("worker", "?"), b.get("part_of", ""))
        except Exception:
            log.warning("undecodable heartbeat on %s", msg.subject)

    async def _watch_heartbeats(self, every_s: float = 5.0) -> None:
        """A stage whose worker stopped sending heartbeats (killed mid-stage) is dispatched
        again, so any live worker of the service takes it now rather than when JetStream's
        ack wait runs out. A piece or join of a fan-out is left to that redelivery."""
        reconnects = self.nc.stats.get("reconnects", 0)
        while True:
            await asyncio.sleep(every_s)
            try:
                now = time.monotonic()
                if self.nc.stats.get("reconnects", 0) != reconnects:   # we were away: nothing is late
                    reconnects = self.nc.stats.get("reconnects", 0)
                    self.beats = {k: (now, w, p) for k, (_, w, p) in self.beats.items()}
                    continue
                for key, (t, worker, part_of) in list(self.beats.items()):
                    if now - t > HEARTBEAT_TIMEOUT_S:
                        del self.beats[key]
                        if key[3] == 0 and not part_of:
                            await self.redispatch(key[0], key[1], key[2], worker, now - t)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat watch")

    async def redispatch(self, run_id: str, index: int, stage: str, worker: str, age: float) -> None:
        async with self.lock:
            run = await self.load(run_id)
            st = run["stages"][index]
            if run["status"] != "RUNNING" or run["current_stage"] != index or st["name"] != stage \
                    or st["status"] not in ("DISPATCHED", "RETRYING") or st.get("fanout"):
                return    # it ended meanwhile
            st["redispatched"] = st.get("redispatched", 0) + 1
            message = f"no heartbeat from {worker} for {age:.0f} s: dispatched again"
            log.warning("run %s stage %s: %s", run_id, stage, message)
            await self.publish_request(run, st, st["name"], st["params"], run["context_key"],
                                       again=st["redispatched"])
            st["error"] = message
            await self.save(run)
            await self.run_event(run, pb.STAGE_STATUS_DISPATCHED, st, message)

    async def _poll_queues(self, every_s: float = 5.0) -> None:
        """almapipe_queue_pending{service}: stage requests not yet taken by a worker,
        from each service's durable consumer (num_pending)."""
        from almapipe.stages import REGISTRY
        services = sorted({spec.service for spec in REGISTRY.values()})
        while True:
            for svc in services:
                try:
                    info = await self.js.consumer_info(bus.WORK_STREAM, f"worker-{svc}")
                    metrics.QUEUE_LAG.labels(svc).set(info.num_pending)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    pass    # no worker has made its consumer yet, or NATS is away
            await asyncio.sleep(every_s)

    # ------------------------------------------------------------ events
    async def _event_loop(self) -> None:
        await bus.consume(self.events, lambda msg: self.handle_event(msg.data), "run events", nak_delay=2)

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
                if run["recipe"] == recipes.AUTO and not run.get("finalizing"):
                    if not await self.resolve_recipe(run):
                        return
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

    async def resolve_recipe(self, run: dict) -> bool:
        """A run submitted without a recipe has imported its data: append the stages of
        the recipe for its telescope (with the run's overrides) and record the choice in
        the context. A bad override fails the run, naming it. Returns whether to go on."""
        ctx = await asyncio.to_thread(self.store.get_json, run["context_key"])
        telescope = ctx.get("observation", {}).get("telescope", "")
        name = recipes.for_telescope(telescope)
        try:
            recipe = recipes.apply_overrides(recipes.load(name), run.get("auto_overrides", {}))
            limits.imaging_caps(recipe)
        except ParameterError as exc:
            run["status"] = "FAILED"
            run["error"] = f"recipe {name} (chosen for telescope {telescope}): {exc}"
            await self.finish(run)
            return False
        first = run["stages"][0]
        first["params"] = recipe["stages"][0]["params"] | first["params"]
        run["stages"] = [first] + [{"index": i, "name": s["stage"], "service": s["service"], "status": "PENDING",
                                    "qa_score": -1.0, "qa_reasons": [], "duration_s": 0.0, "attempts": 0,
                                    "error": "", "params": s["params"]}
                                   for i, s in enumerate(recipe["stages"]) if i > 0]
        run["recipe"] = name
        first["qa_reasons"] = list(first["qa_reasons"]) + [f"Recipe {name}, chosen for telescope {telescope}."]
        ctx["recipe"] = recipe
        key = run["context_key"].replace(".json", f".{name}.json")
        await asyncio.to_thread(self.store.put_json, key, ctx)
        await asyncio.to_thread(self.store.put_json, f"runs/{run['run_id']}/recipe.json", recipe)
        run["context_key"] = key
        log.info("run %s: recipe %s chosen for telescope %s", run["run_id"], name, telescope)
        return True

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
        self._active(run["run_id"], False)
        await self.run_event(run, pb.STAGE_STATUS_UNSPECIFIED, None, run["error"] or run["status"].lower())
        log.info("run %s %s %s", run["run_id"], run["status"], run["error"])
        for hook in self.finish_hooks:
            await hook(run)
        if run.get("parent_run_id"):
            await self.eb_done(run)

    def write_products(self, run: dict) -> None:
        ctx = self.store.get_json(run["context_key"])
        summary = build_summary(run, ctx)
        pkg = dict(ctx.get("package", {}))
        pkg["summary.json"] = self.store.put_json(f"runs/{run['run_id']}/products/summary.json", summary)["key"]
        self.store.put_json(f"runs/{run['run_id']}/products/manifest.json", pkg)


def merge_eb_contexts(init: dict, parent: dict, kids: list, contexts: list) -> dict:
    """The MOUS run's starting context from its EBs' (each after split): the first EB's
    observation summary and field list (fields matched by name across EBs), every EB's
    calibrated partitions and target partitions (tagged with their EB, field ids mapped
    onto the first EB's), and per EB what the WebLog and the flux-consistency check
    report: its fluxscale results, flags, stage scores."""
    first = contexts[0]
    ctx = dict(first)
    ctx.update(run_id=parent["run_id"], recipe=init["recipe"], user=dict(first.get("user", {}), **init["user"]),
               stage_results=[], qa={}, images=[], manifest=[], mous_id=parent.get("mous_id", ""))
    ref = {(f["name"], round(f["ra_rad"], 6), round(f["dec_rad"], 6)): f["id"] for f in first["observation"]["fields"]}
    by_name = {}
    for f in first["observation"]["fields"]:
        by_name.setdefault(f["name"], f["id"])
    ebs, parts, targets, names, caltables = [], [], [], set(), {}
    for i, (kid, c) in enumerate(zip(kids, contexts)):
        ms_name = c.get("ms_name", f"eb{i + 1}")
        if ms_name in names:                  # EBs whose files share a name
            ms_name = f"{ms_name}_eb{i + 1}"
        names.add(ms_name)
        fmap = {}
        for f in c["observation"]["fields"]:
            key = (f["name"], round(f["ra_rad"], 6), round(f["dec_rad"], 6))
            fmap[str(f["id"])] = ref.get(key, by_name.get(f["name"], -1))
        tag = {"eb": i, "ms_name": ms_name, "field_map": fmap}
        parts += [dict(p, **tag) for p in c.get("partitions", [])]
        targets += [dict(p, **tag) for p in c.get("target_partitions", [])]
        ebs.append({"index": i, "ms_name": tag["ms_name"], "run_id": kid["run_id"], "input_key": kid["input_key"],
                    "context_key": kid["context_key"],
                    "start": c["observation"].get("start"), "end": c["observation"].get("end"),
                    "fluxscale": c.get("fluxscale", []), "flags": c.get("flags", {}),
                    "refant": c.get("refant", {}).get("refant"), "wvr": c.get("wvr"),
                    "stages": [{"name": s["name"], "qa_score": s["qa_score"], "qa_reasons": s["qa_reasons"]}
                               for s in kid["stages"]],
                    "logs": [(r["index"], r["name"], r["log_key"]) for r in c.get("stage_results", [])
                             if r.get("log_key")]})
        for name, entry in c.get("caltables", {}).items():
            caltables[f"{ms_name}:{name}"] = entry
    ctx.update(partitions=parts, target_partitions=targets, ebs=ebs, caltables=caltables,
               fluxscale=[dict(r, eb=e["ms_name"]) for e in ebs for r in e["fluxscale"]])
    return ctx


def build_summary(run: dict, ctx: dict) -> dict:
    return {
        "run_id": run["run_id"], "status": run["status"], "error": run["error"], "recipe": run["recipe"],
        "input": run["input_key"], "mous_id": run.get("mous_id", ""), "eb_run_ids": run.get("eb_run_ids", []),
        "ebs": [{k: e.get(k) for k in ("ms_name", "run_id", "input_key", "start", "end", "fluxscale", "refant")}
                for e in ctx.get("ebs", [])],
        "flux_consistency": ctx.get("flux_consistency"),
        "stages": [{"name": s["name"], "status": s["status"], "qa_score": s["qa_score"],
                    "qa_reasons": s["qa_reasons"], "duration_s": s["duration_s"], "attempts": s["attempts"]}
                   for s in run["stages"]],
        "fluxscale": [{k: r.get(k) for k in ("field", "spw", "flux_jy", "flux_err_jy", "n", "eb") if k in r}
                      for r in ctx.get("fluxscale", [])],
        "images": [{k: img.get(k) for k in ("file", "field", "spw", "specmode", "peak_jy_per_beam",
                                            "rms_jy_per_beam", "theoretical_rms_jy_per_beam", "beam_arcsec",
                                            "qa_score", "chans", "peak_channel", "aggregate", "pointings", "dr_correction",
                                            "dirty_dynamic_range", "dynamic_range", "nterms", "reffreq_hz", "alpha",
                                            "alpha_error", "imsize", "cell_arcsec", "size_mitigation", "nbin")}
                   for img in ctx.get("images", [])],
        "continuum": ctx.get("continuum", []),
        "refant": ctx.get("refant", {}).get("refant"),
        "calibration": {k: ctx.get(k) for k in ("tsys", "antpos", "wvr", "flags", "spwphaseup", "bandpass_phaseup",
                                                "callibrary")},
        "fields": ctx.get("fields", []),
    }
