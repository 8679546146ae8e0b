"""Container health probe: ``python -m loopmesh.mesh.healthcheck HOST:PORT``.

Asks the gRPC health service of a LoopMesh server and exits 0 only when it answers SERVING,
so compose health checks need no ``grpc_health_probe`` binary in the image. Kubernetes uses
its built-in ``grpc`` probe against the same health service instead.

Exit codes: 0 SERVING, 1 any other status or no answer within the timeout, 2 bad usage
(including a half-configured TLS: ``--cert`` without ``--key``). The channel comes from the
channel factory (``loopmesh.mesh.channels``) with tracing off: the probe runs every few
seconds in every container, so it imports no OpenTelemetry and sends no token (health is open).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loopmesh.mesh.channels import sync_channel
from loopmesh.mesh.errors import LoopMeshError
from loopmesh.mesh.settings import GrpcClientSettings

SERVING = health_pb2.HealthCheckResponse.SERVING


def _channel(args: argparse.Namespace) -> grpc.Channel:
    settings = GrpcClientSettings(
        tls_cafile=args.ca,
        tls_certfile=args.cert,
        tls_keyfile=args.key,
        server_name_override=args.server_name,
    )
    return sync_channel(args.address, settings, tracing=False)


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """Whether the server at ``args.address`` reports ``args.service`` SERVING, and why not."""
    with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            name = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
            return False, f"{args.address}: {name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == SERVING, f"{args.address} {args.service or '(server)'}: {status}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loopmesh.mesh.healthcheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument(
        "--service", default="", help="health service name to ask for (default: whole server)"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    parser.add_argument("--ca", type=Path, help="CA bundle: use TLS and verify the server with it")
    parser.add_argument(
        "--cert", type=Path, help="client certificate for mutual TLS (system roots without --ca)"
    )
    parser.add_argument("--key", type=Path, help="key of the client certificate")
    parser.add_argument("--server-name", help="name expected in the server certificate")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("--timeout must be positive", file=sys.stderr)
        return 2
    try:
        healthy, detail = check(args)
    except (ValueError, OSError, LoopMeshError) as err:
        print(f"healthcheck: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
