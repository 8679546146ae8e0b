"""``loopmesh rollout status|promote|rollback|pause|resume``: a client of RolloutService.

``add_rollout_commands(subparsers)`` plugs the command into the ``loopmesh`` parser. The
address defaults to the controller's settings (``LOOPMESH_ROLLOUT__SERVER__HOST``/``PORT``);
``--json`` prints the response as JSON for scripts. The channel comes from the channel factory
(``loopmesh.mesh.channels``): TLS from ``LOOPMESH_ROLLOUT__CLIENT__*`` or the flags, and the
token of ``LOOPMESH_AUTH__CLIENT_TOKEN`` (an ``operator`` one) when the controller has auth on.
Exit status: 0 done, 1 refused or failed, 2 bad TLS settings.
"""

from __future__ import annotations

import argparse
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from loopmesh.rollout.settings import RolloutSettings

console = Console()


def add_rollout_commands(subparsers: Any) -> None:
    """Add ``rollout`` with its actions to an ``argparse`` sub-parser collection."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="RolloutService host:port (default: from settings)")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    common.add_argument("--tls", action="store_true", help="TLS with the system's root CAs")
    common.add_argument("--ca-file", type=Path, help="CA bundle of the server (turns TLS on)")
    common.add_argument("--cert-file", type=Path, help="client certificate for mutual TLS")
    common.add_argument("--key-file", type=Path, help="key of the client certificate")
    common.add_argument("--server-name", help="name expected in the server's certificate")
    common.add_argument("--json", action="store_true", help="print the response as JSON")
    reasoned = argparse.ArgumentParser(add_help=False, parents=[common])
    reasoned.add_argument("model")
    reasoned.add_argument("--reason", default="", help="recorded with the change")
    parser = subparsers.add_parser("rollout", help="canary rollouts: status and manual control")
    actions = parser.add_subparsers(dest="rollout_action", required=True)
    status = actions.add_parser("status", parents=[common], help="current rollouts and history")
    status.add_argument("model", nargs="?", help="one model (default: all)")
    status.add_argument("--history", type=int, default=10, help="changes to show per model")
    promote = actions.add_parser("promote", parents=[reasoned], help="canary one step up")
    promote.add_argument("--to-stable", action="store_true", help="skip the remaining steps")
    actions.add_parser("rollback", parents=[reasoned], help="take all traffic off the canary")
    actions.add_parser("pause", parents=[reasoned], help="freeze the rollout at its weight")
    actions.add_parser("resume", parents=[reasoned], help="continue a paused rollout")
    parser.set_defaults(func=run_rollout_command)


def _default_address(settings: RolloutSettings) -> str:
    server = settings.rollout.server
    host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    return f"{host}:{server.port}"


def _channel(args: argparse.Namespace) -> Any:
    """A sync channel to the controller from the settings, the flags overriding them."""
    from loopmesh.mesh.channels import sync_channel
    from loopmesh.rollout.settings import RolloutSettings

    settings = RolloutSettings()
    flags = {
        "tls": args.tls or None,
        "tls_cafile": args.ca_file,
        "tls_certfile": args.cert_file,
        "tls_keyfile": args.key_file,
        "server_name_override": args.server_name,
    }
    client = settings.rollout.client.model_copy(
        update={k: v for k, v in flags.items() if v is not None}
    )
    address = args.address or _default_address(settings)
    return sync_channel(address, client, auth=settings.auth)


def run_rollout_command(args: argparse.Namespace) -> int:
    # Imported here so `loopmesh --help` does not load gRPC and the generated code.
    import grpc
    from google.protobuf import json_format

    from loopmesh.gen.loopmesh.v1 import rollout_pb2, rollout_pb2_grpc
    from loopmesh.mesh.errors import LoopMeshError

    try:
        channel = _channel(args)
    except LoopMeshError as err:
        console.print(f"[red]rollout: {err}")
        return 2
    action: str = args.rollout_action
    try:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        t = args.timeout
        reply: Any
        if action == "status":
            reply = stub.ListRollouts(
                rollout_pb2.ListRolloutsRequest(model_name=args.model or "", limit=args.history),
                timeout=t,
            )
        elif action == "promote":
            reply = stub.Promote(
                rollout_pb2.PromoteRequest(
                    model_name=args.model, to_stable=args.to_stable, reason=args.reason
                ),
                timeout=t,
            )
        elif action == "rollback":
            reply = stub.Rollback(
                rollout_pb2.RollbackRequest(model_name=args.model, reason=args.reason), timeout=t
            )
        elif action == "pause":
            reply = stub.Pause(
                rollout_pb2.PauseRequest(model_name=args.model, reason=args.reason), timeout=t
            )
        else:
            reply = stub.Resume(
                rollout_pb2.ResumeRequest(model_name=args.model, reason=args.reason), timeout=t
            )
    except grpc.RpcError as err:
        console.print(f"[red]{action} failed: {err.code().name}: {err.details()}")
        return 1
    finally:
        channel.close()
    if args.json:
        console.print_json(json_format.MessageToJson(reply, preserving_proto_field_name=True))
    elif action == "status":
        _print_status(reply)
    else:
        _print_rollouts([reply])
    return 0


def _version(message: Any, field: str) -> str:
    return f"v{getattr(message, field)}" if message.HasField(field) else "-"


def _shadows(message: Any) -> str:
    return ", ".join(f"v{v}" for v in message.shadow_versions) or "-"


def _print_rollouts(rollouts: list[Any]) -> None:
    table = Table(title="rollouts")
    columns = ("model", "state", "stable", "canary", "shadow", "weight", "step", "requests")
    for column in (*columns, "reason"):
        table.add_column(column)
    for r in rollouts:
        table.add_row(
            r.model_name,
            r.state,
            _version(r, "stable_version"),
            _version(r, "canary_version"),
            _shadows(r),
            f"{r.canary_weight:.0%}",
            f"{r.step}/{r.steps}",
            str(r.canary_requests_estimate) if r.HasField("canary_version") else "-",
            r.reason,
        )
    console.print(table)
    for r in rollouts:
        if r.HasField("analysis") and r.state in ("shadow", "canary", "paused"):
            analysis = f"{r.analysis.action}: {r.analysis.reason}"
            console.print(f"[bold]{r.model_name}[/] analysis: {analysis}")


def _print_status(reply: Any) -> None:
    _print_rollouts(list(reply.rollouts))
    table = Table(title="history (newest first)")
    for column in ("time", "model", "state", "stable", "canary", "shadow", "weight", "reason"):
        table.add_column(column)
    for change in reply.history:
        at = change.event_time.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            at,
            change.model_name,
            change.state,
            _version(change, "stable_version"),
            _version(change, "canary_version"),
            _shadows(change),
            f"{change.canary_weight:.0%}",
            change.reason,
        )
    console.print(table)
