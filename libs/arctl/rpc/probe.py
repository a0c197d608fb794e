"""``python -m arctl.rpc.probe HOST:PORT [SERVICE]``: exit 0 when the gRPC health check answers
SERVING, 1 otherwise. For container health checks where no native gRPC probe exists (compose)."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from arctl.rpc.client import channel


def healthy(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with channel(address) as chan:
        try:
            answer = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m arctl.rpc.probe HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    return 0 if healthy(argv[0], argv[1] if len(argv) > 1 else "") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
