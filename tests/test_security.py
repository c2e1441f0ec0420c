"""Nothing of a local stack is open without credentials (decision 0009).

Against the real stack of the `stack` fixture: gateway tokens and roles, a run
cancelled only by its submitter or an operator, NATS users, no anonymous S3
side door on any port, loopback-only ports derived from the port base, the
data directory's modes, and the gateway over TLS.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from almapipe.platform import auth
from almapipe.platform.auth import METHOD_ROLES, channel
from almapipe.platform.stack import stack_ports
from almapipe.v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_rpc_has_a_role():
    """A new RPC is never open by omission: the gateway refuses a method without a role."""
    rpcs = set(pb.DESCRIPTOR.services_by_name["PipelineService"].methods_by_name)
    assert rpcs == set(METHOD_ROLES), rpcs ^ set(METHOD_ROLES)


def test_token_table_keeps_only_hashes(tmp_path):
    path = str(tmp_path / "t.json")
    tok = auth.add_token(path, "alice", "submitter")
    text = open(path).read()
    assert tok not in text and auth.token_hash(tok) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    table = auth.TokenTable(path)
    who = table.authorize([("authorization", f"Bearer {tok}")], "SubmitRun")
    assert who == auth.Identity("alice", "submitter")
    with pytest.raises(auth.AuthError) as e:
        table.authorize([("authorization", "Basic abc")], "GetRun")
    assert not e.value.denied
    with pytest.raises(ValueError, match="role"):
        auth.add_token(path, "eve", "root")


def _creds(cfg):
    with open(os.path.join(cfg.data_dir, "credentials.json")) as f:
        return json.load(f)


def _token(cfg, role):
    return _creds(cfg)["tokens"][role]["token"]


CALLS = {
    "SubmitRun": lambda s: s.SubmitRun(pb.SubmitRunRequest(input_key="x"), timeout=10),
    "GetRun": lambda s: s.GetRun(pb.GetRunRequest(run_id="x"), timeout=10),
    "ListRuns": lambda s: s.ListRuns(pb.ListRunsRequest(), timeout=10),
    "WatchRun": lambda s: list(s.WatchRun(pb.WatchRunRequest(run_id="x"), timeout=10)),
    "CancelRun": lambda s: s.CancelRun(pb.CancelRunRequest(run_id="x"), timeout=10),
    "ListProducts": lambda s: s.ListProducts(pb.ListProductsRequest(run_id="x"), timeout=10),
    "FetchProduct": lambda s: list(s.FetchProduct(pb.FetchProductRequest(run_id="x", path="y"), timeout=10)),
    "Upload": lambda s: s.Upload(iter([pb.UploadChunk(name="a.uvfits", data=b"x", size=1)]), timeout=10),
    "RecordQA2Verdict": lambda s: s.RecordQA2Verdict(pb.RecordQA2VerdictRequest(run_id="x", verdict="Pass"),
                                                     timeout=10),
    "ListTriggerDecisions": lambda s: s.ListTriggerDecisions(pb.ListTriggerDecisionsRequest(), timeout=10),
    "ReplayTrigger": lambda s: s.ReplayTrigger(pb.ReplayTriggerRequest(decision_id="1"), timeout=10),
}


def _code(call, stub):
    try:
        call(stub)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_no_token_no_call_but_health_stays_open(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    _, cfg = stack
    assert set(CALLS) >= set(METHOD_ROLES)
    for token in ("", "alm_not-a-token"):
        with channel(cfg, token=token) as ch:
            stub = pb_grpc.PipelineServiceStub(ch)
            for name in METHOD_ROLES:
                code, details = _code(CALLS[name], stub)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (name, token, code, details)
            h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert h.status == health_pb2.HealthCheckResponse.SERVING


def test_a_reader_looks_but_does_not_touch(stack):
    _, cfg = stack
    with channel(cfg, token=_token(cfg, "reader")) as ch:
        stub = pb_grpc.PipelineServiceStub(ch)
        for name in ("SubmitRun", "CancelRun", "Upload"):
            code, details = _code(CALLS[name], stub)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "submitter" in details, (name, code, details)
        stub.ListRuns(pb.ListRunsRequest(), timeout=10)
        assert _code(CALLS["GetRun"], stub)[0] == grpc.StatusCode.NOT_FOUND   # allowed, no such run


def test_only_the_submitter_or_an_operator_cancels(stack, tmp_path):
    from almapipe.cli import upload_input
    _, cfg = stack
    bob = auth.add_token(cfg.tokens_file, "bob", "submitter")   # picked up without a restart
    junk = tmp_path / "notes.txt"
    junk.write_text("not visibilities\n")
    key = upload_input(cfg, str(junk))
    one_stage = [("x-almapipe-recipe", json.dumps({"name": "import-only", "stages": [{"stage": "importdata"}]}))]
    with channel(cfg, token=_token(cfg, "submitter")) as a, channel(cfg, token=bob) as b, channel(cfg) as op:
        alice, bob_stub, operator = (pb_grpc.PipelineServiceStub(c) for c in (a, b, op))
        run = alice.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=one_stage, timeout=30)
        code, details = _code(lambda s: s.CancelRun(pb.CancelRunRequest(run_id=run.run_id)), bob_stub)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "submitter" in details, details
        alice.CancelRun(pb.CancelRunRequest(run_id=run.run_id), timeout=10)
        other = alice.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=one_stage, timeout=30)
        operator.CancelRun(pb.CancelRunRequest(run_id=other.run_id), timeout=10)   # an operator may


def test_nats_wants_a_user_and_a_worker_cannot_rewrite_runs(stack):
    import nats
    from nats.errors import NoServersError
    _, cfg = stack

    async def go():
        with pytest.raises((NoServersError, Exception)) as e:
            await nats.connect(cfg.nats_url, connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False)
        assert "uthorization" in repr(e.value) or isinstance(e.value, NoServersError), repr(e.value)
        with pytest.raises(Exception):
            await nats.connect(cfg.nats_url, user="importer", password="guess", connect_timeout=3,
                               max_reconnect_attempts=0, allow_reconnect=False)
        # a worker's own user connects, but may not write the gateway's run records
        errors = []

        async def on_error(exc):
            errors.append(str(exc))
        nc = await nats.connect(cfg.nats_url, user="importer", password=_creds(cfg)["nats"]["importer"],
                                error_cb=on_error)
        js = nc.jetstream()
        with pytest.raises(Exception):
            kv = await js.key_value("ALMAPIPE_RUNS")
            await kv.put("forged", b"{}")
        await nc.publish("events.run.forged._run.failed", b"x")
        await nc.flush()
        await asyncio.sleep(0.3)
        await nc.close()
        assert any("ermissions" in e for e in errors), errors

    asyncio.run(go())


def _listening_ports(pids) -> set:
    """(ip, port) of every listening TCP socket the processes hold (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:   # LISTEN
                ip_hex, port_hex = f[1].split(":")
                if ip_hex[:24] == "0000000000000000FFFF0000":   # ::ffff:a.b.c.d
                    ip_hex = ip_hex[24:]
                if len(ip_hex) == 8:
                    ip = socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1])
                else:
                    ip = "::1" if ip_hex == "00000000000000000000000001000000" else "v6:" + ip_hex
                out.add((ip, int(port_hex, 16)))
    return out


def test_no_port_serves_an_object_without_credentials(stack):
    from almapipe.platform.store import ObjectStore
    st, cfg = stack
    store = ObjectStore(cfg)
    secret = b"almapipe-side-door-check " + os.urandom(8).hex().encode()
    key = "runs/sidedoor/secret.txt"
    store.put_bytes(key, secret)
    store.client.put_object(store.raw_bucket, key, __import__("io").BytesIO(secret), len(secret))
    pids = [p["pid"] for p in st.load()["procs"].values()]
    ports = _listening_ports(pids)
    assert ports, "found no listening sockets of the stack"
    # every port is on loopback and derived from the port base: two stacks do not collide
    assert {ip for ip, _ in ports} <= {"127.0.0.1", "::1"}, ports
    assert {p for _, p in ports} <= set(stack_ports().values()), \
        sorted({p for _, p in ports} - set(stack_ports().values()))
    paths = [f"/{b}/{key}" for b in (store.bucket, store.raw_bucket)] + \
        [f"/buckets/{b}/{key}" for b in (store.bucket, store.raw_bucket)] + [f"/{key}"]
    for _, p in sorted(ports):
        for path in paths:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p}{path}", timeout=3) as r:
                    body = r.read()
            except Exception:   # refused, 4xx, not HTTP at all: nothing served
                continue
            assert secret not in body, f"port {p} served {path} without credentials"


def test_data_dir_and_credentials_are_private(stack):
    _, cfg = stack
    assert stat.S_IMODE(os.stat(cfg.data_dir).st_mode) == 0o700
    for name in ("credentials.json", "gateway-tokens.json", "nats.conf"):
        assert stat.S_IMODE(os.stat(os.path.join(cfg.data_dir, name)).st_mode) == 0o600, name
    table = open(cfg.tokens_file).read()
    for t in _creds(cfg)["tokens"].values():
        assert t["token"] not in table


def _self_signed(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (cryptography if installed, else openssl)."""
    cert, key = str(tmp_path / "gw.crt"), str(tmp_path / "gw.key")
    try:
        import datetime
        import ipaddress
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        k = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now)
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(k, hashes.SHA256()))
        open(cert, "wb").write(c.public_bytes(serialization.Encoding.PEM))
        open(key, "wb").write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    except ImportError:
        if not shutil.which("openssl"):
            pytest.skip("neither the cryptography package nor openssl is available to make a test certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_gateway_serves_tls(stack, tmp_path):
    """A second gateway process on the same stack, with a certificate: a TLS client with
    the CA and a token is served; a plain-text client is not."""
    from dataclasses import replace
    from almapipe.platform.stack import gateway_healthy, port_free
    st, cfg = stack
    cert, key = _self_signed(tmp_path)
    p = next(p for p in range(stack_ports()["gateway"] + 1000, stack_ports()["gateway"] + 1100) if port_free(p))
    addr = f"127.0.0.1:{p}"
    env = dict(st.env(), ALMAPIPE_GATEWAY=addr, ALMAPIPE_TLS_CERT=cert, ALMAPIPE_TLS_KEY=key,
               ALMAPIPE_NATS_USER="gateway", ALMAPIPE_METRICS_PORT="0")
    log = open(tmp_path / "gw.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        tls = replace(cfg, gateway_addr=addr, tls_ca=cert)
        t_end = time.time() + 60
        while not gateway_healthy(tls) and time.time() < t_end:
            assert proc.poll() is None, open(tmp_path / "gw.log").read()
            time.sleep(0.3)
        with channel(tls) as ch:
            pb_grpc.PipelineServiceStub(ch).ListRuns(pb.ListRunsRequest(limit=1), timeout=10)
        with channel(replace(tls, tls_ca="")) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.PipelineServiceStub(ch).ListRuns(pb.ListRunsRequest(limit=1), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.terminate()
        proc.wait(20)
