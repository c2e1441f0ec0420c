"""State-change triggers (decision 0014): observatory events start runs, the pipeline
announces its own state changes, reviewers' QA2 verdicts are recorded and published.

* The observatory publishes a StateChange on obs.state.<mous> (stream ALMAPIPE_STATE).
  The gateway's durable consumer `trigger` reads each one, matches it against the
  rules (telescope / array / state -> recipe) and decides: started, duplicate, ignored
  or rejected. Every decision is kept (stream ALMAPIPE_TRIGGER_DECISIONS, one message
  each, its sequence number its id) for ListTriggerDecisions and ReplayTrigger.
* Exactly one run per (MOUS, recipe, recipe version): before submitting, the trigger
  claims that triple in the KV bucket ALMAPIPE_TRIGGERS with a create, which only one
  writer can win. The same event again, a redelivery after a gateway restart, or a
  replay find the claim and start nothing.
* The pipeline publishes PipelineProcessing when it starts a triggered run, and from
  the coordinator's finish(): QA2Review (with a QA summary) on success, ProcessingFailed
  (with the reason) otherwise, on obs.state.<mous>.pipeline. A QA2 verdict recorded
  through the API is published there too (source "reviewer").
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
import uuid

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import KeyWrongLastSequenceError

from almapipe import recipes
from almapipe.errors import ParameterError
from almapipe.platform import bus, inputs as local_inputs
from almapipe.v1 import pipeline_pb2 as pb

from .coordinator import TERMINAL, RequestError, page_start

log = logging.getLogger("almapipe.trigger")

STATE_STREAM = "ALMAPIPE_STATE"
STATE_SUBJECTS = "obs.state.>"
OBSERVATORY_FILTER = "obs.state.*"       # obs.state.<mous>: the observatory's events only
DECISIONS_STREAM = "ALMAPIPE_TRIGGER_DECISIONS"
DECISIONS_SUBJECT = "almapipe.trigger.decisions"
CLAIMS_KV = "ALMAPIPE_TRIGGERS"
DURABLE = "trigger"

# The lifecycle of an MOUS as the contract knows it (ALMA's: Ready -> PartiallyObserved ->
# FullyObserved -> processing -> QA2 -> Delivered). The first four and Delivered come
# from the observatory; the others are ours and our reviewers'.
OBSERVATORY_STATES = ("Ready", "PartiallyObserved", "FullyObserved", "ObservingTimedOut", "Delivered")
PIPELINE_STATES = ("PipelineProcessing", "QA2Review", "ProcessingFailed", "QA2Pass", "QA2SemiPass", "QA2Fail")
VERDICTS = ("Pass", "SemiPass", "Fail")
ARRAYS = ("12m", "7m", "TP")
MAX_COMMENT = 4000
# a claim without a run younger than this may be a submit in progress (another gateway)
CLAIM_GRACE_S = float(os.environ.get("ALMAPIPE_TRIGGER_CLAIM_GRACE_S", "30"))
MAX_SCAN = 20000          # messages one ListTriggerDecisions call reads looking for an MOUS

# Without a rules file: ALMA's interferometric MOUSs start their calibration and imaging
# when they become FullyObserved; everything else (TP, other telescopes) is ignored.
DEFAULT_RULES = {"rules": [{"name": "alma-interferometry", "telescope": ["ALMA"], "array": ["12m", "7m"],
                            "state": ["FullyObserved"], "recipe": "alma_calimage"}]}


def subject_token(mous_id: str) -> str:
    """An MOUS id as one NATS subject token ('.', '*', '>' and blanks are not allowed)."""
    return re.sub(r"[\s.*>]", "_", mous_id) or "_"


def state_subject(mous_id: str, pipeline: bool = False) -> str:
    return f"obs.state.{subject_token(mous_id)}" + (".pipeline" if pipeline else "")


def claim_key_of(mous_id: str, recipe: str, version: int) -> str:
    """The KV key of a (MOUS, recipe, version): KV keys allow few characters, MOUS ids more."""
    return "claim_" + hashlib.sha256(f"{mous_id}\n{recipe}\n{version}".encode()).hexdigest()[:40]


def rules_path(cfg) -> str:
    return os.environ.get("ALMAPIPE_TRIGGER_RULES", os.path.join(cfg.data_dir, "trigger-rules.json"))


class ClaimBusy(RuntimeError):
    """Another decision may be starting this run right now: decide again later."""


class RulesError(ValueError):
    """The rules file is unreadable or a rule is malformed; the message names it."""


def check_rules(doc) -> list:
    """The rules of a rules document, each checked: a name, optional lists of telescopes,
    arrays and states to match (absent: any), and a built-in recipe's name or an inline
    recipe document (the file is the operator's, like the recipes themselves), with
    optional parameter overrides."""
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise RulesError("expected {\"rules\": [...]}")
    out = []
    for i, rule in enumerate(doc["rules"]):
        where = f"rule {i + 1} ({rule.get('name', '?') if isinstance(rule, dict) else '?'})"
        if not isinstance(rule, dict):
            raise RulesError(f"{where}: not an object")
        for key in ("telescope", "array", "state"):
            if key in rule and not (isinstance(rule[key], list) and all(isinstance(v, str) for v in rule[key])):
                raise RulesError(f"{where}: {key} must be a list of strings")
        for st in rule.get("state", []):
            if st not in OBSERVATORY_STATES:
                raise RulesError(f"{where}: state {st!r} is not an observatory state ({', '.join(OBSERVATORY_STATES)})")
        try:
            if "recipe_doc" in rule:
                recipe = recipes.validate(rule["recipe_doc"])
            elif rule.get("recipe") in recipes.available():
                recipe = recipes.load(rule["recipe"])
            else:
                raise RulesError(f"{where}: recipe {rule.get('recipe')!r} is not one of "
                                 f"{', '.join(recipes.available())}")
            recipe = recipes.apply_overrides(recipe, dict(rule.get("parameters", {})))
        except ParameterError as exc:
            raise RulesError(f"{where}: {exc}") from exc
        out.append(dict(rule, name=rule.get("name") or f"rule{i + 1}", _recipe=recipe))
    return out


class Rules:
    """The rules file, reread when it changes (no restart to change a rule). A file that
    does not exist means the default rules; a broken one means no run starts (every
    decision is rejected naming the problem) until it is fixed."""

    def __init__(self, path: str):
        self.path = path
        self._mtime = None
        self._rules: list = check_rules(DEFAULT_RULES)
        self._error = ""

    def current(self) -> list:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            self._mtime, self._error, self._rules = None, "", check_rules(DEFAULT_RULES)
            return self._rules
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                with open(self.path) as f:
                    self._rules, self._error = check_rules(json.load(f)), ""
            except (OSError, ValueError) as exc:
                self._rules, self._error = [], f"rules file {self.path}: {exc}"
                log.error("%s", self._error)
        if self._error:
            raise RulesError(self._error)
        return self._rules

    @staticmethod
    def match(rules: list, ev: pb.StateChange) -> dict | None:
        for rule in rules:
            if "telescope" in rule and ev.telescope.upper() not in [t.upper() for t in rule["telescope"]]:
                continue
            if "array" in rule and ev.array not in rule["array"]:
                continue
            if "state" in rule and ev.state not in rule["state"]:
                continue
            return rule
        return None


def qa_summary(run: dict, eb_runs: list) -> dict:
    """What a QA2 reviewer looks at first: the lowest stage score (and where), every
    stage's score and reasons, and for an MOUS each EB run's lowest score."""
    def lowest(stages):
        scored = [s for s in stages if s["qa_score"] >= 0]
        return min(scored, key=lambda s: s["qa_score"]) if scored else None
    stages = list(run["stages"])
    low = lowest(stages + [s for k in eb_runs for s in k["stages"]])
    return {"run_id": run["run_id"], "status": run["status"], "recipe": run["recipe"],
            "lowest_score": low["qa_score"] if low else None, "lowest_stage": low["name"] if low else None,
            "stages": [{"name": s["name"], "qa_score": s["qa_score"], "qa_reasons": s["qa_reasons"][:5]}
                       for s in stages],
            "ebs": [{"run_id": k["run_id"], "input_key": k["input_key"],
                     "lowest_score": (lowest(k["stages"]) or {}).get("qa_score")} for k in eb_runs],
            "products": f"runs/{run['run_id']}/products/"}


class Triggers:
    def __init__(self, cfg, coord, store):
        self.cfg, self.coord, self.store = cfg, coord, store
        self.rules = Rules(rules_path(cfg))
        self.task = None

    async def start(self) -> None:
        js = self.js = self.coord.js
        await bus._ensure_stream(js, StreamConfig(name=STATE_STREAM, subjects=[STATE_SUBJECTS],
                                                  max_age=400 * 24 * 3600))
        await bus._ensure_stream(js, StreamConfig(name=DECISIONS_STREAM, subjects=[DECISIONS_SUBJECT]))
        try:
            self.claims = await js.key_value(CLAIMS_KV)
        except Exception:
            self.claims = await js.create_key_value(bucket=CLAIMS_KV, history=10)
        # durable: events published while the gateway is down are read when it is back
        self.sub = await js.pull_subscribe(
            OBSERVATORY_FILTER, durable=DURABLE, stream=STATE_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                  ack_wait=120, max_deliver=20))
        self.coord.finish_hooks.append(self.on_run_finished)
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def _loop(self) -> None:
        # a state change not decided (NATS or S3 away) is decided again on redelivery;
        # the claim keeps it to one run
        await bus.consume(self.sub, lambda msg: self.decide(msg.data, msg.subject), "state changes", nak_delay=5)

    # ------------------------------------------------------------ deciding
    def input_keys(self, location: str) -> list:
        """The EBs' inputs in the raw bucket: one object, or every object under a prefix
        ending in '/', in key order; or, file:// and a path under an import root, the
        EB there or the EBs in that directory (decision 0022)."""
        if local_inputs.is_local(location):
            try:
                return local_inputs.list_local(location, self.cfg.import_roots)
            except local_inputs.InputError as exc:
                raise RequestError(str(exc)) from None
        prefix = f"s3://{self.store.raw_bucket}/"
        if location.startswith("s3://"):
            if not location.startswith(prefix):
                raise RequestError(f"data_location: {location[:200]!r} is not in the raw bucket "
                                   f"{self.store.raw_bucket}")
            location = location[len(prefix):]
        if ".." in location.split("/") or location.startswith("/"):
            raise RequestError(f"data_location: {location[:200]!r} is not an object key or prefix")
        if location.endswith("/"):
            keys = sorted(o.object_name for o in self.store.list(location, bucket=self.store.raw_bucket)
                          if not o.object_name.endswith("/"))
            if not keys:
                raise RequestError(f"data_location: no object under {location[:200]!r} in bucket "
                                   f"{self.store.raw_bucket}")
            return keys
        if not self.store.exists(location, bucket=self.store.raw_bucket):
            raise RequestError(f"data_location: {location[:200]!r} not found in bucket {self.store.raw_bucket}")
        return [location]

    @staticmethod
    def problems(ev: pb.StateChange) -> list:
        out = []
        if not ev.mous_id.strip():
            out.append("mous_id is missing")
        elif len(ev.mous_id) > 200:
            out.append(f"mous_id: {len(ev.mous_id)} characters, at most 200")
        if not ev.state:
            out.append("state is missing")
        elif ev.state not in OBSERVATORY_STATES + PIPELINE_STATES:
            out.append(f"state {ev.state[:60]!r} is not a state of the contract (observatory: "
                       f"{', '.join(OBSERVATORY_STATES)})")
        elif ev.state in PIPELINE_STATES:
            out.append(f"state {ev.state!r} is the pipeline's, not the observatory's: publish it on "
                       f"{state_subject(ev.mous_id or 'MOUS', pipeline=True)}")
        if ev.array and ev.array not in ARRAYS:
            out.append(f"array {ev.array[:20]!r} is not one of {', '.join(ARRAYS)}")
        if len(ev.project_code) > 64 or len(ev.eb_uids) > 50 or len(ev.data_location) > 1024:
            out.append("project_code (64), eb_uids (50) or data_location (1024) too long")
        return out

    async def decide(self, data: bytes, subject: str = "", replay_of: str = "", force: bool = False,
                     by: str = "") -> pb.TriggerDecision:
        """Decide about one event, record the decision and return it (its id set)."""
        d = pb.TriggerDecision(time_unix=time.time(), replay_of=replay_of, by=by)
        ev = pb.StateChange()
        try:
            ev.ParseFromString(data)
        except Exception as exc:
            d.action, d.reason = "rejected", f"not a StateChange message ({len(data)} bytes on {subject}): {exc}"
            return await self.record(d)
        d.event.CopyFrom(ev)
        bad = self.problems(ev)
        if bad:
            d.action, d.reason = "rejected", "; ".join(bad)
            return await self.record(d)
        try:
            rule = self.rules.match(self.rules.current(), ev)
        except RulesError as exc:
            d.action, d.reason = "rejected", str(exc)
            return await self.record(d)
        if rule is None:
            d.action = "ignored"
            d.reason = f"no rule for telescope {ev.telescope or '-'}, array {ev.array or '-'}, state {ev.state}"
            return await self.record(d)
        recipe = rule["_recipe"]
        d.rule, d.recipe, d.recipe_version = rule["name"], recipe["name"], int(recipe.get("version", 1))
        try:
            keys = await asyncio.to_thread(self.input_keys, ev.data_location) if ev.data_location else None
        except RequestError as exc:
            d.action, d.reason = "rejected", str(exc)
            return await self.record(d)
        if not keys:
            d.action, d.reason = "rejected", "data_location is missing: the trigger cannot find the EBs' data"
            return await self.record(d)
        if ev.eb_uids and len(ev.eb_uids) != len(keys):
            d.action = "rejected"
            d.reason = f"data_location holds {len(keys)} inputs, the event names {len(ev.eb_uids)} EBs"
            return await self.record(d)
        # one run per (MOUS, recipe, version): whoever creates the claim starts it
        claim_key = claim_key_of(ev.mous_id, d.recipe, d.recipe_version)
        claim = {"mous_id": ev.mous_id, "recipe": d.recipe, "recipe_version": d.recipe_version, "run_id": "",
                 "event_id": ev.event_id, "time": time.time()}
        took_over = ""
        if not force:
            try:
                await self.claims.create(claim_key, json.dumps(claim).encode())
            except KeyWrongLastSequenceError:
                entry = await self.claims.get(claim_key)
                before = json.loads(entry.value)
                if not before.get("run_id"):     # claimed, but the gateway stopped before the run was noted
                    before["run_id"] = await self.recover_claim(claim_key, entry, claim)
                if before["run_id"]:
                    d.action, d.run_id = "duplicate", before["run_id"]
                    d.reason = (f"run {before['run_id']} was started for MOUS {ev.mous_id}, recipe {d.recipe} "
                                f"version {d.recipe_version}")
                    return await self.record(d)
                took_over = f"; took over a claim of {time.strftime('%H:%M:%S', time.gmtime(before['time']))} " \
                            f"UTC left without a run"
        try:
            run = await self.submit(ev, rule, recipe, keys, claim_key)
        except RequestError as exc:
            if not force:
                await self.claims.delete(claim_key)     # a corrected event may start it
            d.action, d.reason = "rejected", f"submit: {exc}"
            return await self.record(d)
        except BaseException:
            if not force:
                try:
                    await self.claims.delete(claim_key)
                except Exception:
                    log.exception("claim %s not released", claim_key)
            raise
        d.action, d.run_id = "started", run["run_id"]
        d.forced = force
        d.reason = (f"forced replay by {by}: " if force else "") + \
            f"{'MOUS' if run.get('eb_run_ids') else 'single'} run of {len(keys)} EB(s) with recipe {d.recipe}" + \
            took_over
        await self.claims.put(claim_key, json.dumps(dict(claim, run_id=run["run_id"])).encode())
        d = await self.record(d)
        await self.publish(ev.mous_id, self.pipeline_event(run, "PipelineProcessing"), f"{run['run_id']}-started")
        async with self.coord.lock:
            current = await self.coord.load(run["run_id"])
            current.update(trigger_decision_id=d.decision_id, start_announced=True)
            await self.coord.save(current)
        return d

    async def recover_claim(self, claim_key: str, entry, claim: dict) -> str:
        """A claim without a run: the gateway stopped between claiming and noting the run.
        If a run names the claim (it was submitted), note it and return its id. If none
        does and the claim is older than CLAIM_GRACE_S, take the claim over (an update at
        the entry's revision, so only one decider can) and return "": the caller starts
        the run. A younger claim may be another gateway's submit in progress: ClaimBusy,
        decided again later."""
        before = json.loads(entry.value)
        run = await self.find_claimed_run(claim_key, before["time"])
        if run:
            try:
                await self.claims.update(claim_key, json.dumps(dict(before, run_id=run)).encode(),
                                         last=entry.revision)
            except KeyWrongLastSequenceError:
                pass
            return run
        if time.time() - before["time"] < CLAIM_GRACE_S:
            raise ClaimBusy(f"a run for MOUS {before['mous_id']} is being started (claim of "
                            f"{time.time() - before['time']:.0f} s ago); decided again shortly")
        try:
            await self.claims.update(claim_key, json.dumps(claim).encode(), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise ClaimBusy(f"the claim for MOUS {before['mous_id']} changed while it was looked at") from None
        return ""

    async def find_claimed_run(self, claim_key: str, since: float) -> str:
        """The run submitted under a claim, from the run index newest first back to the
        claim's time: O(runs made since then)."""
        from almapipe.platform.bus import RUN_INDEX_STREAM
        seq = (await self.js.stream_info(RUN_INDEX_STREAM)).state.last_seq
        while seq > 0:
            try:
                msg = await self.js.get_msg(RUN_INDEX_STREAM, seq=seq)
                run = await self.coord.load(msg.data.decode())
            except Exception:
                seq -= 1
                continue
            if run.get("trigger", {}).get("claim") == claim_key:
                return run["run_id"]
            if run["created"] < since - 60:
                return ""
            seq -= 1
        return ""

    async def submit(self, ev: pb.StateChange, rule: dict, recipe: dict, keys: list, claim_key: str) -> dict:
        """Submit through the coordinator as a client's SubmitRun would: an MOUS run (one
        run per EB up to split) when the recipe can split, else one EB's plain run."""
        label = f"{ev.project_code} {ev.mous_id} (trigger {rule['name']})".strip()[:200]
        trigger = {"event_id": ev.event_id, "project_code": ev.project_code, "mous_id": ev.mous_id,
                   "eb_uids": list(ev.eb_uids), "telescope": ev.telescope, "array": ev.array,
                   "rule": rule["name"], "recipe": recipe["name"], "recipe_version": int(recipe.get("version", 1)),
                   "claim": claim_key}
        try:
            recipes.split_for_mous(recipe)
            as_mous = True
        except recipes.RecipeError:
            as_mous = False
        if len(keys) > 1 and not as_mous:
            raise RequestError(f"recipe {recipe['name']} cannot process several EBs (no split stage)")
        req = pb.SubmitRunRequest(label=label,
                                  parameters={k: json.dumps(v) for k, v in rule.get("parameters", {}).items()})
        if as_mous:
            req.input_keys.extend(keys)
            req.mous_id = ev.mous_id
        else:
            req.input_key = keys[0]
        if "recipe_doc" not in rule:
            req.recipe = rule["recipe"]
        doc = rule.get("recipe_doc")
        annotations = {"trigger": trigger} if as_mous else {"trigger": trigger, "mous_id": ev.mous_id}
        return await self.coord.submit(req, doc, owner=f"trigger:{rule['name']}", annotations=annotations)

    async def record(self, d: pb.TriggerDecision) -> pb.TriggerDecision:
        ack = await self.js.publish(DECISIONS_SUBJECT, d.SerializeToString())
        d.decision_id = str(ack.seq)
        log.info("trigger decision %s: %s %s %s %s", d.decision_id, d.action, d.event.mous_id, d.run_id, d.reason)
        return d

    # ------------------------------------------------------------ our own state changes
    def pipeline_event(self, run: dict, state: str, **fields) -> pb.StateChange:
        t = run.get("trigger", {})
        return pb.StateChange(event_id=uuid.uuid4().hex, project_code=t.get("project_code", ""),
                              mous_id=t.get("mous_id") or run.get("mous_id", ""), eb_uids=t.get("eb_uids", []),
                              state=state, telescope=t.get("telescope", ""), array=t.get("array", ""),
                              time_unix=time.time(), source=fields.pop("source", "pipeline"), run_id=run["run_id"],
                              recipe=run["recipe"], data_location=f"runs/{run['run_id']}/products/", **fields)

    async def publish(self, mous_id: str, ev: pb.StateChange, msg_id: str) -> None:
        # the message id makes a second finish() of the same run (a redelivered event) harmless
        await bus.publish_retrying(self.js, state_subject(mous_id or ev.run_id, pipeline=True),
                                   ev.SerializeToString(), msg_id, f"state change {ev.state} of {ev.run_id}",
                                   give_up_s=120)

    async def on_run_finished(self, run: dict) -> None:
        """The coordinator's finish() hook: a triggered run announces its end. A failure to
        publish is logged, never fails the run's own bookkeeping."""
        if not run.get("trigger"):
            return
        try:
            if not run.get("start_announced"):
                # a run that ended before its start was noted (seconds): PipelineProcessing
                # first; the trigger's own publish, same message id, is dropped by JetStream
                await self.publish(run["trigger"]["mous_id"], self.pipeline_event(run, "PipelineProcessing"),
                                   f"{run['run_id']}-started")
            if run["status"] == "SUCCEEDED":
                kids = [await self.coord.load(k) for k in run.get("eb_run_ids", [])]
                ev = self.pipeline_event(run, "QA2Review", qa_summary_json=json.dumps(qa_summary(run, kids)))
            else:
                ev = self.pipeline_event(run, "ProcessingFailed",
                                         reason=run["error"][:2000] or run["status"].lower())
            await self.publish(run["trigger"]["mous_id"], ev, f"{run['run_id']}-{ev.state}")
        except Exception:
            log.exception("state change of run %s not published", run["run_id"])

    # ------------------------------------------------------------ API
    async def record_verdict(self, run_id: str, verdict: str, comment: str, who: str) -> dict:
        if verdict not in VERDICTS:
            raise RequestError(f"verdict: {verdict[:40]!r}; one of {', '.join(VERDICTS)}")
        if len(comment) > MAX_COMMENT:
            raise RequestError(f"comment: {len(comment)} characters, at most {MAX_COMMENT}")
        async with self.coord.lock:
            run = await self.coord.load(run_id)
            if run["status"] not in TERMINAL:
                raise RequestError(f"run_id: run {run_id} is {run['status']}; a QA2 verdict is for a finished run")
            if verdict != "Fail" and run["status"] != "SUCCEEDED":
                raise RequestError(f"verdict: run {run_id} {run['status'].lower()}; only Fail can be its verdict")
            review = {"verdict": verdict, "comment": comment, "reviewer": who, "time": time.time()}
            run["qa2"] = review
            run["qa2_history"] = (run.get("qa2_history", []) + [review])[-20:]    # a review may be redone
            await self.coord.save(run)
        ev = self.pipeline_event(run, "QA2" + verdict, source="reviewer", verdict=verdict, comment=comment, actor=who)
        await self.publish(run.get("trigger", {}).get("mous_id") or run.get("mous_id", ""), ev, ev.event_id)
        return run

    async def list_decisions(self, limit: int, page_token: str = "", mous_id: str = "") -> tuple[list, str]:
        """Decisions newest first, a page at a time (as ListRuns: by sequence number)."""
        limit, seq = await page_start(self.js, DECISIONS_STREAM, limit, page_token, "d", "ListTriggerDecisions")
        out, scanned = [], 0
        while seq > 0 and len(out) < limit and scanned < MAX_SCAN:
            d = await self.load_decision(seq)
            if d is not None and (not mous_id or d.event.mous_id == mous_id):
                out.append(d)
            seq -= 1
            scanned += 1
        return out, (f"d{seq}" if seq > 0 else "")

    async def load_decision(self, seq: int) -> pb.TriggerDecision | None:
        try:
            msg = await self.js.get_msg(DECISIONS_STREAM, seq=seq)
        except Exception as exc:
            if "not found" in str(exc).lower() or "no message" in str(exc).lower():
                return None
            raise
        d = pb.TriggerDecision()
        d.ParseFromString(msg.data)
        d.decision_id = str(seq)
        return d

    async def replay(self, decision_id: str, force: bool, who: str) -> pb.TriggerDecision:
        if not re.fullmatch(r"[0-9]{1,19}", decision_id or ""):
            raise RequestError(f"decision_id: {decision_id[:40]!r} is not a decision id" if decision_id
                               else "decision_id is required")
        old = await self.load_decision(int(decision_id))
        if old is None:
            raise RequestError(f"no trigger decision {decision_id}", not_found=True)
        try:
            return await self.decide(old.event.SerializeToString(), "replay", replay_of=decision_id, force=force,
                                     by=who)
        except ClaimBusy as exc:
            raise RequestError(f"decision_id: {exc}; try again in {CLAIM_GRACE_S:.0f} s") from None
