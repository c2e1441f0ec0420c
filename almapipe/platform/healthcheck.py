"""Health checks a container engine runs inside a container (deploy/compose.yaml):

  python -m almapipe.platform.healthcheck grpc 127.0.0.1:50051        the gateway
  python -m almapipe.platform.healthcheck http http://127.0.0.1:9100/metrics   a worker

Exit status 0: healthy; 1: not, with the reason on stderr. Kubernetes needs none of this
(it has gRPC and HTTP probes of its own, deploy/k8s/). gRPC health checking is open
without a token (decision 0009), so the check needs no credentials.
"""
from __future__ import annotations

import sys
import urllib.request


def grpc_serving(addr: str, timeout: float = 3.0) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        with grpc.insecure_channel(addr) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"gRPC health check of {addr}: {exc.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{addr}: {status}"


def http_ok(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200, f"{url}: HTTP {r.status}"
    except OSError as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    checks = {"grpc": grpc_serving, "http": http_ok}
    if len(argv) != 2 or argv[0] not in checks:
        print("usage: python -m almapipe.platform.healthcheck grpc HOST:PORT | http URL", file=sys.stderr)
        return 2
    ok, why = checks[argv[0]](argv[1])
    if not ok:
        print(why, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
