"""Operations on a real local stack (issue 11): bounded requests, Upload, ListRuns
paging, metrics after a restart, and runs that survive NATS and S3 outages."""
from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest

from almapipe.cli import input_digest, upload_input, upload_via_gateway
from almapipe.config import port
from almapipe.platform.auth import channel
from almapipe.platform.store import ObjectStore
from almapipe.v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc
from conftest import NGC5921

# kills workers or restarts servers: the suite's pooled runs end first (tests/runpool.py)
DISTURBS_STACK = True

ONE_STAGE = [("x-almapipe-recipe", json.dumps({"name": "import-only", "stages": [{"stage": "importdata"}]}))]
IMPORT_FLAG = [("x-almapipe-recipe", json.dumps({"name": "import-flag", "stages": [
    {"stage": "importdata", "params": {}}, {"stage": "flagdata", "params": {}}]}))]
TERMINAL = (pb.RUN_STATUS_SUCCEEDED, pb.RUN_STATUS_FAILED, pb.RUN_STATUS_CANCELLED)


@pytest.fixture(scope="module")
def stub(stack):
    _, cfg = stack
    with channel(cfg) as ch:
        yield pb_grpc.PipelineServiceStub(ch)


def wait_run(stub, run_id, timeout=300):
    """GetRun until the run ends; an unreachable gateway or NATS (an outage the test
    makes) is waited out."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        try:
            run = stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=10)
            if run.status in TERMINAL:
                return run
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.INTERNAL):
                raise
        time.sleep(0.5)
    raise TimeoutError(run_id)


def _refused(call, code=grpc.StatusCode.INVALID_ARGUMENT):
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, (e.value.code(), e.value.details())
    assert len(e.value.details()) < 600     # a request is never echoed back at length
    return e.value.details()


# ------------------------------------------------------------------ inputs bounded

def test_upload_streams_an_input_and_checks_it(stub, stack, tmp_path):
    data = b"these are not visibilities\n" * 100000      # 2.7 MB: three chunks
    path = tmp_path / "notes.txt"
    path.write_bytes(data)
    key = upload_via_gateway(stub, pb, str(path))
    digest = hashlib.sha256(data).hexdigest()
    assert key == f"inputs/{digest[:16]}/notes.txt"
    # the key is a SubmitRun input: the run starts (and fails in importdata, not at submit)
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=ONE_STAGE, timeout=30)
    assert wait_run(stub, run.run_id, 120).status == pb.RUN_STATUS_FAILED

    # an MS directory travels as a tar made on the fly (no copy on disk), with the
    # sidecar files beside it, the same bytes as a tar written to a file
    import tarfile
    ms = tmp_path / "eb" / "x.ms"
    (ms / "SUB").mkdir(parents=True)
    (ms / "table.dat").write_bytes(b"0" * 5000)
    (ms / "SUB" / "table.f0").write_bytes(bytes(range(256)) * 9000)
    (tmp_path / "eb" / "flux.csv").write_text("ms,field,spw,I\n")
    (tmp_path / "eb" / "stray.txt").write_text("not a sidecar")
    key = upload_via_gateway(stub, pb, str(ms))
    with tarfile.open(tmp_path / "ref.tar", "w") as t:
        t.add(ms, arcname="x.ms")
        t.add(tmp_path / "eb" / "flux.csv", arcname="flux.csv")
    ref = (tmp_path / "ref.tar").read_bytes()
    assert key == f"inputs/{hashlib.sha256(ref).hexdigest()[:16]}/x.ms.tar"
    # its digest taken beforehand (`almapipe run` takes it while the stack starts)
    assert input_digest(str(ms)) == ("x.ms.tar", len(ref), hashlib.sha256(ref).hexdigest())
    assert upload_via_gateway(stub, pb, str(ms), input_digest(str(ms))) == key

    def up(*chunks):
        return stub.Upload(iter(chunks), timeout=30)
    # more than one of the gateway's parts (UPLOAD_PART_BYTES), in blocks that do not divide them
    rng = np.random.default_rng(5)
    big = rng.integers(0, 256, (70 << 20) + 12345, dtype=np.uint8).tobytes()
    digest = hashlib.sha256(big).hexdigest()
    blocks = [big[i:i + 3_000_001] for i in range(0, len(big), 3_000_001)]
    resp = up(pb.UploadChunk(name="big.bin", size=len(big), sha256=digest, data=blocks[0]),
              *(pb.UploadChunk(data=b) for b in blocks[1:]))
    store = ObjectStore(stack[1])
    assert resp.key == f"inputs/{digest[:16]}/big.bin"
    assert hashlib.sha256(store.get_bytes(resp.key, bucket=store.raw_bucket)).hexdigest() == digest
    store.remove(resp.key, bucket=store.raw_bucket)
    # more bytes than declared, found after two parts have gone to S3: refused, nothing kept
    assert "more than the declared" in _refused(
        lambda: up(pb.UploadChunk(name="big.bin", size=40 << 20, sha256=digest, data=blocks[0]),
                   *(pb.UploadChunk(data=b) for b in blocks[1:])))
    assert not store.exists(resp.key, bucket=store.raw_bucket)
    assert "sha256" in _refused(lambda: up(pb.UploadChunk(name="a.txt", size=3, sha256="0" * 64, data=b"abc")),
                                grpc.StatusCode.DATA_LOSS)
    assert "name" in _refused(lambda: up(pb.UploadChunk(name="../etc/passwd", size=3, data=b"abc")))
    assert "size" in _refused(lambda: up(pb.UploadChunk(name="a.txt", size=1 << 50, data=b"abc")))
    assert "size" in _refused(lambda: up(pb.UploadChunk(name="a.txt", size=2, data=b"abc")))
    assert "size" in _refused(lambda: up(pb.UploadChunk(name="a.txt", size=9, data=b"abc")))


def test_a_recipe_is_a_name_never_a_path(stub, stack):
    _, cfg = stack
    key = upload_input(cfg, NGC5921)
    for name in ("../../../etc/passwd", "/tmp/evil", "ngc5921/../vla_calimage", "NGC5921", "x" * 100000):
        details = _refused(lambda: stub.SubmitRun(pb.SubmitRunRequest(input_key=key, recipe=name), timeout=10))
        assert details.startswith("recipe:") and ("unknown recipe" in details or "at most 64" in details), details


def test_server_caps_cannot_be_lifted_by_a_request(stub, stack):
    _, cfg = stack
    key = upload_input(cfg, NGC5921)
    big = {"makeimages.cube": json.dumps({"imsize": 256, "max_imsize": 100000})}
    details = _refused(lambda: stub.SubmitRun(pb.SubmitRunRequest(input_key=key, recipe="ngc5921",
                                                                  parameters=big), timeout=10))
    assert "makeimages.cube.max_imsize" in details and "ALMAPIPE_MAX_IMSIZE" in details
    chans = {"makeimages.cube": json.dumps({"chans": "0~99999"})}
    details = _refused(lambda: stub.SubmitRun(pb.SubmitRunRequest(input_key=key, recipe="ngc5921",
                                                                  parameters=chans), timeout=10))
    assert "ALMAPIPE_MAX_IMAGE_CHANNELS" in details


def test_malformed_requests_name_the_field(stub, stack):
    _, cfg = stack
    key = upload_input(cfg, NGC5921)
    cases = [
        (lambda: stub.SubmitRun(pb.SubmitRunRequest(input_key=key, label="x" * (1 << 20)), timeout=10), "label"),
        (lambda: stub.SubmitRun(pb.SubmitRunRequest(input_key="../" + key), timeout=10), "input_key"),
        (lambda: stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=[("x-almapipe-recipe", "[1]")],
                                timeout=10), "x-almapipe-recipe"),
        (lambda: stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=[("x-almapipe-recipe", "{nope")],
                                timeout=10), "x-almapipe-recipe"),
        (lambda: stub.GetRun(pb.GetRunRequest(run_id=""), timeout=10), "run_id"),
        (lambda: stub.GetRun(pb.GetRunRequest(run_id="a.b.>"), timeout=10), "run_id"),
        (lambda: stub.CancelRun(pb.CancelRunRequest(run_id="*"), timeout=10), "run_id"),
        (lambda: stub.ListRuns(pb.ListRunsRequest(limit=-1), timeout=10), "limit"),
        (lambda: stub.ListRuns(pb.ListRunsRequest(page_token="garbage"), timeout=10), "page_token"),
        (lambda: stub.ListProducts(pb.ListProductsRequest(run_id="x", url_expiry_s=-5), timeout=10),
         "url_expiry_s"),
    ]
    for call, field in cases:
        details = _refused(call)
        assert details.startswith(field), (field, details)


# ------------------------------------------------------------------ ListRuns and metrics

def _all_pages(stub, limit):
    ids, token, pages = [], "", 0
    while True:
        resp = stub.ListRuns(pb.ListRunsRequest(limit=limit, page_token=token), timeout=10)
        assert len(resp.runs) <= limit
        ids += [r.run_id for r in resp.runs]
        pages += 1
        token = resp.next_page_token
        if not token:
            return ids, pages


def test_list_runs_pages_every_run_exactly_once(stub, stack, tmp_path):
    _, cfg = stack
    junk = tmp_path / "junk.txt"
    junk.write_text("no data here\n")
    key = upload_input(cfg, str(junk))
    mine = [stub.SubmitRun(pb.SubmitRunRequest(input_key=key, label=f"page{i}"), metadata=ONE_STAGE,
                           timeout=30).run_id for i in range(7)]
    ids, pages = _all_pages(stub, 3)
    assert len(ids) == len(set(ids)), "a run listed twice"
    assert set(mine) <= set(ids)
    assert pages >= 3
    created = [stub.GetRun(pb.GetRunRequest(run_id=i)).created_unix for i in ids]
    assert created == sorted(created, reverse=True)     # newest first, across pages
    first = stub.ListRuns(pb.ListRunsRequest(), timeout=10)
    assert [r.run_id for r in first.runs] == ids[:len(first.runs)]
    # a run made while paging appears on no later page
    resp = stub.ListRuns(pb.ListRunsRequest(limit=2), timeout=10)
    extra = stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=ONE_STAGE, timeout=30).run_id
    rest, _ = [], resp.next_page_token
    token = resp.next_page_token
    while token:
        r = stub.ListRuns(pb.ListRunsRequest(limit=2, page_token=token), timeout=10)
        rest += [x.run_id for x in r.runs]
        token = r.next_page_token
    assert extra not in rest and [r.run_id for r in resp.runs] + rest == [i for i in ids if i != extra][:len(ids)]
    for run_id in mine + [extra]:
        wait_run(stub, run_id, 120)


def _metric(name: str, labels: str = "") -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port('metrics_gateway')}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_runs_active_is_right_after_a_gateway_restart(stub, stack):
    """The gauge counts the runs the records say are active. The importer is held down
    while the gateway restarts and both are read, so the run cannot end in between."""
    st, cfg = stack
    key = upload_input(cfg, NGC5921)
    st.stop("worker-importer")
    try:
        run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=IMPORT_FLAG, timeout=30)
        st.restart("gateway")
        with channel(cfg) as ch:
            fresh = pb_grpc.PipelineServiceStub(ch)
            ids, _ = _all_pages(fresh, 100)
            active = sum(fresh.GetRun(pb.GetRunRequest(run_id=i)).status not in TERMINAL for i in ids)
            assert active >= 1
            assert _metric("almapipe_runs_active") == active
    finally:
        st.start("worker-importer")
    with channel(cfg) as ch:
        fresh = pb_grpc.PipelineServiceStub(ch)
        assert wait_run(fresh, run.run_id).status == pb.RUN_STATUS_SUCCEEDED
        assert _metric("almapipe_runs_active") == active - 1


def test_queue_pending_is_set_per_service(stack):
    # the gateway polls the queues every 5 s, one service after another: a gauge may be
    # unset or still count the request the previous test's run left a moment ago
    t_end = time.time() + 30
    while time.time() < t_end and any(_metric("almapipe_queue_pending", f'{{service="{svc}"}}') != 0.0
                                      for svc in ("importer", "calibrator", "imager", "weblog")):
        time.sleep(1)
    for svc in ("importer", "calibrator", "imager", "weblog"):
        assert _metric("almapipe_queue_pending", f'{{service="{svc}"}}') == 0.0, svc


# ------------------------------------------------------------------ faults

def _all_alive(st):
    """No process of the stack exited (the log's end says why if one did)."""
    dead = {n: open(p["log"]).read()[-1500:] for n, p in st.status().items() if not p["alive"]}
    assert not dead, dead


def _wait_stage_running(stub, run_id, index=0, timeout=60):
    t_end = time.time() + timeout
    while time.time() < t_end:
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=10)
        if run.stages[index].status == pb.STAGE_STATUS_DISPATCHED:
            return
        time.sleep(0.1)
    raise TimeoutError(run_id)


def test_a_nats_restart_mid_run_does_not_stop_it(stub, stack):
    """NATS away for ~10 s while the importer works: workers and gateway reconnect, the
    stage's event is published once NATS is back, and the run succeeds."""
    st, cfg = stack
    key = upload_input(cfg, NGC5921)
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=IMPORT_FLAG, timeout=30)
    _wait_stage_running(stub, run.run_id)
    time.sleep(1.0)
    st.stop("nats")
    time.sleep(10)
    st.start("nats")
    done = wait_run(stub, run.run_id, 300)
    assert done.status == pb.RUN_STATUS_SUCCEEDED, done.error
    _all_alive(st)


def test_an_s3_outage_mid_stage_is_not_a_stage_failure(stub, stack):
    """S3 away for ~8 s (and its start-up) during importdata: the worker runs the stage
    again when S3 is back, without using up a delivery, and the run succeeds. (The fault
    suite, test_resilience, stops it for 60 s.)"""
    st, cfg = stack
    key = upload_input(cfg, NGC5921)
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=IMPORT_FLAG, timeout=30)
    _wait_stage_running(stub, run.run_id)
    st.stop("s3")
    time.sleep(8)
    st.start("s3")
    done = wait_run(stub, run.run_id, 300)
    assert done.status == pb.RUN_STATUS_SUCCEEDED, done.error
    assert done.stages[0].attempts == 1
    _all_alive(st)


def test_a_worker_killed_mid_stage_is_restarted_and_its_stage_dispatched_again(stub, stack):
    """kill -9 of the importer while it works: the stack's supervisor starts it again,
    the gateway notices the stage's heartbeats stopped and dispatches it again, and
    the run succeeds."""
    import os
    import signal
    st, cfg = stack
    key = upload_input(cfg, NGC5921)
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=IMPORT_FLAG, timeout=30)
    _wait_stage_running(stub, run.run_id)
    # kill as soon as the worker has taken the stage (it sends its first heartbeat then):
    # on an idle machine importing NGC 5921 takes only a couple of seconds
    log_path = st.status()["worker-importer"]["log"]
    t_end = time.time() + 30
    while run.run_id not in open(log_path).read() and time.time() < t_end:
        time.sleep(0.05)
    time.sleep(0.2)
    old_pid = st.load()["procs"]["worker-importer"]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    events = list(stub.WatchRun(pb.WatchRunRequest(run_id=run.run_id), timeout=400))
    done = stub.GetRun(pb.GetRunRequest(run_id=run.run_id), timeout=10)
    assert done.status == pb.RUN_STATUS_SUCCEEDED, done.error
    assert any("no heartbeat" in e.message for e in events), [e.message for e in events]
    now = st.status()["worker-importer"]
    assert now["alive"] and now["pid"] != old_pid and now["restarts"] >= 1


def test_status_shows_endpoints_health_and_active_runs(stub, stack):
    import os
    import subprocess
    import sys
    st, cfg = stack
    key = upload_input(cfg, NGC5921)
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=IMPORT_FLAG, timeout=30)
    out = subprocess.run([sys.executable, "-m", "almapipe.cli", "status"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ)).stdout
    assert f"gateway  {cfg.gateway_addr}" in out and "NATS" in out and "S3" in out, out
    assert out.count("healthy") >= 3 and "NOT ANSWERING" not in out, out
    assert run.run_id in out and "supervisor" in out, out
    wait_run(stub, run.run_id)
