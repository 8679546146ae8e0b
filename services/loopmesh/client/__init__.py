"""The LoopMesh client SDK: Ingest, Feedback and Predict for product apps and backends.

Two faces of one implementation: ``AsyncClient`` for asyncio code and ``Client``, which
blocks, for scripts and threads. Both are configured by one ``ClientConfig`` (arguments, or
``LOOPMESH_CLIENT__*`` environment variables) and reach the doors through the mesh's channel
factory (TLS, mutual TLS, bearer token, trace context)::

    from loopmesh.client import Client, Event, Feedback

    with Client(ingestion_url="ingest:50051", feedback_url="feedback:50052",
                inference_url="inference:50054") as client:
        client.ingest([Event("user-1", "click", numeric={"price": 9.5})])
        prediction = client.predict("user-1", context={"price": 9.5})
        client.feedback.send(Feedback(prediction.prediction_id, label=1))  # buffered

What it does for the caller:

- **Idempotent retries.** Each event and feedback gets an ``event_id`` (uuid4 hex) before
  the first attempt when it has none; UNAVAILABLE (and DEADLINE_EXCEEDED, for these calls)
  is retried with backoff and jitter, resending the same ids, which the doors drop as
  repeats. Other statuses raise at once (``loopmesh.client.errors``: code, field, per-item
  results).
- **Batching.** ``ingest`` cuts any number of events into requests within the doors' batch
  limit; ``ingest_stream`` streams unbounded input in windows; ``client.events`` and
  ``client.feedback`` are buffered senders batching by size and linger time with a bounded
  buffer (``send`` waits when it is full).
- **Deadlines** on every call (``timeout=``, else ``deadline_s`` / ``stream_deadline_s``).

Modules: ``config`` (settings), ``aio`` and ``sync`` (the clients), ``sender`` (buffered
sending), ``retry`` (when and how long to wait), ``batching`` (request sizes), ``types``
(values in and out), ``errors``.
"""

from loopmesh.client.aio import AsyncClient
from loopmesh.client.config import BatchPolicy, ClientConfig, RetryPolicy
from loopmesh.client.errors import (
    CallError,
    ClientClosedError,
    ClientError,
    DeadlineExceededError,
    DeliveryError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RejectedItemsError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from loopmesh.client.sender import Delivery, SenderStats
from loopmesh.client.sync import Client
from loopmesh.client.types import (
    BatchResult,
    Event,
    Feedback,
    FeedbackBatchResult,
    IngestResult,
    ItemOutcome,
    Prediction,
    StreamResult,
    SubmitResult,
)

__all__ = [
    "AsyncClient",
    "BatchPolicy",
    "BatchResult",
    "CallError",
    "Client",
    "ClientClosedError",
    "ClientConfig",
    "ClientError",
    "DeadlineExceededError",
    "Delivery",
    "DeliveryError",
    "Event",
    "FailedPreconditionError",
    "Feedback",
    "FeedbackBatchResult",
    "IngestResult",
    "InvalidArgumentError",
    "ItemOutcome",
    "NotFoundError",
    "PermissionDeniedError",
    "Prediction",
    "RejectedItemsError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SenderStats",
    "StreamResult",
    "SubmitResult",
    "UnauthenticatedError",
    "UnavailableError",
]
