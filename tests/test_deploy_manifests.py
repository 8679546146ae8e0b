"""Deployment manifests, checked without Docker or a cluster.

compose.yaml against the Compose spec schema (vendored by check-jsonschema); Kubernetes core
kinds with kubernetes-validate; Strimzi and KEDA kinds against the schemas pinned in
infra/k8s/schemas. Kustomizations are rendered by a small JSON-6902-only renderer that fails
on anything it does not implement. Then agreement with the code: every service of
loopmesh.cli.SERVICES is deployed, its ports and LOOPMESH_* variables match its settings
class (the environment is fed to the class, so values must validate too), topics match
loopmesh.mesh.topics, autoscalers watch real consumer groups. Last, the gRPC health probe
of the containers against a real server.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import importlib.util
import json
import os
import re
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health_pb2
from pydantic import BaseModel

from loopmesh.cli import SERVICES
from loopmesh.devstack.kafka import KAFKA_VERSION
from loopmesh.mesh import healthcheck
from loopmesh.mesh.bus import DLQ_TOPIC_CONFIG
from loopmesh.mesh.rpc import GrpcServer
from loopmesh.mesh.settings import GrpcServerSettings, KafkaSettings, MeshSettings
from loopmesh.mesh.topics import ALL_TOPICS, Topic

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ["base", "overlays/dev", "overlays/gpu"]
K8S_VERSION = "1.33"
CRD_GROUPS = {"kafka.strimzi.io", "keda.sh"}
Obj = dict[str, Any]


# ---------------------------------------------------------------- compose


def interpolate(value: str) -> str:
    """Compose interpolation with every variable unset: ``${X:-d}`` -> d, ``$$`` -> ``$``."""
    if re.search(r"\$\{[^}:]+\}", value):
        raise AssertionError(f"{value!r} needs a variable without a default")
    value = re.sub(r"\$\{[A-Za-z0-9_]+:?-([^}]*)\}", r"\1", value)
    return value.replace("$$", "$")


def merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in {**base, **over}.items()}
    return over


@pytest.fixture(scope="module")
def compose() -> Obj:
    data: Obj = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def compose_spec_validator() -> jsonschema.protocols.Validator:
    spec = importlib.util.find_spec("check_jsonschema")
    assert spec is not None and spec.submodule_search_locations, "pip install check-jsonschema"
    vendor = Path(spec.submodule_search_locations[0]) / "builtin_schemas/vendor"
    schema = json.loads((vendor / "compose-spec.json").read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    return jsonschema.Draft7Validator(schema)


def test_compose_files_match_the_compose_spec(compose: Obj) -> None:
    validator = compose_spec_validator()
    gpu = yaml.safe_load((ROOT / "compose.gpu.yaml").read_text())
    local = yaml.safe_load((ROOT / "compose.local.yaml").read_text())
    for name, doc in (
        ("compose.yaml", compose),
        ("+ compose.gpu.yaml", merge(compose, gpu)),
        ("+ compose.local.yaml", merge(compose, local)),
    ):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{name}: {errors}"
    broken = copy.deepcopy(compose)
    broken["services"]["kafka"]["healthcheck"]["intervall"] = "5s"
    assert not validator.is_valid(broken), "the schema must reject unknown keys"
    assert set(gpu["services"]) <= set(compose["services"])
    assert set(local["services"]) <= set(compose["services"])


def test_compose_local_builds_what_cannot_be_pulled(compose: Obj) -> None:
    # The public images that compose.yaml pulls, outside the observability profile, are
    # each swapped for a target of infra/local/Containerfile (make compose-test).
    local = yaml.safe_load((ROOT / "compose.local.yaml").read_text())
    containerfile = (ROOT / "infra/local/Containerfile").read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", containerfile, re.M))
    pulled = {
        name
        for name, svc in compose["services"].items()
        if "build" not in svc and "observability" not in svc.get("profiles", [])
    }
    stand_ins = {n for n, s in local["services"].items() if "context" in s.get("build", {})}
    assert pulled == stand_ins - {"triton"} and "triton" in stand_ins
    for name in stand_ins:
        svc = local["services"][name]
        assert svc["build"]["target"] in targets, name
        assert svc["build"]["context"] == "infra/local"
    for name in set(local["services"]) - stand_ins:
        # LoopMesh's own images keep compose.yaml's build; only an argument changes (the
        # trainer's CPU-only torch index).
        assert "build" in compose["services"][name], name
        assert local["services"][name] == {
            "build": {"args": local["services"][name]["build"]["args"]}
        }
        assert set(local["services"][name]["build"]["args"]) <= set(
            compose["services"][name]["build"]["args"]
        ), name
    core = {n for n, s in compose["services"].items() if not s.get("profiles")}
    for name in core:  # the core stack must not wait on a service of a profile
        assert set(compose["services"][name].get("depends_on", {})) <= core, name


def test_compose_images_are_pinned_and_kafka_matches_the_local_stack(compose: Obj) -> None:
    for name, svc in compose["services"].items():
        image = interpolate(svc["image"])
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


# ---------------------------------------------------------------- kubernetes


def _load_renderer() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


renderer = _load_renderer()


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: renderer.render(K8S / name) for name in OVERLAYS}


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def crd_validator(obj: Obj) -> jsonschema.protocols.Validator:
    group, version = obj["apiVersion"].split("/")
    path = K8S / "schemas" / f"{group}_{version}_{obj['kind']}.json"
    assert path.is_file(), f"no pinned schema for {obj['apiVersion']} {obj['kind']}"
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_manifests_validate(rendered: dict[str, list[Obj]], overlay: str) -> None:
    kinds = set()
    for obj in rendered[overlay]:
        kinds.add(obj["kind"])
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            errors = [
                f"{list(e.absolute_path)}: {e.message}" for e in crd_validator(obj).iter_errors(obj)
            ]
            assert not errors, f"{where}: {errors}"
        else:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                raise AssertionError(f"{where}: {list(err.path)}: {err.message}") from None
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "ScaledObject", "Deployment"} <= kinds


def test_pinned_crd_schemas_reject_what_the_operators_would(rendered: dict[str, list[Obj]]) -> None:
    topic = copy.deepcopy(find(rendered["base"], "KafkaTopic")[0])
    topic["spec"]["partitons"] = 3
    assert not crd_validator(topic).is_valid(topic)
    scaled = copy.deepcopy(find(rendered["base"], "ScaledObject", "features")[0])
    del scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"]
    assert not crd_validator(scaled).is_valid(scaled)
    kafka = copy.deepcopy(find(rendered["base"], "Kafka")[0])
    kafka["spec"]["kafka"]["replicas"] = 3  # v1: node pools own replicas
    assert not crd_validator(kafka).is_valid(kafka)


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    cases = {
        "patches: [{target: {kind: ConfigMap}, patch: 'data: {a: b}'}]": "strategic-merge",
        "patches: [{target: {kind: ConfigMap}, patch: '[{op: remove, path: /data}]'}]": "exist",
        "patches: [{target: {kind: Secret}, patch: '[]'}]": "matches nothing",
        "configMapGenerator: []": "lacks",
    }
    for extra, why in cases.items():
        (tmp_path / "kustomization.yaml").write_text(f"resources: [cm.yaml]\n{extra}\n")
        with pytest.raises((ValueError, KeyError), match=why):
            renderer.render(tmp_path)


# ---------------------------------------------------------------- agreement with the code


def settings_class(service: str) -> type[MeshSettings] | None:
    if importlib.util.find_spec(f"loopmesh.{service}.settings") is None:
        return None  # not written yet: presence in compose/k8s is still checked
    module = importlib.import_module(f"loopmesh.{service}.settings")
    found = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, MeshSettings) and v.__module__ == module.__name__
    ]
    assert len(found) == 1, f"loopmesh.{service}.settings: expected one MeshSettings subclass"
    return found[0]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        return next((m for a in get_args(annotation) if (m := _model_in(a))), None)
    return None


def has_field(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether ``LOOPMESH_A__B`` (parts [a, b]) names a field, case-insensitively."""
    fields = {name.lower(): f for name, f in model.model_fields.items()}
    field = fields.get(parts[0].lower())
    if field is None or len(parts) == 1:
        return field is not None
    sub = _model_in(field.annotation)
    if sub is not None:
        return has_field(sub, parts[1:])
    return get_origin(field.annotation) is dict  # nested keys of a mapping field


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]) -> None:
    """Exactly ``env`` as the LOOPMESH_* environment (None: a Secret, left unset)."""
    for name in list(os.environ):
        if name.startswith("LOOPMESH_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, value)


Deployed = tuple[str, str, dict[str, str | None], list[int], list[int]]


def deployments(compose: Obj, rendered: dict[str, list[Obj]], service: str) -> Iterator[Deployed]:
    """(origin, where, LOOPMESH env, gRPC ports served, ports probed) per deployment."""
    gpu = yaml.safe_load((ROOT / "compose.gpu.yaml").read_text())
    for origin, doc in (("compose", compose), ("compose.gpu", merge(compose, gpu))):
        assert service in doc["services"], f"{origin}: loopmesh.cli.SERVICES has {service}"
        svc = doc["services"][service]
        assert svc["command"] == ["loopmesh", "serve", service], f"{origin} {service}: command"
        env = {k: interpolate(str(v)) for k, v in svc["environment"].items()}
        ports = [int(p.rsplit(":", 1)[1]) for p in svc["ports"]]
        probed = [int(svc["healthcheck"]["test"][-1].rsplit(":", 1)[1])]
        assert svc["healthcheck"]["test"][:4] == [
            "CMD",
            "python",
            "-m",
            "loopmesh.mesh.healthcheck",
        ]
        yield origin, f"{origin} {service}", dict(env), ports, probed
    for overlay, objects in rendered.items():
        config = {c["metadata"]["name"]: c["data"] for c in find(objects, "ConfigMap")}
        for dep in find(objects, "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                if c.get("command") != ["loopmesh", "serve", service]:
                    continue
                k8s_env: dict[str, str | None] = {}
                for ref in c.get("envFrom", []):
                    k8s_env.update(config[ref["configMapRef"]["name"]])
                k8s_env.update({e["name"]: e.get("value") for e in c.get("env", [])})
                kinds = ("startupProbe", "readinessProbe", "livenessProbe")
                probes = [c[p]["grpc"]["port"] for p in kinds if p in c]
                k8s_ports = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
                for s in find(objects, "Service", dep["metadata"]["name"]):
                    k8s_ports += [p["port"] for p in s["spec"]["ports"] if p["name"] == "grpc"]
                yield overlay, f"{overlay} {dep['metadata']['name']}", k8s_env, k8s_ports, probes


@pytest.mark.parametrize("service", SERVICES)
def test_service_ports_and_env_match_its_settings(
    compose: Obj, rendered: dict[str, list[Obj]], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = settings_class(service)
    serving = set()
    for origin, where, env, ports, probed in deployments(compose, rendered, service):
        assert all(k.startswith("LOOPMESH_") for k in env), f"{where}: foreign variables"
        if ports or probed:
            serving.add(origin)
        if cls is None:
            continue
        for name in env:
            parts = name.removeprefix("LOOPMESH_").split("__")
            assert has_field(cls, parts), f"{where}: {name} is no setting"
        use_env(monkeypatch, env)
        settings = cls()  # the values must validate, not just the names
        server: GrpcServerSettings = getattr(settings, service).server
        assert server.port == cls.model_fields[service].default.server.port, f"{where}: port"
        if ports or probed:  # a deployable without a gRPC server would have neither
            assert set(ports) == set(probed) == {server.port}, f"{where}: {ports} {probed}"
            assert server.host == "0.0.0.0", f"{where}: a container must bind every interface"
        for name, value in env.items():  # host:port of another service: its port
            if value and (m := re.fullmatch(r"([a-z-]+):(\d+)", value)) and m[1] in SERVICES:
                other = settings_class(m[1])
                if other is not None:
                    assert int(m[2]) == getattr(other(), m[1]).server.port, f"{where}: {name}"
    assert serving == {"compose", "compose.gpu", *OVERLAYS}, f"{service} is not served everywhere"


def expected_topics() -> list[Topic]:
    topics = list(ALL_TOPICS)
    if importlib.util.find_spec("loopmesh.rollout.settings"):
        from loopmesh.rollout.settings import RolloutTopics  # it declares its policies topic

        topics += [t for t in RolloutTopics().table() if t.name not in {x.name for x in topics}]
    return topics


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_topics_match_the_topic_table(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objects = rendered[overlay]
    config = find(objects, "ConfigMap", "loopmesh-config")[0]["data"]
    partitions = int(
        config.get("LOOPMESH_KAFKA__DEFAULT_PARTITIONS", KafkaSettings().default_partitions)
    )
    replicas = int(config.get("LOOPMESH_KAFKA__REPLICATION_FACTOR", 1))
    nodes = sum(p["spec"]["replicas"] for p in find(objects, "KafkaNodePool"))
    assert replicas <= nodes, f"{overlay}: replication factor {replicas} > {nodes} brokers"
    cluster = find(objects, "Kafka")[0]["metadata"]["name"]
    actual = {
        t["spec"].get("topicName", t["metadata"]["name"]): t for t in find(objects, "KafkaTopic")
    }
    wanted: dict[str, tuple[int, dict[str, str]]] = {}
    for topic in expected_topics():
        wanted[topic.name] = (partitions, topic.config())
        wanted[topic.dlq] = (1, DLQ_TOPIC_CONFIG)
    assert set(actual) == set(wanted), f"{overlay}: {set(actual) ^ set(wanted)}"
    for name, (count, cfg) in wanted.items():
        spec = actual[name]["spec"]
        assert spec["partitions"] == count, f"{overlay}: {name} partitions"
        assert {k: str(v) for k, v in spec["config"].items()} == cfg, f"{overlay}: {name} config"
        assert spec["replicas"] == replicas, f"{overlay}: {name} replicas"
        assert actual[name]["metadata"]["labels"]["strimzi.io/cluster"] == cluster


def _strings(value: Any, names: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _strings(getattr(value, name), (*names, name))
    elif isinstance(value, str):
        yield names[-1], value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_watch_real_consumer_groups(
    rendered: dict[str, list[Obj]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[overlay]
    config = find(objects, "ConfigMap", "loopmesh-config")[0]["data"]
    bootstrap = config["LOOPMESH_KAFKA__BOOTSTRAP_SERVERS"]
    namespace = find(objects, "ConfigMap", "loopmesh-config")[0]["metadata"]["namespace"]
    assert bootstrap.startswith(
        f"{find(objects, 'Kafka')[0]['metadata']['name']}-kafka-bootstrap.{namespace}.svc:"
    )
    topics = {t["metadata"]["name"]: t["spec"]["partitions"] for t in find(objects, "KafkaTopic")}
    for scaled in find(objects, "ScaledObject"):
        spec, name = scaled["spec"], scaled["metadata"]["name"]
        (dep,) = find(objects, "Deployment", spec["scaleTargetRef"]["name"])
        assert "replicas" not in dep["spec"], f"{name}: the autoscaler owns replicas"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        service = container["command"][-1]
        for trigger in spec["triggers"]:
            if trigger["type"] == "cpu":
                assert "cpu" in container["resources"]["requests"], f"{name}: cpu needs a request"
                continue
            meta = trigger["metadata"]
            assert trigger["type"] == "kafka" and meta["bootstrapServers"] == bootstrap
            assert spec["maxReplicaCount"] <= topics[meta["topic"]], f"{name}: idle consumers"
            cls = settings_class(service)
            if cls is None:
                continue
            use_env(monkeypatch, {e["name"]: e.get("value") for e in container["env"]})
            values = list(_strings(getattr(cls(), service)))
            groups = {v for k, v in values if k in ("app_id", "consumer_group", "group_id")}
            assert meta["consumerGroup"] in groups, (
                f"{name}: {meta['consumerGroup']} not in {groups}"
            )
            assert meta["topic"] in {v for _, v in values}, (
                f"{name}: {service} does not read {meta['topic']}"
            )


def gpu_limit(objects: list[Obj], name: str) -> int:
    (dep,) = find(objects, "Deployment", name)
    limits = dep["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_gpu_placement_and_secrets(rendered: dict[str, list[Obj]]) -> None:
    base, dev, gpu = (rendered[o] for o in OVERLAYS)
    assert [gpu_limit(o, "triton") for o in (base, dev, gpu)] == [1, 0, 1]
    assert [gpu_limit(o, "trainer") for o in (base, dev, gpu)] == [0, 0, 1]
    (dev_triton,) = find(dev, "Deployment", "triton")
    assert "nodeSelector" not in dev_triton["spec"]["template"]["spec"]
    for overlay in OVERLAYS:
        for dep in find(rendered[overlay], "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env", []):  # secrets by reference only
                    assert "AUTH" not in e["name"] or "secretKeyRef" in e.get("valueFrom", {})


# ---------------------------------------------------------------- images and observability


def test_dockerfile(compose: Obj) -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = dict((name, base) for base, name in re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M))
    assert list(stages)[-1] == "service", "the all-in-one image must be the default target"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for name in SERVICES:
        # One target per deployable, built on the runtime stage, with its own extra's venv.
        assert stages.get(name) == "runtime", f"no Dockerfile target {name}"
        target = _stage(text, name)
        venv = re.search(r"^COPY --from=(deps-\S+) /opt/venv /opt/venv$", target, re.M)
        assert venv is not None, f"{name}: no venv"
        installs = _stage(text, venv[1])
        assert (f'".[{name}]"' in installs) or (not extras[name] and "pip install ." in installs)
        assert re.search(r"^USER \$\{LOOPMESH_UID\}", target, re.M), f"{name} must not run as root"
        assert f'CMD ["loopmesh", "serve", "{name}"]' in target
        # The source after the venv: a code change never re-copies a venv (the trainer's is
        # gigabytes); readable by the service user whatever the checkout's modes (a 0700
        # services/loopmesh/gen once broke every service; the root-run import checks passed).
        assert venv.start() < target.index("COPY . /app\n"), f"{name}: source before venv"
        assert target.index("COPY . /app\n") < target.index("RUN chmod -R a+rX /app "), name
    for door in ("ingestion", "feedback"):
        assert "find_spec('torch')" in _stage(text, door), f"{door}: proven free of torch"
    assert "ARG LOOPMESH_UID=10001" in text
    assert "COPY . /app" not in _stage(text, "runtime"), "the source goes after each venv"
    ort = re.search(r"^ARG ONNXRUNTIME_VERSION=(\S+)$", text, re.M)
    for extra in ("trainer", "devstack"):  # the exporter's check and the local Triton's model
        assert ort is not None and f"onnxruntime=={ort[1]}" in extras[extra], (
            f"Triton's onnxruntime must run the model.onnx the trainer checked ({extra})"
        )
    assert "torch" not in _stage(text, "triton"), "Triton runs model.onnx: no torch"
    assert re.search(r"^ARG GO_IMAGE=golang:\S+$", text, re.M)
    for arg in ("PYTHON_IMAGE", "GO_IMAGE"):  # base images: build arguments compose passes
        assert arg in compose["x-loopmesh-build"]["args"], arg
    for name, svc in compose["services"].items():
        if "build" in svc and svc["build"].get("target") != "triton":
            target = svc["build"]["target"]
            assert target in SERVICES and stages.get(target) == "runtime", f"{name}: {target}"
            assert svc["image"].endswith(f"-{target}:${{LOOPMESH_TAG:-dev}}"), name
            for mount in svc.get("volumes", []):
                path = mount.split(":")[1]
                assert path in text, f"{name}: {path} must exist in the image (volume owner)"


def _stage(text: str, name: str) -> str:
    """The lines of one Dockerfile stage."""
    start = re.search(rf"^FROM \S+ AS {re.escape(name)}$", text, re.M)
    assert start is not None, name
    following = re.search(r"^FROM ", text[start.end() :], re.M)
    return text[start.start() : start.end() + following.start() if following else len(text)]


def test_observability_configs(compose: Obj) -> None:
    prom = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    port = compose["x-loopmesh-env"]["LOOPMESH_TELEMETRY__METRICS_PORT"]
    assert {f"{s}:{port}" for s in SERVICES} <= targets
    assert "triton:8002" in targets and "otel-collector:8889" in targets
    otel = yaml.safe_load((ROOT / "infra/otel/collector.yaml").read_text())
    for pipeline in otel["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(otel[kind]), pipeline
    assert "4317" in compose["x-loopmesh-env"]["LOOPMESH_TELEMETRY__OTLP_ENDPOINT"]
    ds = yaml.safe_load(
        (ROOT / "infra/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    uids = {d["uid"] for d in ds["datasources"]}
    dash = json.loads((ROOT / "infra/grafana/dashboards/loopmesh.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} <= uids
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("traffic", "latency", "consumer lag", "per model version", "rollout weights"):
        assert word in titles, word
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert "rpc_server_calls_total" in exprs and "rpc_server_duration_milliseconds_bucket" in exprs


# ---------------------------------------------------------------- the health probe


async def test_healthcheck_exit_codes() -> None:
    server = GrpcServer("probe", GrpcServerSettings(port=0, grace_seconds=0))
    await server.start(["loopmesh.v1.Probe"])

    async def probe(*args: str) -> int:
        return await asyncio.to_thread(healthcheck.main, ["--quiet", "--timeout", "2", *args])

    try:
        assert await probe(server.address) == 0
        assert await probe(server.address, "--service", "loopmesh.v1.Probe") == 0
        assert await probe(server.address, "--service", "loopmesh.v1.Unknown") == 1
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await probe(server.address) == 1
        assert await probe(server.address, "--timeout", "0") == 2
        assert await probe(server.address, "--cert", "c.pem") == 2
    finally:
        await server.stop()
    assert await probe(server.address) == 1  # nobody listening


def test_inference_presents_a_token_to_features_wherever_it_runs(
    compose: Obj, rendered: dict[str, list[Obj]]
) -> None:
    # Before: no LOOPMESH_AUTH__CLIENT_TOKEN anywhere, so with auth on every Predict's feature
    # read was UNAUTHENTICATED and degraded to the declared defaults.
    env = compose["services"]["inference"]["environment"]
    assert env["LOOPMESH_AUTH__CLIENT_TOKEN"] == "${LOOPMESH_AUTH__CLIENT_TOKEN:-}"
    for overlay in OVERLAYS:
        (dep,) = find(rendered[overlay], "Deployment", "inference")
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        refs = {e["name"]: e.get("valueFrom", {}) for e in container["env"]}
        assert refs["LOOPMESH_AUTH__CLIENT_TOKEN"]["secretKeyRef"]["key"] == "client-token"
    # What compose passes when the variable is unset: no client token, not a bad one.
    from loopmesh.mesh.auth import AuthSettings

    assert AuthSettings.model_validate({"client_token": ""}).client_token is None
    with pytest.raises(ValueError, match="at least 16"):
        AuthSettings.model_validate({"client_token": "short"})
