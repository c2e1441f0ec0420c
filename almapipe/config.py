"""Configuration from environment variables, with safe local defaults.

Every process of a stack (gateway, workers, CLI) reads the same variables,
so one data directory and one port base describe a whole local stack:

  ALMAPIPE_DATA_DIR    where servers keep data, logs and credentials (~/.almapipe)
  ALMAPIPE_PORT_BASE   ports are base+offset (see PORTS); default 14200
  ALMAPIPE_NATS_URL, ALMAPIPE_S3_ENDPOINT, ALMAPIPE_GATEWAY   to point at other servers
  ALMAPIPE_S3_ACCESS_KEY, ALMAPIPE_S3_SECRET_KEY              credentials; else the
                       data directory's credentials.json, written by `almapipe up`
  ALMAPIPE_METRICS_PORT   this process's Prometheus port (0: none)
  ALMAPIPE_MAX_DELIVER, ALMAPIPE_ACK_WAIT_S   work-queue redelivery bounds
  ALMAPIPE_IMAGER_WORKERS  imager workers the local stack starts (default 1); they share
                       the imager's work queue, so a cube's pieces run in parallel
  ALMAPIPE_THREADS     threads of the gridder (default: all cores)
  ALMAPIPE_STREAM_REPLICAS  replicas of the JetStream streams and the KV bucket when they
                       are created (default 1; 3 on a 3-node NATS cluster, deploy/k8s/)
  ALMAPIPE_METRICS_ADDR  address the metrics endpoint binds (default 127.0.0.1; 0.0.0.0 in
                       a container, so probes and Prometheus reach it)
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


def credentials(data_dir: str) -> tuple[str, str]:
    if os.environ.get("ALMAPIPE_S3_SECRET_KEY"):
        return _env("ALMAPIPE_S3_ACCESS_KEY", "almapipe"), os.environ["ALMAPIPE_S3_SECRET_KEY"]
    path = os.path.join(data_dir, "credentials.json")
    if os.path.exists(path):
        with open(path) as f:
            c = json.load(f)
        return c["access_key"], c["secret_key"]
    return _env("ALMAPIPE_S3_ACCESS_KEY", "almapipe"), ""


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

    @staticmethod
    def from_env() -> "Config":
        data_dir = default_data_dir()
        access, secret = credentials(data_dir)
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
        )
