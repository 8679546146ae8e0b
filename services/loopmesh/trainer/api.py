"""Validated requests of the trainer, whatever door they come through (gRPC, CLI, tests).

Errors name the field at fault: ``InvalidArgument("reason", ...)`` reads
``reason: at most 256 characters``, which the gRPC adapter returns as INVALID_ARGUMENT.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from loopmesh.mesh import model_repo
from loopmesh.mesh.errors import InvalidArgument, UnknownModel
from loopmesh.mesh.events import Category, Finite, Identifier, Task

MAX_EXAMPLES = 10_000
"""Examples in one AddExamples request."""

R = TypeVar("R", bound=BaseModel)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TriggerRequest(_Request):
    model_name: str = ""
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=256)] = ""
    wait: bool = False


class ListRunsRequest(_Request):
    limit: int = Field(default=0, ge=0, le=1000)


class ListVersionsRequest(_Request):
    model_name: str = ""


class ExampleIn(_Request):
    example_id: Identifier
    entity_id: Identifier
    features: dict[Identifier, Finite] = Field(default_factory=dict, max_length=1024)
    categorical: dict[Identifier, Category] = Field(default_factory=dict, max_length=256)
    target: Finite
    event_time: datetime | None = None


class AddExamplesRequest(_Request):
    model_name: str = ""
    examples: list[ExampleIn] = Field(min_length=1, max_length=MAX_EXAMPLES)


def check_target(task: Task, classes: int | None, target: float, field: str) -> None:
    """InvalidArgument unless ``target`` is one the task learns."""
    if task == "binary" and target not in (0.0, 1.0):
        raise InvalidArgument(field, f"a binary model's target is 0 or 1, not {target:g}")
    if task == "multiclass" and not (target == int(target) and 0 <= target < (classes or 0)):
        raise InvalidArgument(field, f"a class index in [0, {classes}), not {target:g}")


def parse(model: type[R], **fields: object) -> R:
    """Validate ``fields`` as ``model``; InvalidArgument naming the first field at fault."""
    try:
        return model.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ""
        for part in first["loc"]:  # examples[0].features.price, as the other doors name them
            where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
        raise InvalidArgument(where or "request", first["msg"]) from None


def check_model(requested: str, trained: str) -> str:
    """The model a request is about: empty means the trainer's own."""
    if not requested:
        return trained
    try:
        model_repo.validate_model_name(requested)
    except ValueError as exc:
        raise InvalidArgument("model_name", str(exc)) from None
    if requested != trained:
        raise UnknownModel("model_name", f"this trainer trains {trained!r}, not {requested!r}")
    return requested
