"""OpenTelemetry instruments of the inference gateway: answers per model version, Triton errors.

Prometheus names (OTel's conversion): ``loopmesh_inference_predictions_total{model, version,
arm, degraded}`` and ``loopmesh_inference_triton_errors_total{model, version, code}``. Both
Predict and the Open Inference ModelInfer door record them; the data plane's counts arrive in
bulk with its stats drains. Shadow scoring (never an answer)
counts in ``loopmesh_inference_shadow_scores_total{model, version, outcome}``: ``scored``,
``failed``, ``timeout`` or ``shed`` (no shadow slot free: shadow work goes first under load).
"""

from __future__ import annotations

from loopmesh.mesh.telemetry import meter

# Created at import; they bind to the provider setup_telemetry installs later (OTel proxies).
_meter = meter("loopmesh.inference")
_predictions = _meter.create_counter(
    "loopmesh.inference.predictions",
    unit="{prediction}",
    description="Answers per model version, routing arm and whether features were degraded",
)
_triton_errors = _meter.create_counter(
    "loopmesh.inference.triton_errors",
    unit="{error}",
    description="Triton calls that failed, per model version and gRPC status code",
)

_shadow = _meter.create_counter(
    "loopmesh.inference.shadow_scores",
    unit="{score}",
    description="Shadow candidates' scores of mirrored requests, by outcome",
)


def record_shadow(model: str, version: int | None, outcome: str, *, count: int = 1) -> None:
    """``count`` shadow scorings of requests (``version`` None: shed before one was picked);
    counts above 1 are the data plane's, drained in bulk."""
    _shadow.add(
        count,
        {
            "model": model,
            "version": str(version) if version is not None else "",
            "outcome": outcome,
        },
    )


def record_prediction(
    model: str, version: int | None, *, arm: str, degraded: bool, count: int = 1
) -> None:
    """``count`` answers served by ``version`` of ``model``."""
    _predictions.add(
        count,
        {
            "model": model,
            "version": str(version) if version is not None else "",
            "arm": arm,
            "degraded": "true" if degraded else "false",
        },
    )


def record_triton_error(model: str, version: int | None, code: str, *, count: int = 1) -> None:
    """``count`` Triton calls for ``model`` (``version`` when known) failed with gRPC ``code``."""
    _triton_errors.add(
        count,
        {"model": model, "version": str(version) if version is not None else "", "code": code},
    )
