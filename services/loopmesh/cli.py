"""The ``loopmesh`` command: local infrastructure, single services, and the whole loop."""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from loopmesh.rollout.cli import add_rollout_commands

console = Console()

# Services in the order `loopmesh run` starts them; `serve` accepts these names only.
SERVICES: tuple[str, ...] = (
    "ingestion",
    "feedback",
    "features",
    "inference",
    "joiner",
    "trainer",
    "rollout",
)


def available_services() -> list[str]:
    """The services whose packages exist in this checkout (later issues add more)."""
    return [s for s in SERVICES if importlib.util.find_spec(f"loopmesh.{s}.__main__") is not None]


def _use_project(args: argparse.Namespace) -> None:
    """``--project DIR``: the project of this process and of every process it starts."""
    if getattr(args, "project", None):
        from pathlib import Path

        os.environ["LOOPMESH_PROJECT"] = str(Path(args.project).resolve())


def _infra(args: argparse.Namespace) -> int:
    from loopmesh.devstack.stack import LocalStack, process_alive
    from loopmesh.mesh.settings import MeshSettings

    _use_project(args)
    stack = LocalStack(MeshSettings())
    if args.action == "fetch":
        from loopmesh.devstack.kafka import resolve_libs

        console.print(f"Kafka jars in {resolve_libs()}")
        return 0
    if args.action == "up":
        with console.status("starting Kafka, tritonserver and Feast"):
            started = stack.up()
        _print_state(started.env(), title="local stack is up")
        console.print(f"logs and data: {stack.state_dir}; stop with `loopmesh infra down`")
        return 0
    if args.action == "down":
        stopped = stack.down()
        console.print("stopped" if stopped else "no local stack recorded")
        return 0
    state = stack.read_state()
    if state is None:
        console.print("no local stack recorded")
        return 1
    table = Table(title="local stack")
    table.add_column("component")
    table.add_column("pid")
    table.add_column("address")
    table.add_column("running")
    for name, pid, address in (
        ("kafka", state.kafka_pid, state.kafka_bootstrap),
        ("tritonserver", state.triton_pid, state.triton_grpc),
    ):
        table.add_row(name, str(pid), address, "yes" if process_alive(pid) else "[red]no")
    table.add_row("feast", "-", state.feast_repo, "-")
    console.print(table)
    alive = process_alive(state.kafka_pid) and process_alive(state.triton_pid)
    return 0 if alive else 1


def _print_state(env: dict[str, str], *, title: str) -> None:
    table = Table(title=title)
    table.add_column("variable")
    table.add_column("value")
    for key, value in env.items():
        table.add_row(key, value)
    console.print(table)


def _serve(args: argparse.Namespace) -> int:
    if args.name not in available_services():
        console.print(f"[red]unknown service {args.name!r}; known: {', '.join(SERVICES)}")
        return 2
    runpy.run_module(f"loopmesh.{args.name}", run_name="__main__", alter_sys=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    """The whole loop in the foreground until Ctrl-C (or ``--duration``).

    The runner owns SIGINT/SIGTERM while it runs: the first stops the loop and everything it
    started, a second hurries that; either way the summary is written and the exit code is 0.
    """
    import asyncio
    from pathlib import Path

    from loopmesh.devstack.runner import RunOptions, run_loop

    _use_project(args)
    options = RunOptions(
        model_name=args.model,
        simulator=not args.no_simulator,
        duration_seconds=args.duration,
        headless=args.headless,
        out_dir=Path(args.out),
    )
    try:
        summary = asyncio.run(run_loop(options, console))
    except KeyboardInterrupt:
        # Only before the runner installed its handlers (nothing was started) or after it
        # removed them (everything was stopped).
        console.print("stopped")
        return 0
    except Exception as exc:
        console.print(f"[red]loopmesh run failed: {type(exc).__name__}: {exc}")
        return 1
    if summary.get("stopped_by") == "signal":
        console.print("stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    infra = sub.add_parser("infra", help="local Kafka, tritonserver and Feast")
    infra.add_argument("action", choices=["fetch", "up", "down", "status"])
    infra.add_argument("--project", help="the project (a Feast repository) to apply")
    infra.set_defaults(func=_infra)
    serve = sub.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("name", choices=SERVICES)
    serve.set_defaults(func=_serve)
    run = sub.add_parser("run", help="the whole loop: local stack, services, simulator, live view")
    run.add_argument("--no-simulator", action="store_true", help="run the mesh only, for real apps")
    run.add_argument(
        "--project", help="the project (a Feast repository) to run; default: feature_store/"
    )
    run.add_argument(
        "--model",
        default=None,
        help="the model to watch; default: the simulator's, else the project's only one",
    )
    run.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    run.add_argument("--headless", action="store_true", help="progress lines, no live view")
    run.add_argument("--out", default=".loopmesh/runs", help="where runs keep data and reports")
    run.set_defaults(func=_run)
    add_rollout_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
