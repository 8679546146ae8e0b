"""The Feast repo config the service opens: the applied repo's, with the configured store.

Kept free of feast imports so it is cheap to test. The registry (the applied definitions)
always comes from ``features.repo_path``; the online store is the repo's SQLite file unless
``LOOPMESH_FEATURES__ONLINE_STORE=redis``, which points it at ``features.redis_url``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loopmesh.features.settings import FeaturesScope
from loopmesh.mesh.feature_repo import redis_connection_string


def feast_config(scope: FeaturesScope) -> tuple[Path, dict[str, Any]]:
    """``(repo dir, RepoConfig keyword arguments)`` for ``scope``."""
    repo = scope.repo_path.resolve()
    config_file = repo / "feature_store.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no Feast repo at {repo} (features.repo_path): prepare and apply it first "
            "(`loopmesh infra up` does)"
        )
    data: dict[str, Any] = yaml.safe_load(config_file.read_text())
    if scope.online_store == "redis":
        assert scope.redis_url is not None  # the settings validator guarantees it
        url = scope.redis_url.get_secret_value()
        data["online_store"] = {"type": "redis", "connection_string": redis_connection_string(url)}
    elif (data.get("online_store") or {}).get("type") != "sqlite":
        data["online_store"] = {"type": "sqlite", "path": str(repo / "data" / "online.db")}
    return repo, data
