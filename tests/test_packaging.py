"""What each deployable installs and imports: the doors (ingestion, feedback) carry no torch,
feast, faust or tritonclient, so their images stay small and start fast.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "feast", "faust-streaming", "tritonclient", "pyarrow", "nvidia-pytriton"}


def _dry_run(extra: str, tmp_path: Path, *flags: str) -> list[dict[str, Any]]:
    """What ``pip install '.[extra]'`` would install, from pip's installation report."""
    report = tmp_path / f"{extra}.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    subprocess.run(
        [*pip, *flags, "--report", str(report), f".[{extra}]"], cwd=ROOT, check=True, timeout=300
    )
    items: list[dict[str, Any]] = json.loads(report.read_text())["install"]
    return items


@pytest.mark.integration  # resolves against the package index
@pytest.mark.parametrize("extra", ["ingestion", "feedback"])
def test_a_door_installs_without_torch_or_feast(extra: str, tmp_path: Path) -> None:
    names = {item["metadata"]["name"].lower() for item in _dry_run(extra, tmp_path)}
    assert "loopmesh" in names and "grpcio" in names and "aiokafka" in names
    assert not names & HEAVY, f"{extra} would install {sorted(names & HEAVY)}"
    # The extras that need them do declare them (so the check above can fail).
    assert "torch" in _declared("trainer", tmp_path) and "feast" in _declared("features", tmp_path)


def _declared(extra: str, tmp_path: Path) -> set[str]:
    (project,) = _dry_run(extra, tmp_path, "--no-deps")
    marker = f'extra == "{extra}"'
    wanted = [r for r in project["metadata"].get("requires_dist", []) if marker in r]
    return {re.split(r"[\s\[=<>~;]", r, maxsplit=1)[0].lower() for r in wanted}


def test_the_doors_and_the_cli_import_without_heavy_packages() -> None:
    # A fresh interpreter where importing any heavy package fails, as in the doors' images.
    probe = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "feast", "faust", "tritonclient", "pyarrow"}:
                    raise ImportError(f"{name} must not be imported here")
        sys.meta_path.insert(0, Refuse())
        import loopmesh.cli
        for door in ("loopmesh.ingestion", "loopmesh.feedback"):
            package = importlib.import_module(door)
            for info in pkgutil.iter_modules(package.__path__, door + "."):
                importlib.import_module(info.name)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
