"""Pseudonymising entity ids at the door, so raw personal ids never reach Kafka.

An id is replaced by its keyed HMAC-SHA256 (hex). The mapping is deterministic for one key, so
every door that takes raw ids maps them with the same function and key, read from the same
``LOOPMESH_PRIVACY__*`` settings (``MeshSettings.privacy``): ingestion before events reach
Kafka, inference's ``Predict`` before the feature lookup and the prediction log, the features
service's ``DeleteEntity`` before the erasure. Internal calls between services
(``GetOnlineFeatures``) carry the pseudonym and are not mapped again.
Without the key the mapping cannot be reversed or recomputed; rotating the key severs all
history, which is the point of keeping it out of the repository.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import BaseModel, Field, SecretStr, model_validator

MIN_KEY_LENGTH = 32
"""Shortest key accepted: HMAC-SHA256 wants at least 256 bits of key material."""


class PrivacySettings(BaseModel):
    """How entity ids are protected (env ``LOOPMESH_PRIVACY__...``)."""

    pseudonymise_entity_ids: bool = False
    """Replace every incoming entity id by its keyed HMAC before it is written anywhere."""
    entity_id_key: SecretStr | None = Field(default=None)
    """HMAC key (at least 32 characters), from the environment or a secret store."""

    @model_validator(mode="after")
    def _key_when_enabled(self) -> PrivacySettings:
        if self.pseudonymise_entity_ids:
            key = self.entity_id_key.get_secret_value() if self.entity_id_key else ""
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"entity_id_key: pseudonymising needs a key of at least {MIN_KEY_LENGTH} "
                    "characters"
                )
        return self


def pseudonymise(entity_id: str, key: SecretStr) -> str:
    """The pseudonym of ``entity_id`` (trimmed first, as the event models trim ids)."""
    digest = hmac.new(
        key.get_secret_value().encode(), entity_id.strip().encode(), hashlib.sha256
    ).hexdigest()
    return digest


class EntityIdMapper:
    """Maps raw entity ids the way the settings say: pseudonyms when enabled, unchanged if not."""

    def __init__(self, settings: PrivacySettings) -> None:
        self.enabled = settings.pseudonymise_entity_ids
        self._key = settings.entity_id_key

    def __call__(self, entity_id: str) -> str:
        if not self.enabled or self._key is None:
            return entity_id
        return pseudonymise(entity_id, self._key)
