"""Configuration from environment variables, with safe local defaults.

Every process of a stack (gateway, workers, CLI) reads the same variables,
so one data directory and one port base describe a whole local stack:

  ALMAPIPE_DATA_DIR    where servers keep data, logs and credentials (~/.almapipe)
  ALMAPIPE_PORT_BASE   ports are base+offset (see PORTS); default 14200
  ALMAPIPE_NATS_URL, ALMAPIPE_S3_ENDPOINT, ALMAPIPE_GATEWAY   to point at other servers
  ALMAPIPE_S3_ACCESS_KEY, ALMAPIPE_S3_SECRET_KEY              credentials; else the
                       data directory's credentials.json, written by `almapipe up`
  ALMAPIPE_NATS_USER, ALMAPIPE_NATS_PASSWORD   this process's NATS user (default: admin)
                       and password (default: that user's in credentials.json)
  ALMAPIPE_TOKEN       the bearer token a client sends to the gateway (default: the
                       operator token in credentials.json)
  ALMAPIPE_TOKENS_FILE the gateway's token table (sha256 of each token, identity, role;
                       default <data_dir>/gateway-tokens.json)
  ALMAPIPE_TLS_CERT, ALMAPIPE_TLS_KEY   PEM files: the gateway serves TLS when both are set
  ALMAPIPE_TLS_CA      PEM file of the CA a client trusts (set: the client speaks TLS)
  ALMAPIPE_MAX_UPLOAD_MB        largest input the gateway's Upload accepts (default 100000)
  ALMAPIPE_RAW_RETENTION  what becomes of an uploaded input once the importer has
                       extracted it: "keep" (default) or "imported" (deleted: for an
                       observatory whose archive holds the EB; the disk then never holds
                       a large EB three times over. A failed import or a rerun needs the
                       input uploaded again)
  ALMAPIPE_MAX_UNPACKED_MB      most bytes an input may unpack to (gzip, tar; default 200000)
  ALMAPIPE_MAX_UNPACK_RATIO     most an input may grow when unpacked (default 200)
  ALMAPIPE_MAX_IMSIZE           largest image side in pixels a run may ask for (default 8192)
  ALMAPIPE_MAX_IMAGE_CHANNELS   most channels of a cube a run may ask for (default 8192)
  ALMAPIPE_METRICS_PORT   this process's Prometheus port (0: none)
  ALMAPIPE_MAX_DELIVER, ALMAPIPE_ACK_WAIT_S   work-queue redelivery bounds
  ALMAPIPE_IMAGER_WORKERS  imager workers the local stack starts (default 1); they share
                       the imager's work queue, so a cube's pieces run in parallel
                       (ALMAPIPE_IMPORTER_WORKERS, _CALIBRATOR_, _WEBLOG_: the same for the
                       other services, e.g. several runs' calibration stages at once)
  ALMAPIPE_THREADS     threads of the gridder (default: all cores; the local stack's
                       workers of a service with several: cores / workers)
  ALMAPIPE_STREAM_REPLICAS  replicas of the JetStream streams and the KV bucket when they
                       are created (default 1; 3 on a 3-node NATS cluster, deploy/k8s/)
  ALMAPIPE_METRICS_ADDR  address the metrics endpoint binds (default 127.0.0.1; 0.0.0.0 in
                       a container, so probes and Prometheus reach it)
  ALMAPIPE_TRIGGER_RULES  the state-change trigger's rules (JSON; default
                       <data_dir>/trigger-rules.json, absent: the built-in ALMA rule)
  ALMAPIPE_CACHE_DIR   the workers' cache (default <data_dir>/cache): visibility chunks in
                       chunks/, shared by the host's workers of every service; directories
                       (caltables, MS shells) in a folder per service
  ALMAPIPE_CACHE_MB    the cache's bound (default 8192; one value for every worker of a
                       host): three quarters for the host's visibility chunks, a quarter
                       for each service's directories; least recently used go first.
  ALMAPIPE_IMAGES_AT_ONCE  images makeimages makes at the same time, 2 (default: its cubes
                       one at a time beside its other images) or 1 (the least memory)
  ALMAPIPE_VIS_RETENTION_DAYS  `almapipe gc` drops the whole visibility store of a run
                       that ended this many days ago (default: never; products, caltables,
                       context and logs are kept)
  ALMAPIPE_TRIGGER_CLAIM_GRACE_S  age (s) after which a trigger claim left without a run
                       is taken over (default 30)
  ALMAPIPE_PROFILE_DIR, ALMAPIPE_PROFILE_STAGES  a worker writes each stage's cProfile
                       (<run>_<index>_<stage>.prof) to the folder, for the stages named
                       (comma separated; unset: every stage)
Credentials are never logged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

# Offsets from ALMAPIPE_PORT_BASE. SeaweedFS also uses each of its ports + 10000 for gRPC.
PORTS = {"nats": 22, "nats_monitor": 23, "s3": 33, "weed_master": 40, "weed_volume": 41, "weed_filer": 42,
         "gateway": 51, "metrics_gateway": 60, "metrics_importer": 61, "metrics_calibrator": 62,
         "metrics_imager": 63, "metrics_weblog": 64}


def import_roots(value: str) -> tuple:
    """ALMAPIPE_IMPORT_ROOTS (directories separated by ':') as absolute real paths; a
    relative one is refused here, at start-up, not at the first import."""
    roots = []
    for d in filter(None, value.split(os.pathsep)):
        if not os.path.isabs(d):
            raise ValueError(f"ALMAPIPE_IMPORT_ROOTS: {d!r} is not an absolute path")
        roots.append(os.path.realpath(d))
    return tuple(roots)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def port(name: str) -> int:
    return int(_env("ALMAPIPE_PORT_BASE", "14200")) + PORTS[name]


def stream_replicas() -> int:
    """Replicas of the streams and the KV bucket when they are created (a NATS cluster
    keeps each on that many servers; a single server can hold only 1)."""
    n = int(_env("ALMAPIPE_STREAM_REPLICAS", "1"))
    if not 1 <= n <= 5:
        raise ValueError(f"ALMAPIPE_STREAM_REPLICAS must be 1 to 5 (JetStream's limit), not {n}")
    return n


def default_data_dir() -> str:
    return _env("ALMAPIPE_DATA_DIR", os.path.expanduser("~/.almapipe"))


def credentials_doc(data_dir: str) -> dict:
    """The data directory's credentials.json (written by `almapipe up`), or {}."""
    path = os.path.join(data_dir, "credentials.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def credentials(data_dir: str) -> tuple[str, str]:
    if os.environ.get("ALMAPIPE_S3_SECRET_KEY"):
        return _env("ALMAPIPE_S3_ACCESS_KEY", "almapipe"), os.environ["ALMAPIPE_S3_SECRET_KEY"]
    c = credentials_doc(data_dir)
    if c.get("secret_key"):
        return c["access_key"], c["secret_key"]
    return _env("ALMAPIPE_S3_ACCESS_KEY", "almapipe"), ""


def nats_credentials(data_dir: str) -> tuple[str, str]:
    """(user, password) of this process on NATS. Each service of a stack has its own user
    (the launcher sets ALMAPIPE_NATS_USER); a CLI or a test connects as admin."""
    user = _env("ALMAPIPE_NATS_USER", "admin")
    if os.environ.get("ALMAPIPE_NATS_PASSWORD"):
        return user, os.environ["ALMAPIPE_NATS_PASSWORD"]
    return user, credentials_doc(data_dir).get("nats", {}).get(user, "")


def client_token(data_dir: str) -> str:
    if os.environ.get("ALMAPIPE_TOKEN"):
        return os.environ["ALMAPIPE_TOKEN"]
    return credentials_doc(data_dir).get("tokens", {}).get("operator", {}).get("token", "")


# the worker cache's bound (cache_bytes) is shared: chunks of the visibility store take
# this part, directories fetched whole (caltables, MS shells) the rest
CHUNK_CACHE_SHARE = 0.75
# the chunks' folder in ALMAPIPE_CACHE_DIR, one for every service of a host (decision 15):
# a chunk's key never changes content, so what one service fetched serves the others
CHUNK_FOLDER = "chunks"
# ALMAPIPE_CACHE_MB's default. Why 8 GiB: the chunk share (6 GiB) then holds a pass over
# the realistic EB's target (3.7 GB: uvcontsub's two passes, makeimages' images) and most
# of what applycal wrote for flagtargets; at 4 GiB (3 GiB of chunks) such a pass was not
# cached at all (VisStore.keeps) and every later one read S3 again. Measured end to end:
# 466 s at 4 GiB, 424 s at 8 GiB (bench/README). The chunks are one folder for the
# services of a host, which only the calibrator and the imager fill (the importer writes
# past it): a stack's caches hold at most about 6 GiB of chunks, and the tar archives of
# caltables and MS shells (tens of MB) beside them.
DEFAULT_CACHE_MB = 8192


@dataclass(frozen=True)
class Config:
    nats_url: str
    s3_endpoint: str           # host:port
    s3_access_key: str
    s3_secret_key: str
    s3_secure: bool
    bucket: str                # context, MSs, caltables, images, products
    raw_bucket: str            # uploaded inputs
    gateway_addr: str          # host:port of the gRPC API
    metrics_port: int          # 0 = do not serve metrics
    data_dir: str
    max_deliver: int           # deliveries of a stage request before it fails
    ack_wait_s: float
    cache_dir: str
    cache_bytes: int = DEFAULT_CACHE_MB << 20   # the worker cache's bound (chunks + directories)
    io_overlap: bool = True    # visibility reads ahead of and writes behind a stage's computing
    vis_retention_days: float | None = None   # gc: drop a finished run's visibility store after
    nats_user: str = ""
    nats_password: str = ""
    token: str = ""            # a client's bearer token for the gateway
    tokens_file: str = ""      # the gateway's token table
    tls_cert: str = ""         # gateway: serve TLS with this certificate and key
    tls_key: str = ""
    tls_ca: str = ""           # client: trust this CA and speak TLS
    # server-side caps a request cannot lift (decision 0009)
    # (the unpacking and imaging caps are read where they apply: almapipe/limits.py)
    max_upload_bytes: int = 100000 << 20
    raw_retention: str = "keep"
    # directories whose EBs the importer reads where they lie (file:// inputs, decision
    # 0022); empty: every input goes through the raw bucket
    import_roots: tuple = ()

    @staticmethod
    def from_env() -> "Config":
        data_dir = default_data_dir()
        access, secret = credentials(data_dir)
        nats_user, nats_password = nats_credentials(data_dir)
        return Config(
            nats_url=_env("ALMAPIPE_NATS_URL", f"nats://127.0.0.1:{port('nats')}"),
            s3_endpoint=_env("ALMAPIPE_S3_ENDPOINT", f"127.0.0.1:{port('s3')}"),
            s3_access_key=access, s3_secret_key=secret,
            s3_secure=_env("ALMAPIPE_S3_SECURE", "0") == "1",
            bucket=_env("ALMAPIPE_BUCKET", "almapipe-runs"),
            raw_bucket=_env("ALMAPIPE_RAW_BUCKET", "almapipe-raw"),
            gateway_addr=_env("ALMAPIPE_GATEWAY", f"127.0.0.1:{port('gateway')}"),
            metrics_port=int(_env("ALMAPIPE_METRICS_PORT", "0")),
            data_dir=data_dir,
            max_deliver=int(_env("ALMAPIPE_MAX_DELIVER", "3")),
            ack_wait_s=float(_env("ALMAPIPE_ACK_WAIT_S", "60")),
            cache_dir=_env("ALMAPIPE_CACHE_DIR", os.path.join(data_dir, "cache")),
            cache_bytes=int(float(_env("ALMAPIPE_CACHE_MB", str(DEFAULT_CACHE_MB))) * (1 << 20)),
            io_overlap=_env("ALMAPIPE_IO_OVERLAP", "1") != "0",
            vis_retention_days=float(os.environ["ALMAPIPE_VIS_RETENTION_DAYS"])
            if os.environ.get("ALMAPIPE_VIS_RETENTION_DAYS") else None,
            nats_user=nats_user, nats_password=nats_password,
            token=client_token(data_dir),
            tokens_file=_env("ALMAPIPE_TOKENS_FILE", os.path.join(data_dir, "gateway-tokens.json")),
            tls_cert=_env("ALMAPIPE_TLS_CERT", ""), tls_key=_env("ALMAPIPE_TLS_KEY", ""),
            tls_ca=_env("ALMAPIPE_TLS_CA", ""),
            max_upload_bytes=int(float(_env("ALMAPIPE_MAX_UPLOAD_MB", "100000")) * (1 << 20)),
            raw_retention=_env("ALMAPIPE_RAW_RETENTION", "keep"),
            import_roots=import_roots(_env("ALMAPIPE_IMPORT_ROOTS", "")),
        )
