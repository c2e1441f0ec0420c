"""Prometheus metrics shared by the gateway and the workers."""
from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram, start_http_server

STAGE_DURATION = Histogram("almapipe_stage_duration_seconds", "Wall time of a stage execution",
                           ["service", "stage", "status"],
                           buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
VISIBILITIES = Counter("almapipe_visibilities_processed_total", "Visibility samples read by stages",
                       ["service", "stage"])
VIS_BYTES = Counter("almapipe_visibility_store_bytes_total",
                    "Bytes stages moved through the visibility store, by where (s3_read, cache_read, s3_written)",
                    ["service", "stage", "direction"])
STAGE_FAILURES = Counter("almapipe_stage_failures_total", "Stage attempts that raised", ["service", "stage", "final"])
STAGES_STARTED = Counter("almapipe_stages_started_total", "Stage requests taken", ["service", "stage"])
QUEUE_LAG = Gauge("almapipe_queue_pending", "Stage requests waiting in the work queue", ["service"])
INFRA_RETRIES = Counter("almapipe_infrastructure_retries_total",
                        "Stage runs repeated after an S3 or NATS outage (not counted as failures)", ["service"])
RUNS = Counter("almapipe_runs_total", "Runs by final status", ["status"])
RUNS_ACTIVE = Gauge("almapipe_runs_active", "Runs queued or running")


def serve(port: int) -> None:
    if port:
        # loopback unless told otherwise: in a container the kubelet's probes and
        # Prometheus come from outside it (ALMAPIPE_METRICS_ADDR=0.0.0.0)
        start_http_server(port, addr=os.environ.get("ALMAPIPE_METRICS_ADDR", "127.0.0.1"))
