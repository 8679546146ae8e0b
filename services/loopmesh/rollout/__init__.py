"""Rollout controller: metric-gated canary rollouts with automatic promotion and rollback.

Consumes ``models.published`` and ``metrics.live``, loads versions into Triton, and writes
every change to the compacted ``rollouts`` topic the inference gateway routes by. Pure logic
lives in ``policy``, ``analysis``, ``machine`` and ``metrics``; ``core`` drives it; ``agents``
(Kafka), ``triton`` (model loading) and ``server`` (gRPC ``loopmesh.v1.RolloutService``) are
adapters; ``leader`` lets one replica act at a time; ``cli`` is ``loopmesh rollout ...``.
"""
