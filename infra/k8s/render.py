"""A small, strict stand-in for ``kustomize build`` over this directory's kustomizations.

It implements exactly what they use: ``resources`` (files and directories), ``namespace``,
``images`` (newName/newTag) and inline JSON 6902 ``patches`` with a kind/name ``target``,
and fails on anything else, so it cannot silently render differently from kustomize.
tests/test_deploy_manifests.py validates its output; by hand:

    python infra/k8s/render.py infra/k8s/overlays/dev    # prints the YAML stream
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
OPS = {"add", "replace", "remove"}


def load_all(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json_patch(obj: Obj, ops: list[Obj]) -> None:
    """RFC 6902 add / replace / remove, in place; a path that does not apply raises."""
    for op in ops:
        kind = op["op"]
        if kind not in OPS:
            raise ValueError(f"unsupported patch op {kind!r}")
        *parents, last = _pointer(op["path"])
        node: Any = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" and kind == "add" else int(last)
            if kind == "add":
                node.insert(index, op["value"])
            elif kind == "replace":
                node[index] = op["value"]
            else:
                del node[index]
        elif kind == "add":
            node[last] = op["value"]
        elif last not in node:
            raise KeyError(f"{op['path']} does not exist for {kind}")
        elif kind == "replace":
            node[last] = op["value"]
        else:
            del node[last]


def pod_containers(obj: Obj) -> Iterator[Obj]:
    """Init and app containers of a workload's pod template (none for other kinds)."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _matches(obj: Obj, target: Obj) -> bool:
    if set(target) - {"kind", "name"}:
        raise ValueError(f"unsupported patch target fields in {target}")
    name = target.get("name", obj["metadata"]["name"])
    return bool(obj["kind"] == target["kind"] and obj["metadata"]["name"] == name)


def render(directory: Path) -> list[Obj]:
    """The objects ``kustomize build directory`` would print, in order."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if set(kust) - SUPPORTED:
        raise ValueError(f"{directory}: the renderer lacks {sorted(set(kust) - SUPPORTED)}")
    objects: list[Obj] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if not path.exists():
            raise FileNotFoundError(f"{directory}/kustomization.yaml: {entry} does not exist")
        objects += render(path) if path.is_dir() else load_all(path)
    for patch in kust.get("patches", []):
        if set(patch) != {"target", "patch"}:
            raise ValueError(f"{directory}: only inline JSON 6902 patches with a target")
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise ValueError(f"{directory}: a strategic-merge patch is not supported")
        hits = [obj for obj in objects if _matches(obj, patch["target"])]
        if not hits:
            raise ValueError(f"{directory}: patch target {patch['target']} matches nothing")
        for obj in hits:
            apply_json_patch(obj, ops)
    for image in kust.get("images", []):
        for obj in objects:
            for container in pod_containers(obj):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    if "namespace" in kust:
        for obj in objects:
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kust["namespace"]
    ids = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"{directory}: duplicate resources {sorted(map(str, duplicates))}")
    return objects


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(Path(argv[0])), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
