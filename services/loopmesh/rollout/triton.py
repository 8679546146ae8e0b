"""Loads exactly the wanted versions of a model into Triton (explicit model control).

The repository's ``config.pbtxt`` says ``version_policy: { all {} }``; loading with a config
override whose policy is ``specific { versions: [...] }`` keeps only the wanted versions
loaded, which is also the only way to unload one version of several. Measured on Triton 2.51
(python backend): any load with an override reloads every version it names (the running
instances keep serving until the new ones are ready), so the controller changes the set only
when a rollout needs it. Every version's sha256 is checked against its metadata before a load.

The client is tritonclient's aio ``InferenceServerClient``, which builds its own channel and
takes no interceptors: TLS and channel arguments come from the channel factory
(``LOOPMESH_TRITON_CLIENT__*``, ``channel_credentials``/``channel_options``) through its
``creds`` and ``channel_args``; the trace is kept by this module's own ``triton load`` span.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import tritonclient.grpc.aio as triton_aio
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from loopmesh.mesh import model_repo
from loopmesh.mesh.channels import channel_credentials, channel_options
from loopmesh.mesh.settings import GrpcClientSettings, TritonClientSettings
from loopmesh.mesh.telemetry import tracer

log = logging.getLogger(__name__)
_tracer = tracer("loopmesh.rollout.triton")
PROBE_TIMEOUT = 10.0


class LoadError(RuntimeError):
    """Wanted versions could not be made ready."""


def version_config(repo: Path, model: str, versions: Collection[int]) -> str:
    """The model's config.pbtxt as JSON, restricted to ``versions``."""
    text = (model_repo.model_dir(repo, model) / model_repo.CONFIG_FILE).read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    config.version_policy.Clear()
    config.version_policy.specific.versions.extend(sorted(versions))
    return json_format.MessageToJson(config)


def check_integrity(
    repo: Path, model: str, versions: Collection[int], expected: Mapping[int, str]
) -> None:
    """Raise LoadError unless every version exists and its model.onnx matches its sha256
    (and the sha256 the ModelPublished event announced, when known)."""
    for version in sorted(versions):
        try:
            recorded = model_repo.read_metadata(repo, model, version).get("sha256")
            intact = model_repo.verify_sha256(repo, model, version)
        except (OSError, ValueError) as exc:
            raise LoadError(f"v{version} is not readable in the model repository: {exc}") from exc
        if not intact:
            raise LoadError(
                f"v{version}: model.onnx or weights.safetensors does not match the sha256 "
                "in its metadata"
            )
        announced = expected.get(version)
        if announced is not None and announced != recorded:
            raise LoadError(f"v{version}: sha256 {recorded} is not the published {announced}")


class TritonLoader:
    """Keeps Triton's loaded versions of each model equal to what the controller wants."""

    def __init__(
        self,
        url: str,
        repo: Path,
        *,
        timeout: float,
        client: GrpcClientSettings | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.repo = Path(repo)
        self.timeout = timeout
        self._fence = fence
        """Raises ``core.NotLeader`` when this controller no longer leads: checked right
        before every load or unload request, so a deposed leader changes nothing in Triton."""
        self.settings = client or TritonClientSettings()
        # Built now so a half-configured TLS setting fails at start, not at the first load.
        self._credentials = channel_credentials(self.settings)
        self._client: triton_aio.InferenceServerClient | None = None

    @property
    def client(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            # tritonclient cannot take our interceptors (no tracing or token on its calls):
            # TLS goes through its own ``creds`` and the limits through ``channel_args``.
            self._client = triton_aio.InferenceServerClient(
                self.url,
                creds=self._credentials,
                channel_args=channel_options(self.settings),
            )
        return self._client

    def _check_fence(self) -> None:
        if self._fence is not None:
            self._fence()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def loaded(self, model: str) -> set[int]:
        """Versions of ``model`` Triton reports READY."""
        index = await self.client.get_model_repository_index(
            as_json=True, client_timeout=PROBE_TIMEOUT
        )
        return {
            int(entry["version"])
            for entry in index.get("models", [])
            if entry.get("name") == model
            and entry.get("state") == "READY"
            and str(entry.get("version", "")).isdigit()
        }

    async def ensure(
        self, model: str, versions: Collection[int], expected_sha: Mapping[int, str] | None = None
    ) -> bool:
        """Make exactly ``versions`` loaded; False when they already were. Raises LoadError."""
        wanted = set(versions)
        current = await self.loaded(model)
        if current == wanted:
            return False
        with _tracer.start_as_current_span(
            "triton load", attributes={"model": model, "versions": sorted(wanted)}
        ):
            if not wanted:
                self._check_fence()
                await self.client.unload_model(model, client_timeout=self.timeout)
                return True
            await asyncio.to_thread(check_integrity, self.repo, model, wanted, expected_sha or {})
            config = await asyncio.to_thread(version_config, self.repo, model, wanted)
            self._check_fence()
            log.info("loading %s versions %s (loaded now: %s)", model, sorted(wanted), current)
            try:
                await self.client.load_model(model, config=config, client_timeout=self.timeout)
            except Exception as exc:  # tritonclient raises its own type and gRPC errors
                raise LoadError(f"Triton refused to load {model} {sorted(wanted)}: {exc}") from exc
            missing = [
                v
                for v in sorted(wanted)
                if not await self.client.is_model_ready(model, str(v), client_timeout=PROBE_TIMEOUT)
            ]
            if missing:
                raise LoadError(f"{model} versions {missing} are not ready after loading")
        return True
