"""The whole mesh under `loopmesh run`, with TLS and tokens on every hop it makes.

Configured only through the ``LOOPMESH_*`` variables a user would set (README, "Operations and
security"), with certificates made at test time (one CA; a server certificate for 127.0.0.1; a
client certificate every client presents):

- every gRPC server (ingestion, feedback, features and its Go data plane, inference and its Go
  data plane, joiner, trainer, rollout) serves mutual TLS only and has token auth on; the
  services present ``LOOPMESH_AUTH__CLIENT_TOKEN`` (role ``features``: inference reads
  features), the runner's own calls (health probes, the first training, the simulator)
  present ``LOOPMESH_CLIENT__TOKEN`` over ``LOOPMESH_CLIENT__TLS_*``;
- the local Kafka broker's only client listener is SSL, requiring a client certificate (its
  KRaft controller listener stays plaintext on loopback): every producer, consumer, admin
  client and the joiner's faust app connects with ``LOOPMESH_KAFKA__SECURITY_PROTOCOL=SSL``.
  The Go data plane does not talk to Kafka;
- tritonserver (2.45, from the pytriton wheel) serves gRPC with ``--grpc-use-ssl-mutual``
  and our certificates, its HTTP endpoint off; inference (Python and the Go data plane) and
  rollout verify it with ``LOOPMESH_TRITON_CLIENT__TLS_*``.

The loop closes: events are ingested, predictions served, feedback joined, the first version
trained, published, loaded and served, then a second one trained on joined live feedback,
loaded into Triton and given canary traffic, and a Predict pinned to it answers. While the mesh
is still up the test checks what must be refused (no token: UNAUTHENTICATED on every door;
another role: PERMISSION_DENIED; plaintext and TLS without a client certificate cannot
connect, to any server, Triton or the broker), runs `loopmesh rollout status` over mutual TLS
with an operator token, and finally that no log of the mesh (services, data planes, Kafka,
Triton) recorded a TLS or auth failure before those probes began.

Left as the code has them (documented there): the data planes reach their own Python process
on a loopback port without TLS (the Python side checks tokens again), Triton's metrics port is
plaintext Prometheus, and tritonserver takes no token (it has no token auth).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import secrets
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from tritonclient.grpc import service_pb2, service_pb2_grpc

from loopmesh.client import AsyncClient, ClientConfig, Event
from loopmesh.devstack.kafka import _read_properties, probe_metadata
from loopmesh.devstack.runner import SERVICE_ORDER, LoopRun, RunOptions
from loopmesh.devstack.state import LoopState
from loopmesh.gen.loopmesh.v1 import features_pb2, features_pb2_grpc
from loopmesh.mesh.auth import AuthSettings
from loopmesh.mesh.channels import aio_channel
from loopmesh.mesh.settings import GrpcClientSettings
from tests.support.certs import Pki, make_pki

pytestmark = pytest.mark.e2e  # assembles the mesh: several services on real parts

SERVICE_TOKEN = "svc-" + secrets.token_hex(16)
RUNNER_TOKEN = "run-" + secrets.token_hex(16)
OPERATOR_TOKEN = "ops-" + secrets.token_hex(16)

# One door per service that needs a token (the joiner serves health only).
GUARDED = {
    "ingestion": "/loopmesh.v1.IngestionService/Ingest",
    "feedback": "/loopmesh.v1.FeedbackService/Submit",
    "features": "/loopmesh.v1.FeatureService/GetOnlineFeatures",  # the Go data plane
    "inference": "/loopmesh.v1.InferenceService/Predict",  # proxied to Python
    "trainer": "/loopmesh.v1.TrainerService/GetStatus",
    "rollout": "/loopmesh.v1.RolloutService/ListRollouts",
}
EXTRA_GUARDED = {
    "features": "/loopmesh.v1.FeatureService/GetFeatureSchema",  # proxied to Python
    "inference": "/inference.GRPCInferenceService/ModelInfer",  # the Go data plane
}

# What a failed handshake, a refused certificate or a refused token leaves in a log: grpc-core
# (Python), crypto/tls (Go), Kafka's Selector, tritonserver, aiokafka and our own servers.
FAILURE = re.compile(
    r"handshake|certificate[ _]verify|CERTIFICATE_VERIFY_FAILED|unknown[ _]ca|bad certificate|"
    r"x509:|tls: |SSLError|ssl_transport_security|Failed authentication|"
    r"UNAUTHENTICATED|PERMISSION_DENIED|missing or invalid token|is needed for",
    re.IGNORECASE,
)


def _security_env(pki: Pki) -> dict[str, str]:
    """Every variable of a mesh with mutual TLS and tokens on every hop."""
    tokens = [
        {"name": "services", "token": SERVICE_TOKEN, "roles": ["features"]},
        {
            "name": "loopmesh-run",
            "token": RUNNER_TOKEN,
            "roles": ["ingest", "feedback", "predict", "operator"],
        },
        {"name": "operator", "token": OPERATOR_TOKEN, "roles": ["operator"]},
    ]
    ca, cert, key = str(pki.ca), str(pki.client_cert), str(pki.client_key)
    env = {
        "LOOPMESH_AUTH__TOKENS": json.dumps(tokens),
        "LOOPMESH_AUTH__CLIENT_TOKEN": SERVICE_TOKEN,
        "LOOPMESH_KAFKA__SECURITY_PROTOCOL": "SSL",
        "LOOPMESH_KAFKA__SSL_CAFILE": ca,
        "LOOPMESH_KAFKA__SSL_CERTFILE": cert,
        "LOOPMESH_KAFKA__SSL_KEYFILE": key,
        "LOOPMESH_INFRA__TLS_CERTFILE": str(pki.server_cert),
        "LOOPMESH_INFRA__TLS_KEYFILE": str(pki.server_key),
        "LOOPMESH_INFRA__TLS_CLIENT_CAFILE": ca,
        "LOOPMESH_CLIENT__TOKEN": RUNNER_TOKEN,
    }
    for prefix in (
        "LOOPMESH_TRITON_CLIENT__",
        "LOOPMESH_INFERENCE__FEATURES_CLIENT__",
        "LOOPMESH_CLIENT__",
    ):
        env |= {f"{prefix}TLS_CAFILE": ca, f"{prefix}TLS_CERTFILE": cert}
        env[f"{prefix}TLS_KEYFILE"] = key
    for name in SERVICE_ORDER:
        server = f"LOOPMESH_{name.upper()}__SERVER__"
        env[f"{server}TLS_CERTFILE"] = str(pki.server_cert)
        env[f"{server}TLS_KEYFILE"] = str(pki.server_key)
        env[f"{server}TLS_CLIENT_CAFILE"] = ca
    return env


def _canary_from_live_feedback(state: LoopState) -> bool:
    """A version after the first, trained with joined live feedback, takes canary traffic."""
    return any(
        mark.state == "canary" and (mark.canary or 0) >= 2 and mark.weight > 0
        for mark in state.rollout_marks
    )


async def _code(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _raw(channel: grpc.aio.Channel, method: str) -> Callable[..., Awaitable[bytes]]:
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731 - an empty message is b""
    call: Callable[..., Awaitable[bytes]] = channel.unary_unary(
        method, request_serializer=identity, response_deserializer=identity
    )
    return call


async def _health(channel: grpc.aio.Channel) -> grpc.StatusCode:
    stub = health_pb2_grpc.HealthStub(channel)
    return await _code(stub.Check(health_pb2.HealthCheckRequest(), timeout=3))


def _log_sizes(paths: list[Path]) -> dict[Path, int]:
    return {path: path.stat().st_size for path in paths if path.is_file()}


class SecuredRun(LoopRun):
    """`loopmesh run` as a user runs it, plus the refusals checked while the mesh is up."""

    def __init__(self, options: RunOptions, pki: Pki, console: Console) -> None:
        super().__init__(options, console)
        self.pki = pki
        self.log_marks: dict[Path, int] = {}
        self.refusals: dict[str, object] = {}
        self.pinned: tuple[int, str] | None = None
        self.model_infer: tuple[str, int] | None = None
        self.features_present = 0
        self.cli: tuple[int, str, int, str] | None = None

    def logs(self) -> list[Path]:
        services = sorted((self.options.out_dir / "logs").glob("*.log"))
        return [*services, self.stack.kafka.log_path, self.stack.triton.log_path]

    async def watch(self) -> str:
        reason = await super().watch()
        if reason == "stop_when":
            # Everything the mesh logged so far is its own traffic; the probes come after.
            self.log_marks = _log_sizes(self.logs())
            await self._predict_on_the_canary()
            await self._read_features()
            await self._refusals()
            await self._rollout_cli()
        return reason

    def _address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def _predict_on_the_canary(self) -> None:
        """Pinned to the canary: Predict (proxied to Python, which calls Triton) and ModelInfer
        (the Go data plane calls Triton), both over mutual TLS with the runner's token."""
        mark = next(m for m in reversed(self.loop_state.rollout_marks) if m.canary)
        version = int(mark.canary or 0)
        assert self.world is not None
        [request] = self.world.sample(1, np.random.default_rng(0))
        # TLS and the token from LOOPMESH_CLIENT__*, as the simulator's.
        config = ClientConfig(inference_url=self._address("inference"), tracing=False)
        async with AsyncClient(config) as client:
            reply = await client.predict(
                request.entity_id,
                context=request.context,
                model_name=self.options.model_name,
                model_version=version,
                timeout=10,
            )
        self.pinned = (version, str(reply.model_version))
        model, str_version = self.options.model_name, str(version)
        async with aio_channel(
            self._address("inference"), config.channel_settings(), auth=config.auth(), tracing=False
        ) as channel:
            oip = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            meta = await oip.ModelMetadata(
                service_pb2.ModelMetadataRequest(name=model, version=str_version), timeout=10
            )
            spec = meta.inputs[0]
            shape = [dim if dim > 0 else 1 for dim in spec.shape]
            tensor = service_pb2.ModelInferRequest.InferInputTensor(
                name=spec.name, datatype=spec.datatype, shape=shape
            )
            infer = await oip.ModelInfer(
                service_pb2.ModelInferRequest(
                    model_name=model,
                    model_version=str_version,
                    inputs=[tensor],
                    raw_input_contents=[np.zeros(math.prod(shape), np.float32).tobytes()],
                ),
                timeout=10,
            )
        self.model_infer = (infer.model_version, len(infer.raw_output_contents))

    async def _read_features(self) -> None:
        """An event ingested now reaches the online store (ingestion, Kafka over SSL, the
        features fold) and the features data plane serves it to the services' token, the one
        inference presents (the CTR model of `loopmesh run` reads no stored feature, so
        inference itself never makes this call here)."""
        entity = f"secured-{secrets.token_hex(4)}"
        config = ClientConfig(ingestion_url=self._address("ingestion"), tracing=False)
        async with AsyncClient(config) as client:
            await client.ingest([Event(entity, "view", numeric={"value": 1.0})])
        service = GrpcClientSettings(
            tls_cafile=self.pki.ca,
            tls_certfile=self.pki.client_cert,
            tls_keyfile=self.pki.client_key,
        )
        auth = AuthSettings(client_token=SERVICE_TOKEN)
        request = features_pb2.GetOnlineFeaturesRequest(entity_ids=[entity])
        present = 0
        async with aio_channel(self._address("features"), service, auth=auth, tracing=False) as ch:
            stub = features_pb2_grpc.FeatureServiceStub(ch)
            for _ in range(60):
                answer = await stub.GetOnlineFeatures(request, timeout=5)
                present = sum(
                    v.status == features_pb2.FEATURE_STATUS_PRESENT
                    for e in answer.entities
                    for v in e.values
                )
                if present:
                    break
                await asyncio.sleep(0.5)
        self.features_present = present

    async def _refusals(self) -> None:
        pki = self.pki
        ca = pki.ca.read_bytes()
        mutual = grpc.ssl_channel_credentials(
            ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes()
        )
        no_cert = grpc.ssl_channel_credentials(ca)
        found: dict[str, object] = {}
        targets = {name: self._address(name) for name in SERVICE_ORDER}
        targets["triton"] = self.stack.triton.grpc_url
        for name, address in targets.items():
            async with grpc.aio.insecure_channel(address) as plain:
                found[f"{name} plaintext"] = await _health(plain)
            async with grpc.aio.secure_channel(address, no_cert) as half:
                found[f"{name} tls without client certificate"] = await _health(half)
            async with grpc.aio.secure_channel(address, mutual) as channel:
                found[f"{name} mutual tls health"] = await _health(channel)
                for method in filter(None, (GUARDED.get(name), EXTRA_GUARDED.get(name))):
                    call = _raw(channel, method)
                    found[f"{method} without token"] = await _code(call(b"", timeout=5))
                    wrong = call(b"", timeout=5, metadata=(("authorization", "Bearer nope" * 4),))
                    found[f"{method} wrong token"] = await _code(wrong)
                    if name != "features":  # the services' token has role features only
                        other_role = call(
                            b"",
                            timeout=5,
                            metadata=(("authorization", f"Bearer {SERVICE_TOKEN}"),),
                        )
                        found[f"{method} other role"] = await _code(other_role)
        # Kafka: no plaintext client listener at all, and the SSL one wants a certificate.
        kafka = self.stack.kafka
        props = _read_properties(kafka.config_path)
        found["kafka listeners"] = props["listeners"]
        found["kafka advertised"] = props["advertised.listeners"]
        found["kafka protocols"] = props["listener.security.protocol.map"]
        found["kafka plaintext"] = await asyncio.to_thread(_kafka_probe, kafka.port, None)
        verify_only = ssl.create_default_context(cafile=str(pki.ca))
        found["kafka tls without client certificate"] = await asyncio.to_thread(
            _kafka_probe, kafka.port, verify_only
        )
        with_cert = ssl.create_default_context(cafile=str(pki.ca))
        with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        found["kafka mutual tls"] = await asyncio.to_thread(_kafka_probe, kafka.port, with_cert)
        self.refusals = found

    async def _rollout_cli(self) -> None:
        """`loopmesh rollout status` as an operator runs it: TLS from LOOPMESH_ROLLOUT__CLIENT__*,
        the operator token from LOOPMESH_AUTH__CLIENT_TOKEN; then once without the token."""
        pki = self.pki
        base = {
            "LOOPMESH_ROLLOUT__CLIENT__TLS_CAFILE": str(pki.ca),
            "LOOPMESH_ROLLOUT__CLIENT__TLS_CERTFILE": str(pki.client_cert),
            "LOOPMESH_ROLLOUT__CLIENT__TLS_KEYFILE": str(pki.client_key),
        }
        argv = [
            str(Path(sys.executable).parent / "loopmesh"),
            "rollout",
            "status",
            "--address",
            self._address("rollout"),
            "--json",
        ]
        results = []
        for token in (OPERATOR_TOKEN, ""):
            env = {**os.environ, **base, "LOOPMESH_AUTH__CLIENT_TOKEN": token}
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            results.append((proc.returncode or 0, out.decode(errors="replace")))
        self.cli = (results[0][0], results[0][1], results[1][0], results[1][1])


def _kafka_probe(port: int, tls: ssl.SSLContext | None) -> str:
    try:
        cluster_id, brokers = probe_metadata("127.0.0.1", port, timeout=5, tls=tls)
    except (OSError, ConnectionError, struct.error) as exc:
        return f"refused: {type(exc).__name__}"
    return f"answered: cluster {cluster_id} brokers {brokers}"


async def test_the_whole_mesh_runs_with_mutual_tls_and_tokens_on_every_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tmp_path / "pki"
    certs.mkdir()
    pki = make_pki(certs)
    for name, value in _security_env(pki).items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    options = RunOptions(
        duration_seconds=420,
        headless=True,
        out_dir=tmp_path / "run",
        requests_per_second=40,
        # A first version from few examples, so one trained with live feedback beats it.
        bootstrap_examples=300,
        retrain_every_examples=300,
        canary_weights=(0.5,),
        canary_min_samples=1000,  # hold the canary: the test stops once it takes traffic
        canary_step_seconds=5,
        # Straight to canary: with shadow first, 1000 paired samples would hold it in shadow.
        shadow_share=0.0,
        drift_after_seconds=None,
        stop_when=_canary_from_live_feedback,
    )
    run = SecuredRun(options, pki, Console(file=out, width=160))
    summary = await run.run()
    log = out.getvalue()

    assert summary["stopped_by"] == "stop_when", log
    # The loop closed through every secured hop.
    for count in ("events", "predictions", "feedback", "labelled_examples"):
        assert isinstance(summary[count], int) and summary[count] > 0, summary
    published = summary["versions_published"]
    assert isinstance(published, list) and len(published) >= 2, summary
    assert run.pinned is not None
    version, answered = run.pinned
    assert version >= 2 and answered == str(version), run.pinned
    assert run.model_infer is not None and run.model_infer[0] == str(version), run.model_infer
    assert run.model_infer[1] == 1, run.model_infer
    assert run.features_present > 0
    freshness = summary["freshness_seconds"]
    assert isinstance(freshness, dict) and str(version) in freshness, summary
    simulator = summary["simulator"]
    assert isinstance(simulator, dict) and simulator["predicted"] > 0, simulator

    refused = run.refusals
    unavailable = grpc.StatusCode.UNAVAILABLE
    for name in (*SERVICE_ORDER, "triton"):
        assert refused[f"{name} plaintext"] == unavailable, (name, refused)
        assert refused[f"{name} tls without client certificate"] == unavailable, (name, refused)
        assert refused[f"{name} mutual tls health"] == grpc.StatusCode.OK, (name, refused)
    for name, method in [*GUARDED.items(), *EXTRA_GUARDED.items()]:
        assert refused[f"{method} without token"] == grpc.StatusCode.UNAUTHENTICATED, refused
        assert refused[f"{method} wrong token"] == grpc.StatusCode.UNAUTHENTICATED, refused
        if name != "features":
            assert refused[f"{method} other role"] == grpc.StatusCode.PERMISSION_DENIED, refused
    port = run.stack.kafka.port
    assert refused["kafka listeners"] == (
        f"SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{run.stack.kafka.controller_port}"
    )
    assert refused["kafka advertised"] == f"SSL://127.0.0.1:{port}"
    assert refused["kafka protocols"] == "SSL:SSL,CONTROLLER:PLAINTEXT"
    assert str(refused["kafka plaintext"]).startswith("refused"), refused
    assert str(refused["kafka tls without client certificate"]).startswith("refused"), refused
    assert str(refused["kafka mutual tls"]).startswith("answered"), refused

    assert run.cli is not None
    code, text, bare_code, bare_text = run.cli
    assert code == 0, text
    assert "canary" in text and f'"canary_version": "{version}"' in text, text
    assert bare_code == 1 and "UNAUTHENTICATED" in bare_text, bare_text

    # Nothing in the mesh logged a TLS or auth failure of its own hops.
    failures = []
    for path, size in run.log_marks.items():
        with path.open("rb") as handle:
            text = handle.read(size).decode(errors="replace")
        failures += [f"{path.name}: {line}" for line in text.splitlines() if FAILURE.search(line)]
    assert not failures, "\n".join(failures[:40])
