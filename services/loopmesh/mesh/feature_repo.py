"""Prepare and apply a project's Feast repository in a working directory.

A *project* is a directory the user owns: a Feast feature repository (what ``feast init``
makes), found through ``LOOPMESH_PROJECT`` (``loopmesh run --project DIR``); the top-level
``feature_store/`` is the default one. Its code is copied into a working directory next to
the applied registry and online store, so ``feast apply`` never writes into the project.

Feast is driven through its CLI in a subprocess only: ``import feast`` costs seconds and pulls
in torch, and only the features service may pay that (docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from loopmesh.mesh.errors import SetupError

# The default project: <repo root>/feature_store, this file being
# <repo root>/services/loopmesh/mesh/feature_repo.py.
FEATURE_REPO_DIR = Path(__file__).resolve().parents[3] / "feature_store"
# What is never copied from a project: Feast's own outputs and the user's local config.
_NOT_CODE = shutil.ignore_patterns(
    "data", "__pycache__", ".*", "feature_store.yaml", "*.db", "*.parquet"
)
_PROJECT_NAME = re.compile(r"^project:\s*['\"]?([A-Za-z0-9_]+)['\"]?\s*$", re.MULTILINE)

OnlineStore = Literal["sqlite", "redis"]

PROJECT = "loopmesh"
DEFAULT_REDIS_PORT = 6379


def redis_connection_string(redis_url: str) -> str:
    """Feast's ``host:port,db=N,...`` form of ``redis_url``.

    Accepts ``redis://[user:password@]host[:port][/db]`` (``rediss://`` for TLS) or a string
    already in Feast's form, which is passed through.
    """
    if "://" not in redis_url:
        return redis_url
    parts = urlsplit(redis_url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"not a redis:// or rediss:// URL: {redis_url!r}")
    items = [f"{parts.hostname}:{parts.port or DEFAULT_REDIS_PORT}"]
    db = parts.path.strip("/")
    if db:
        if not db.isdigit():
            raise ValueError(f"redis database must be a number, got {db!r} in {redis_url!r}")
        items.append(f"db={db}")
    if parts.scheme == "rediss":
        items.append("ssl=true")
    if parts.username:
        items.append(f"username={unquote(parts.username)}")
    if parts.password:
        items.append(f"password={unquote(parts.password)}")
    # Feast splits the connection string on commas, with no escaping.
    if any("," in item for item in items):
        raise ValueError("redis credentials must not contain ',' (Feast cannot parse them)")
    return ",".join(items)


def _yaml_str(value: str) -> str:
    # A JSON string is a valid double-quoted YAML scalar: safe for any path or password.
    return json.dumps(value)


def project_dir(project: Path | None) -> Path:
    """The project directory (the default project when None); SetupError if it is not one."""
    directory = (project or FEATURE_REPO_DIR).resolve()
    if not directory.is_dir():
        raise SetupError(f"project {directory} (LOOPMESH_PROJECT) is not a directory")
    if not any(directory.rglob("*.py")):
        raise SetupError(f"project {directory} holds no Feast definitions (*.py)")
    return directory


def project_name(project: Path) -> str:
    """The Feast project name of ``project`` (its ``feature_store.yaml``'s), else ``loopmesh``."""
    config = project / "feature_store.yaml"
    if config.is_file():
        match = _PROJECT_NAME.search(config.read_text())
        if match:
            return match.group(1)
    return PROJECT


def render_config(
    repo_dir: Path,
    *,
    online_store: OnlineStore = "sqlite",
    redis_url: str | None = None,
    project: str = PROJECT,
) -> str:
    """The ``feature_store.yaml`` text for a working repo at ``repo_dir`` (absolute paths)."""
    data_dir = repo_dir.resolve() / "data"
    if online_store == "sqlite":
        online = f"  type: sqlite\n  path: {_yaml_str(str(data_dir / 'online.db'))}\n"
    elif online_store == "redis":
        if not redis_url:
            raise ValueError("online_store='redis' needs redis_url")
        connection = _yaml_str(redis_connection_string(redis_url))
        online = f"  type: redis\n  connection_string: {connection}\n"
    else:
        raise ValueError(f"unknown online store {online_store!r} (sqlite or redis)")
    return (
        "# Written by loopmesh.mesh.feature_repo; edits are lost on the next prepare.\n"
        f"project: {project}\n"
        "provider: local\n"
        f"registry: {_yaml_str(str(data_dir / 'registry.db'))}\n"
        f"online_store:\n{online}"
        "offline_store:\n  type: file\n"
        "entity_key_serialization_version: 3\n"
        "auth:\n  type: no_auth\n"
    )


def prepare_repo(
    target_dir: Path,
    *,
    project: Path | None = None,
    online_store: OnlineStore = "sqlite",
    redis_url: str | None = None,
) -> Path:
    """Copy the project's code into ``target_dir`` and write its config; returns the dir.

    A working copy keeps ``feast apply`` (registry, online store, batch parquet paths) out of
    the project. Re-preparing the same directory keeps its data but refreshes the code.
    """
    source = project_dir(project)
    text = render_config(
        target_dir,
        online_store=online_store,
        redis_url=redis_url,
        project=project_name(source),
    )
    repo_dir = target_dir.resolve()
    if repo_dir == source or source in repo_dir.parents:
        raise SetupError(f"the working copy {repo_dir} must not lie inside the project {source}")
    (repo_dir / "data").mkdir(parents=True, exist_ok=True)
    # Feast applies every *.py in the repo: a file deleted from the project must go here too.
    for entry in repo_dir.iterdir():
        if entry.name == "data":
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    shutil.copytree(source, repo_dir, ignore=_NOT_CODE, dirs_exist_ok=True)
    (repo_dir / "feature_store.yaml").write_text(text)
    _ignore_project_code(repo_dir)
    return repo_dir


NOT_FEAST = ("models", "simulator.py")
"""Project code Feast must not import: the model specs with a team's torch modules, and the
simulator (``feast apply`` imports every other ``*.py``, in an image without torch)."""


def _ignore_project_code(repo_dir: Path) -> None:
    ignore = repo_dir / ".feastignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    missing = [entry for entry in NOT_FEAST if entry not in lines]
    if missing:
        ignore.write_text("\n".join([*lines, *missing]) + "\n")


def feast_command() -> list[str]:
    """How to run the Feast CLI of the interpreter running this code."""
    # Not resolved: a venv's python is a symlink and the script sits next to the link.
    script = Path(sys.executable).with_name("feast")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "feast.cli.cli"]


def apply_repo(repo_dir: Path, timeout: float = 180) -> None:
    """Run ``feast apply`` in ``repo_dir``; raises SetupError (a RuntimeError) on failure."""
    argv = [*feast_command(), "apply"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        result = subprocess.run(
            argv,
            cwd=repo_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output if isinstance(exc.output, str) else (exc.output or b"").decode()
        raise SetupError(
            f"`feast apply` in {repo_dir} did not finish within {timeout:.0f} s:\n{_tail(output)}"
        ) from exc
    except OSError as exc:
        raise SetupError(f"cannot run {argv[0]}: {exc}") from exc
    if result.returncode != 0:
        raise SetupError(
            f"`feast apply` in {repo_dir} failed with exit status {result.returncode}:\n"
            f"{_tail(result.stdout)}"
        )


def _tail(output: str, lines: int = 60) -> str:
    # Feast failures end in a long traceback; the last lines hold the cause.
    return "\n".join(output.splitlines()[-lines:]) or "(no output)"
