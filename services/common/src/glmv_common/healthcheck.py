"""``python -m glmv_common.healthcheck HOST:PORT [SERVICE]``: exit 0 iff the gRPC service is SERVING.

Used by container health checks (no grpc_health_probe binary needed in the images).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m glmv_common.healthcheck HOST:PORT [SERVICE]")
    ok = check(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
