"""State-change triggers and QA2 verdicts (decision 0014) on a real local stack: events
published on real NATS start exactly one run per (MOUS, recipe, version), whatever is
published again or redelivered; the pipeline publishes its own state changes; QA2
verdicts go through the API."""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

import grpc
import pytest

from almapipe.cli import upload_input
from almapipe.platform.auth import channel
from almapipe.v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc
from conftest import NGC5921
from gateway.trigger import DURABLE, STATE_STREAM, state_subject

# kills workers or restarts servers: the suite's pooled runs end first (tests/runpool.py)
DISTURBS_STACK = True

TERMINAL = (pb.RUN_STATUS_SUCCEEDED, pb.RUN_STATUS_FAILED, pb.RUN_STATUS_CANCELLED)
# VLA data (NGC 5921) and a one-stage recipe keep the runs to seconds; ALMA keeps the default rule
RULES = {"rules": [
    {"name": "vla-7m-mous", "telescope": ["VLA"], "array": ["7m"], "state": ["FullyObserved"],
     "recipe": "alma_calimage"},
    {"name": "vla-import", "telescope": ["VLA"], "state": ["FullyObserved"],
     "recipe_doc": {"name": "trigger_import", "version": 1, "stages": [{"stage": "importdata"}]}},
    {"name": "alma-interferometry", "telescope": ["ALMA"], "array": ["12m", "7m"], "state": ["FullyObserved"],
     "recipe": "alma_calimage"}]}


def _creds(cfg):
    with open(os.path.join(cfg.data_dir, "credentials.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def env(stack):
    st, cfg = stack
    with open(os.path.join(cfg.data_dir, "trigger-rules.json"), "w") as f:   # reread by the gateway
        json.dump(RULES, f)
    tokens = _creds(cfg)["tokens"]
    with channel(cfg) as op, channel(cfg, token=tokens["reviewer"]["token"]) as rv, \
            channel(cfg, token=tokens["reader"]["token"]) as rd:
        yield st, cfg, pb_grpc.PipelineServiceStub(op), pb_grpc.PipelineServiceStub(rv), \
            pb_grpc.PipelineServiceStub(rd)


async def _nats(cfg):
    import nats
    return await nats.connect(cfg.nats_url, user="admin", password=_creds(cfg)["nats"]["admin"])


def publish(cfg, subject: str, data: bytes, msg_id: str | None = None) -> None:
    """Publish as the observatory would (admin user), into the state stream."""
    async def go():
        nc = await _nats(cfg)
        await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None)
        await nc.close()
    asyncio.run(go())


def pipeline_events(cfg, mous: str) -> list:
    """Every state change published on the MOUS's pipeline subject so far."""
    async def go():
        from nats.js.api import DeliverPolicy
        nc = await _nats(cfg)
        sub = await nc.jetstream().subscribe(state_subject(mous, pipeline=True), ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.ALL)
        out = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except Exception:
                break
            ev = pb.StateChange()
            ev.ParseFromString(msg.data)
            out.append(ev)
        await nc.close()
        return out
    return asyncio.run(go())


def event(mous: str, key: str, state="FullyObserved", telescope="VLA", array="", eb_uids=("uid://A002/X1/X1",),
          **kw) -> pb.StateChange:
    return pb.StateChange(event_id=uuid.uuid4().hex, project_code="2026.1.00042.S", mous_id=mous,
                          eb_uids=list(eb_uids), state=state, data_location=key, telescope=telescope,
                          array=array, time_unix=time.time(), source="observatory", **kw)


def decisions_of(stub, event_id: str, n: int = 1, timeout: float = 60) -> list:
    """The trigger's decisions about an event, oldest first, once there are n of them."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        got = [d for d in stub.ListTriggerDecisions(pb.ListTriggerDecisionsRequest(limit=200), timeout=10).decisions
               if d.event.event_id == event_id]
        if len(got) >= n:
            return got[::-1]
        time.sleep(0.3)
    raise TimeoutError(f"{n} decisions about event {event_id}")


def wait_run(stub, run_id, timeout=120):
    t_end = time.time() + timeout
    while time.time() < t_end:
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=10)
        if run.status in TERMINAL:
            return run
        time.sleep(0.3)
    raise TimeoutError(run_id)


def runs_of(stub, mous: str) -> list:
    return [r for r in stub.ListRuns(pb.ListRunsRequest(limit=1000), timeout=10).runs if r.mous_id == mous]


def test_an_event_starts_one_run_and_its_end_is_published(env):
    st, cfg, op, reviewer, reader = env
    key = upload_input(cfg, NGC5921)
    mous = f"uid://A001/X{uuid.uuid4().hex[:6]}/X1"
    ev = event(mous, key)
    publish(cfg, state_subject(mous), ev.SerializeToString(), msg_id=ev.event_id)
    first, = decisions_of(op, ev.event_id)
    assert first.action == "started" and first.rule == "vla-import", first
    assert first.recipe == "trigger_import" and first.recipe_version == 1
    run = wait_run(op, first.run_id)
    assert run.status == pb.RUN_STATUS_SUCCEEDED, run.error
    assert run.mous_id == mous and run.trigger_decision_id == first.decision_id

    # the same event again (past JetStream's duplicate window: no message id), and
    # another event saying the same: no new run
    publish(cfg, state_subject(mous), ev.SerializeToString())
    again = event(mous, key)
    publish(cfg, state_subject(mous), again.SerializeToString(), msg_id=again.event_id)
    dup = decisions_of(op, ev.event_id, 2)[1]
    dup2, = decisions_of(op, again.event_id)
    for d in (dup, dup2):
        assert d.action == "duplicate" and d.run_id == run.run_id and run.run_id in d.reason, d

    # the gateway killed, and its consumer's state lost: every event is delivered again
    st.stop("gateway")
    async def forget():
        nc = await _nats(cfg)
        await nc.jetstream().delete_consumer(STATE_STREAM, DURABLE)
        await nc.close()
    asyncio.run(forget())
    st.start("gateway")
    with channel(cfg) as ch:
        op = pb_grpc.PipelineServiceStub(ch)
        # ev was published twice, again once: three redeliveries
        redelivered = decisions_of(op, ev.event_id, 4)[2:] + decisions_of(op, again.event_id, 2)[1:]
        assert [d.action for d in redelivered] == ["duplicate"] * 3, redelivered
        assert [r.run_id for r in runs_of(op, mous)] == [run.run_id]

        # the pipeline said what it did: processing, then ready for QA2 review with a summary
        states = [(e.state, e.run_id, e.source) for e in pipeline_events(cfg, mous)]
        assert states == [("PipelineProcessing", run.run_id, "pipeline"), ("QA2Review", run.run_id, "pipeline")]
        review = [e for e in pipeline_events(cfg, mous) if e.state == "QA2Review"][0]
        summary = json.loads(review.qa_summary_json)
        assert review.mous_id == mous and review.project_code == "2026.1.00042.S"
        assert summary["lowest_stage"] == "importdata" and 0 <= summary["lowest_score"] <= 1
        assert [s["name"] for s in summary["stages"]] == ["importdata"]

        # a QA2 verdict: a reviewer's, not a submitter's; recorded and published
        submitter = _creds(cfg)["tokens"]["submitter"]["token"]
        with channel(cfg, token=submitter) as sch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.PipelineServiceStub(sch).RecordQA2Verdict(
                    pb.RecordQA2VerdictRequest(run_id=run.run_id, verdict="Pass"), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            reviewer.RecordQA2Verdict(pb.RecordQA2VerdictRequest(run_id=run.run_id, verdict="Great"), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("verdict")
        done = reviewer.RecordQA2Verdict(pb.RecordQA2VerdictRequest(
            run_id=run.run_id, verdict="SemiPass", comment="continuum rms 20% above the goal"), timeout=10)
        assert (done.qa2_verdict, done.qa2_reviewer) == ("SemiPass", "reviewer")
        assert op.GetRun(pb.GetRunRequest(run_id=run.run_id)).qa2_comment == "continuum rms 20% above the goal"
        verdict = pipeline_events(cfg, mous)[-1]
        assert (verdict.state, verdict.verdict, verdict.source, verdict.actor) == \
            ("QA2SemiPass", "SemiPass", "reviewer", "reviewer")
        assert verdict.comment == "continuum rms 20% above the goal"

        # replay: an operator's; without force nothing starts, with force one more run
        with pytest.raises(grpc.RpcError) as e:
            reader.ReplayTrigger(pb.ReplayTriggerRequest(decision_id=first.decision_id), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        replay = op.ReplayTrigger(pb.ReplayTriggerRequest(decision_id=first.decision_id), timeout=30)
        assert replay.action == "duplicate" and replay.replay_of == first.decision_id and replay.by == "operator"
        assert len(runs_of(op, mous)) == 1
        forced = op.ReplayTrigger(pb.ReplayTriggerRequest(decision_id=first.decision_id, force=True), timeout=30)
        assert forced.action == "started" and forced.forced and forced.run_id != run.run_id
        assert "forced replay by operator" in forced.reason
        assert wait_run(op, forced.run_id).status == pb.RUN_STATUS_SUCCEEDED
        assert len(runs_of(op, mous)) == 2
        listed = op.ListTriggerDecisions(pb.ListTriggerDecisionsRequest(mous_id=mous), timeout=10).decisions
        assert [d.action for d in listed][:2] == ["started", "duplicate"]      # newest first
        with pytest.raises(grpc.RpcError) as e:
            op.ReplayTrigger(pb.ReplayTriggerRequest(decision_id="999999999"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_bad_or_unmatched_events_start_nothing_and_say_why(env):
    _, cfg, op, _, _ = env
    key = upload_input(cfg, NGC5921)
    mous = f"uid://A001/X{uuid.uuid4().hex[:6]}/X2"
    cases = [
        (event("", key), "rejected", "mous_id is missing"),
        (event(mous, key, state="Observed"), "rejected", "state 'Observed' is not a state of the contract"),
        (event(mous, key, array="40m"), "rejected", "array '40m'"),
        (event(mous, "inputs/none/such.uvfits"), "rejected", "data_location: 'inputs/none/such.uvfits' not found"),
        (event(mous, ""), "rejected", "data_location is missing"),
        # read in place only under the stack's import roots (decision 0022)
        (event(mous, "file:///etc/"), "rejected", "data_location: file:///etc/: not under an import root"),
        (event(mous, f"file://{cfg.import_roots[0]}/none.ms"), "rejected", "no such file or directory"),
        (event(mous, key, state="PartiallyObserved"), "ignored", "no rule for telescope VLA"),
        (event(mous, key, telescope="ALMA", array="TP"), "ignored", "array TP, state FullyObserved"),
        # the default ALMA rule matches; the data are not there
        (event(mous, "raw/2026/", telescope="ALMA", array="12m"), "rejected", "no object under 'raw/2026/'"),
    ]
    for ev, _, _ in cases:
        publish(cfg, state_subject(ev.mous_id), ev.SerializeToString(), msg_id=ev.event_id)
    for ev, action, reason in cases:
        d, = decisions_of(op, ev.event_id)
        assert d.action == action and reason in d.reason and not d.run_id, (reason, d)
    assert runs_of(op, mous) == []
    # bytes that are no StateChange at all
    publish(cfg, "obs.state.garbage", b"\xff\xfe not protobuf")
    t_end = time.time() + 30
    while time.time() < t_end:
        latest = op.ListTriggerDecisions(pb.ListTriggerDecisionsRequest(limit=5), timeout=10).decisions
        if any("not a StateChange" in d.reason for d in latest):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("no decision about a message that is not a StateChange")


def test_a_failed_run_publishes_processing_failed_with_the_reason(env, tmp_path):
    _, cfg, op, reviewer, _ = env
    junk = tmp_path / "eb1.uvfits"
    junk.write_text("these are not visibilities\n")
    key = upload_input(cfg, str(junk))
    mous = f"uid://A001/X{uuid.uuid4().hex[:6]}/X3"
    ev = event(mous, key)
    publish(cfg, state_subject(mous), ev.SerializeToString(), msg_id=ev.event_id)
    d, = decisions_of(op, ev.event_id)
    assert d.action == "started", d
    run = wait_run(op, d.run_id)
    assert run.status == pb.RUN_STATUS_FAILED
    t_end = time.time() + 30
    while time.time() < t_end and len(pipeline_events(cfg, mous)) < 2:
        time.sleep(0.3)
    started, failed = pipeline_events(cfg, mous)
    assert (started.state, failed.state, failed.run_id) == ("PipelineProcessing", "ProcessingFailed", run.run_id)
    assert "importdata" in failed.reason and failed.reason == run.error
    # a failed run can only fail QA2
    with pytest.raises(grpc.RpcError) as e:
        reviewer.RecordQA2Verdict(pb.RecordQA2VerdictRequest(run_id=run.run_id, verdict="Pass"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "only Fail" in e.value.details()
    assert reviewer.RecordQA2Verdict(pb.RecordQA2VerdictRequest(run_id=run.run_id, verdict="Fail"),
                                     timeout=10).qa2_verdict == "Fail"


def test_a_claim_left_without_a_run_is_resolved(env):
    """The gateway killed between claiming (MOUS, recipe, version) and noting its run: the
    redelivered event finds the run the claim made, or, when there is none, starts it."""
    from gateway.trigger import CLAIMS_KV, claim_key_of
    _, cfg, op, _, _ = env
    key = upload_input(cfg, NGC5921)

    def set_claim(mous, age_s):
        async def go():
            nc = await _nats(cfg)
            kv = await nc.jetstream().key_value(CLAIMS_KV)
            await kv.put(claim_key_of(mous, "trigger_import", 1), json.dumps(
                {"mous_id": mous, "recipe": "trigger_import", "recipe_version": 1, "run_id": "",
                 "event_id": "lost", "time": time.time() - age_s}).encode())
            await nc.close()
        asyncio.run(go())

    # killed before the submit: no run names the claim, so the event starts one
    lost = f"uid://A001/X{uuid.uuid4().hex[:6]}/X4"
    set_claim(lost, 100)
    ev = event(lost, key)
    publish(cfg, state_subject(lost), ev.SerializeToString(), msg_id=ev.event_id)
    d, = decisions_of(op, ev.event_id)
    assert d.action == "started" and "took over a claim" in d.reason, d
    # killed after the submit: the run is found by its claim, nothing more starts
    set_claim(lost, 100)
    again = event(lost, key)
    publish(cfg, state_subject(lost), again.SerializeToString(), msg_id=again.event_id)
    dup, = decisions_of(op, again.event_id)
    assert dup.action == "duplicate" and dup.run_id == d.run_id, dup
    assert wait_run(op, d.run_id).status == pb.RUN_STATUS_SUCCEEDED
    assert [r.run_id for r in runs_of(op, lost)] == [d.run_id]


def test_an_mous_of_several_ebs_is_one_mous_run(env):
    """EBs under a data_location prefix, a recipe that splits: an MOUS run with a run per
    EB (decision 0012); cancelled at once, it publishes ProcessingFailed saying so."""
    from almapipe.platform.store import ObjectStore
    _, cfg, op, _, _ = env
    mous = f"uid://A001/X{uuid.uuid4().hex[:6]}/X5"
    prefix = f"mous-test/{mous.split('/')[-2]}/"
    store = ObjectStore(cfg)
    for name in ("eb2.uvfits.gz", "eb1.uvfits.gz"):
        store.put_file(NGC5921, prefix + name, bucket=store.raw_bucket)
    ev = event(mous, f"s3://{store.raw_bucket}/{prefix}", array="7m",
               eb_uids=["uid://A002/X1/X1", "uid://A002/X1/X2"])
    publish(cfg, state_subject(mous), ev.SerializeToString(), msg_id=ev.event_id)
    d, = decisions_of(op, ev.event_id)
    assert d.action == "started" and d.recipe == "alma_calimage" and "MOUS run of 2 EB(s)" in d.reason, d
    op.CancelRun(pb.CancelRunRequest(run_id=d.run_id), timeout=10)
    run = op.GetRun(pb.GetRunRequest(run_id=d.run_id), timeout=10)
    assert run.mous_id == mous and len(run.eb_run_ids) == 2 and run.status == pb.RUN_STATUS_CANCELLED
    assert [op.GetRun(pb.GetRunRequest(run_id=r)).input_key for r in run.eb_run_ids] == \
        [prefix + "eb1.uvfits.gz", prefix + "eb2.uvfits.gz"]
    t_end = time.time() + 30
    while time.time() < t_end and len(pipeline_events(cfg, mous)) < 2:
        time.sleep(0.3)
    states = [(e.state, e.run_id) for e in pipeline_events(cfg, mous)]
    assert states == [("PipelineProcessing", d.run_id), ("ProcessingFailed", d.run_id)], states
    assert "cancelled by operator" in pipeline_events(cfg, mous)[-1].reason
