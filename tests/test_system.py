"""The whole system on a real local stack: NATS JetStream, an S3 server, the gateway
and one worker per service, started by the same launcher as `almapipe up`.

The end-to-end test runs the default recipe on the real VLA NGC 5921 data and
compares with CASA 6.7 on the same steps (numbers from the issue):
fluxscale 2.5265 +- 0.0022 Jy for 1445+099; cube off-line rms ~1.8 mJy/beam
and peak ~56 mJy/beam.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from almapipe.cli import download_products, upload_input
from almapipe.platform import bus
from almapipe.platform.auth import channel
from almapipe.platform.stack import Stack, StackError
from almapipe.v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc
from conftest import NGC5921
from runpool import pooled

# kills workers or restarts servers: the suite's pooled runs end first (tests/runpool.py)
DISTURBS_STACK = True

CASA_FLUX_1445 = 2.5265
CASA_CUBE_RMS = 1.8e-3
CASA_CUBE_PEAK = 56e-3


@pytest.fixture(scope="module")
def stub(stack):
    _, cfg = stack
    with channel(cfg) as ch:     # the operator token of the stack's credentials.json
        yield pb_grpc.PipelineServiceStub(ch)


def wait_run(stub, run_id, timeout=400):
    t_end = time.time() + timeout
    while time.time() < t_end:
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        if run.status in (pb.RUN_STATUS_SUCCEEDED, pb.RUN_STATUS_FAILED, pb.RUN_STATUS_CANCELLED):
            return run
        time.sleep(0.5)
    raise TimeoutError(run_id)


@pooled("ngc_run")
def submit_ngc_run(stack, stub, d):  # noqa: F811
    """The default recipe on NGC 5921, submitted through the gRPC API with the suite's
    other long runs (tests/runpool.py) and watched: WatchRun streams a run's events
    from its first, whenever it is called."""
    _, cfg = stack
    key = upload_input(cfg, NGC5921)
    run_id = stub.SubmitRun(pb.SubmitRunRequest(input_key=key, recipe="ngc5921", label="e2e")).run_id

    def finish():
        events = list(stub.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=900))
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id))
        download_products(stub, pb, run_id, str(d))
        return run, events, str(d)
    return finish


@pytest.fixture(scope="module")
def ngc_run(run_pool):
    return run_pool.result("ngc_run")


def test_e2e_run_succeeds_with_every_stage_scored(ngc_run):
    run, events, out = ngc_run
    assert run.status == pb.RUN_STATUS_SUCCEEDED, run.error
    names = [s.name for s in run.stages]
    assert names[:3] == ["importdata", "flagdata", "refant"] and names[-1] == "weblog"
    for s in run.stages:
        assert 0.0 <= s.qa_score <= 1.0 and s.status == pb.STAGE_STATUS_SUCCEEDED
    done = [e.stage for e in events if e.status == pb.STAGE_STATUS_SUCCEEDED]
    assert done == names   # WatchRun streamed every stage, in order
    assert events[-1].stage == "_run" and events[-1].run_status == pb.RUN_STATUS_SUCCEEDED


def test_e2e_products_package_layout(ngc_run):
    _, _, out = ngc_run
    for d in ("product", "calibration", "qa", "log", "script"):
        assert os.path.isdir(os.path.join(out, d)), d
    assert os.path.exists(os.path.join(out, "README"))
    assert os.path.exists(os.path.join(out, "qa", "weblog", "index.html"))
    assert os.path.exists(os.path.join(out, "qa", "weblog.tar.gz"))
    assert os.path.exists(os.path.join(out, "calibration", "ngc5921.cont.dat"))
    assert not os.path.exists(os.path.join(out, "product", "cont.dat"))
    readme = open(os.path.join(out, "README")).read()
    assert "QA2" in readme and "ngc5921" in readme
    recipe = json.load(open(os.path.join(out, "script", "recipe.json")))
    assert recipe["name"] == "ngc5921"
    html = open(os.path.join(out, "qa", "weblog", "by_task.html")).read()
    assert "qa-green" in html and "fluxscale" in html
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "SUCCEEDED"
    for s in summary["stages"]:
        assert {"name", "status", "qa_score", "duration_s"} <= set(s)
    for img in summary["images"]:
        assert {"file", "field", "spw", "specmode", "peak_jy_per_beam", "rms_jy_per_beam", "beam_arcsec"} <= set(img)


def test_e2e_fluxscale_agrees_with_casa(ngc_run):
    _, _, out = ngc_run
    summary = json.load(open(os.path.join(out, "summary.json")))
    (fs,) = [f for f in summary["fluxscale"] if f["field"].startswith("1445")]
    assert abs(fs["flux_jy"] / CASA_FLUX_1445 - 1) < 0.01, fs
    assert 0 < fs["flux_err_jy"] < 0.01
    assert "1445+09900002_0" in open(os.path.join(out, "calibration", "flux.csv")).read()


def test_e2e_cube_agrees_with_casa_and_shows_the_hi_line(ngc_run):
    _, _, out = ngc_run
    summary = json.load(open(os.path.join(out, "summary.json")))
    (cube,) = [i for i in summary["images"] if i["specmode"] == "cube"]
    assert abs(cube["rms_jy_per_beam"] / CASA_CUBE_RMS - 1) < 0.2, cube
    assert abs(cube["peak_jy_per_beam"] / CASA_CUBE_PEAK - 1) < 0.2, cube
    # the HI emission of NGC 5921 lies in channels ~10-45 (the line-free ones are 4~6 and 50~59)
    assert 10 <= cube["peak_channel"] <= 48
    path = os.path.join(out, "product", cube["file"])
    with fits.open(path) as h:
        hdr, data = h[0].header, h[0].data
        w = WCS(hdr)
        assert w.has_celestial and w.wcs.spec >= 0 and hdr["SPECSYS"] == "LSRK"
        assert hdr["BMAJ"] > 0 and hdr["BUNIT"] == "Jy/beam"
        assert data.shape[-3:] == (46, 256, 256)
        # as exportfits writes it: the HI line's rest frequency (from the UVFITS SU table), so
        # a velocity axis; J2000 directions are FK5; the observation's start and observer
        assert hdr["RESTFRQ"] == 1420405752.0 and w.wcs.restfrq == 1420405752.0
        assert hdr["RADESYS"] == "FK5" and hdr["EQUINOX"] == 2000.0
        assert hdr["DATE-OBS"].startswith("1995-04-13T09:19") and hdr["TIMESYS"] == "UTC"
        assert hdr["INSTRUME"] == "VLA" and hdr["OBSERVER"] == "TEST" and hdr["BTYPE"] == "Intensity"
        assert os.path.basename(path).startswith("ngc5921.s") and ".N5921_2_sci.spw0.cube.I." in path
    # in the flat-noise image (not divided by the primary beam) the line channels
    # stand far above the noise; the line-free channels 5, 6 and 50 do not
    with fits.open(path.replace(".pbcor.fits", ".image.fits")) as h:
        peak_per_chan = np.nanmax(h[0].data[0], axis=(1, 2))
    line = peak_per_chan[10 - 5:45 - 5]
    free = np.r_[peak_per_chan[:2], peak_per_chan[-1:]]
    assert line.max() > 10 * cube["rms_jy_per_beam"]
    assert free.max() < 6 * cube["rms_jy_per_beam"]


def test_e2e_calibrator_images_recover_their_flux(ngc_run):
    _, _, out = ngc_run
    summary = json.load(open(os.path.join(out, "summary.json")))
    cal = {i["field"]: i for i in summary["images"] if i["specmode"] == "mfs"}
    assert abs(cal["1331+30500002_0"]["peak_jy_per_beam"] / 15.01 - 1) < 0.02
    assert abs(cal["1445+09900002_0"]["peak_jy_per_beam"] / CASA_FLUX_1445 - 1) < 0.02


def test_e2e_caltables_open_with_casa_layout(ngc_run, tmp_path):
    import tarfile
    import casacore.tables as ct
    _, _, out = ngc_run
    with tarfile.open(os.path.join(out, "calibration", "ngc5921.bandpass.tbl.tar")) as t:
        t.extractall(tmp_path, filter="data")
    with ct.table(str(tmp_path / "ngc5921.bandpass.tbl"), ack=False) as tb:
        assert tb.getkeyword("VisCal") == "B Jones"
        assert tb.getcol("CPARAM").shape[1:] == (63, 2)


# ------------------------------------------------------------------ API behaviour

def test_health_reflection_and_metrics(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    st, cfg = stack
    with grpc.insecure_channel(cfg.gateway_addr) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="almapipe.v1.PipelineService"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert "almapipe.v1.PipelineService" in names and "grpc.health.v1.Health" in names
    from almapipe.config import port
    for name in ("metrics_gateway", "metrics_calibrator"):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port(name)}/metrics", timeout=5).read().decode()
        assert "almapipe_" in text


def test_malformed_requests_are_refused_with_reasons(stub, stack):
    _, cfg = stack
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitRun(pb.SubmitRunRequest())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input_key" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitRun(pb.SubmitRunRequest(input_key="inputs/none/missing.fits"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    key = upload_input(cfg, NGC5921)
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitRun(pb.SubmitRunRequest(input_key=key, recipe="no-such-recipe"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown recipe" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitRun(pb.SubmitRunRequest(input_key=key, parameters={"nosuchstage.x": "1"}))
    assert "no stage" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetRun(pb.GetRunRequest(run_id="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_input_that_is_not_data_fails_the_run_clearly(stub, stack, tmp_path):
    _, cfg = stack
    junk = tmp_path / "notes.txt"
    junk.write_text("these are not visibilities\n" * 50)
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=upload_input(cfg, str(junk))))
    run = wait_run(stub, run.run_id, 60)
    assert run.status == pb.RUN_STATUS_FAILED
    assert "importdata" in run.error and "neither a MeasurementSet" in run.error
    assert run.stages[0].attempts == 1   # a bad input is not retried
    assert all(s.status == pb.STAGE_STATUS_SKIPPED for s in run.stages[1:-1])
    # the WebLog is still made, and shows the failure at a glance
    out = tmp_path / "failed-products"
    download_products(stub, pb, run.run_id, str(out))
    home = (out / "qa" / "weblog" / "index.html").read_text()
    assert "Run FAILED at stage" in home and "neither a MeasurementSet" in home
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["stages"][0]["status"] == "FAILED"


def test_missing_calibrator_role_fails_with_the_field_named(stub, stack):
    _, cfg = stack
    key = upload_input(cfg, NGC5921)
    run = stub.SubmitRun(pb.SubmitRunRequest(
        input_key=key, recipe="ngc5921",
        parameters={"importdata.field_roles": json.dumps({"1331+30500002_0": "BANDPASS",
                                                           "1445+09900002_0": "PHASE", "N5921_2": "TARGET"})}))
    run = wait_run(stub, run.run_id, 120)
    assert run.status == pb.RUN_STATUS_FAILED
    assert "setjy" in run.error and "no field has intent FLUX" in run.error


def test_transient_failure_is_retried_then_failed_with_reason(stack):
    """A request whose context object is missing fails in S3, which is not a
    StageError: the worker naks it until the delivery limit, then fails it."""
    _, cfg = stack

    async def go():
        nc, js = await bus.connect(cfg, "test")
        run_id = "retrytest"
        sub = await js.subscribe(f"events.run.{run_id}.>")
        req = pb.StageRequest(run_id=run_id, stage_index=0, stage="refant", service="calibrator",
                              context_key="runs/retrytest/context/missing.json", params_json="{}")
        await js.publish(bus.work_subject("calibrator", "refant"), req.SerializeToString())
        statuses = []
        t_end = time.time() + 60
        while time.time() < t_end:
            msg = await sub.next_msg(timeout=30)
            ev = pb.StageEvent()
            ev.ParseFromString(msg.data)
            statuses.append((ev.status, ev.attempt, ev.message))
            if ev.status == pb.STAGE_STATUS_FAILED:
                break
        await nc.close()
        return statuses

    statuses = asyncio.run(go())
    assert [s[0] for s in statuses] == [pb.STAGE_STATUS_RETRYING] * (cfg.max_deliver - 1) + [pb.STAGE_STATUS_FAILED]
    assert statuses[-1][1] == cfg.max_deliver and "missing.json" in statuses[-1][2]


def test_gateway_restart_resumes_the_run(stub, stack):
    st, cfg = stack
    key = upload_input(cfg, NGC5921)
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key, recipe="ngc5921",
                                             parameters={"makeimages.target_cube": "false"}))
    t_end = time.time() + 60
    while stub.GetRun(pb.GetRunRequest(run_id=run.run_id)).current_stage < 3 and time.time() < t_end:
        time.sleep(0.2)
    st.restart("gateway")     # SIGKILL, then a fresh gateway process
    with channel(cfg) as ch:
        fresh = pb_grpc.PipelineServiceStub(ch)
        done = wait_run(fresh, run.run_id, 300)
    assert done.status == pb.RUN_STATUS_SUCCEEDED, done.error


def test_cancel_and_list(stub, stack):
    _, cfg = stack
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=upload_input(cfg, NGC5921), recipe="ngc5921", label="c"))
    cancelled = stub.CancelRun(pb.CancelRunRequest(run_id=run.run_id))
    assert cancelled.status == pb.RUN_STATUS_CANCELLED
    listed = {r.run_id: r for r in stub.ListRuns(pb.ListRunsRequest()).runs}
    assert listed[run.run_id].status == pb.RUN_STATUS_CANCELLED


# ------------------------------------------------------------------ servers down or busy

def test_port_in_use_is_a_clear_error(tmp_path, monkeypatch):
    import socket
    from conftest import _free_base
    base = _free_base()
    busy = base + 22   # the NATS port
    s = socket.socket()
    s.bind(("127.0.0.1", busy))
    s.listen()
    monkeypatch.setenv("ALMAPIPE_PORT_BASE", str(base))
    try:
        with pytest.raises(StackError, match=f"nats \\({busy}\\)"):
            Stack(str(tmp_path)).up()
    finally:
        s.close()


def test_servers_down_give_clear_errors(monkeypatch, tmp_path):
    from almapipe.config import Config
    from almapipe.platform.store import ObjectStore, StoreError
    monkeypatch.setenv("ALMAPIPE_NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("ALMAPIPE_S3_ENDPOINT", "127.0.0.1:1")
    monkeypatch.setenv("ALMAPIPE_DATA_DIR", str(tmp_path))
    with pytest.raises(StoreError, match="no S3 credentials"):
        ObjectStore(Config.from_env())
    monkeypatch.setenv("ALMAPIPE_S3_SECRET_KEY", "x" * 16)
    cfg = Config.from_env()
    with pytest.raises(bus.BusError, match="NATS at nats://127.0.0.1:1 unavailable"):
        asyncio.run(bus.connect(cfg, "t"))
    with pytest.raises(StoreError, match="object store at 127.0.0.1:1 unavailable"):
        ObjectStore(cfg).ensure_buckets()
    # the gateway process exits with the reason in its log
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unavailable" in proc.stderr


def test_ms_tar_input_and_a_recipe_document(stack, stub, ngc5921_ms):
    """An MS directory is uploaded as a tar, and a whole recipe is sent with the request."""
    _, cfg = stack
    key = upload_input(cfg, ngc5921_ms)
    assert key.endswith(".tar")
    recipe = {"name": "import-only", "stages": [{"stage": "importdata", "params": {"name": "viams"}},
                                                {"stage": "flagdata", "params": {"template": "antenna='VL05'"}}]}
    run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key),
                         metadata=[("x-almapipe-recipe", json.dumps(recipe))])
    run = wait_run(stub, run.run_id, 120)
    assert run.status == pb.RUN_STATUS_SUCCEEDED, run.error
    assert run.recipe == "import-only" and [s.name for s in run.stages] == ["importdata", "flagdata"]
    assert any("MeasurementSet" in r for r in run.stages[0].qa_reasons)
    assert any("template" in r for r in run.stages[1].qa_reasons)


def _run_ids(stub) -> set:
    ids, token = set(), ""
    while True:
        resp = stub.ListRuns(pb.ListRunsRequest(limit=100, page_token=token), timeout=10)
        ids |= {r.run_id for r in resp.runs}
        token = resp.next_page_token
        if not token:
            return ids


def test_a_wrong_parameter_is_refused_at_submit_and_nothing_runs(stack, stub):
    """Parameters are checked against the stages' declarations in SubmitRun (decision
    0016): a misspelt name, a wrong type or a value out of range is INVALID_ARGUMENT
    naming the stage, the parameter and what it allows, and no run is made (before, a
    misspelt name was ignored and a bad value failed the stage minutes later)."""
    _, cfg = stack
    key = upload_input(cfg, NGC5921)
    before = _run_ids(stub)
    cases = [
        (dict(recipe="ngc5921", parameters={"bandpass.solintt": '"inf"'}), [],
         ["bandpass", "'solintt'", "allowed: combine"]),
        (dict(recipe="ngc5921", parameters={"makeimages.cube": json.dumps({"niter": "lots"})}), [],
         ["makeimages.cube.niter", '"lots"', "expected int"]),
        (dict(recipe="ngc5921", parameters={"bandpass.solint": "often"}), [],
         ["bandpass.solint", "often", "int|scan|inf"]),
        (dict(parameters={"gaincal.nosuchparam": "1"}), [], ["gaincal", "'nosuchparam'", "allowed:"]),   # auto recipe
        (dict(), [("x-almapipe-recipe", json.dumps({"stages": [{"stage": "importdata", "params": {}},
                                                              {"stage": "flagdata", "params": {"autocorr": "yes"}}]}))],
         ["flagdata.autocorr", "expected bool"]),
    ]
    for fields, metadata, words in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitRun(pb.SubmitRunRequest(input_key=key, **fields), metadata=metadata, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert all(w in e.value.details() for w in words), e.value.details()
    assert _run_ids(stub) == before           # nothing was submitted, nothing runs
