"""Leadership among rollout controllers: one acts, the others wait as standbys.

The fence is a Kafka consumer group, ``<consumer_group>-leader``, on a one-partition topic that
carries no messages: the member assigned the partition leads. A transactional producer with a
fixed ``transactional.id`` was the other candidate; it fences only Kafka writes (a deposed
controller could still load and unload Triton versions), and a newer instance deposes the
running one instead of waiting behind it as a standby.

A leader acts only while it holds the partition and its lease is fresh: ``check`` raises
``NotLeader`` otherwise, and the publisher and the Triton loader call it right before every
send, load and unload.

- Revocation closes the gate at once, then stops the term (decision loop, consumers, Triton
  client) before the callback returns. aiokafka rebalances with the eager protocol: the group
  completes no assignment before every member has rejoined or been dropped, and a member
  rejoins only after its callback returned, so a new leader is assigned after the old one
  stopped (a stop that outlasts the session would get it dropped: it is bounded, and the
  process exits if it overruns).
- The lease covers a leader that hears of nothing (paused, cut off from Kafka): every heartbeat
  interval it commits offset 0 of the partition under its member id and generation, which the
  broker accepts only from the current holder. The lease runs ``session - heartbeat`` from the
  send of the last accepted commit: the broker cannot drop the member, and so cannot give the
  partition to anyone else, sooner.

A load or send already under way when the leadership goes is not recalled: Triton finishes a
load it received (the next leader's reconcile corrects the loaded set) and Kafka appends a
record it received.

Takeover: a leader that leaves (SIGTERM) is replaced within a standby's next heartbeat; one
that dies silently (SIGKILL) after the session timeout plus a heartbeat. The new leader then
re-reads its state from the topics, as a restart does (``app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from loopmesh.mesh.bus import group_options
from loopmesh.mesh.settings import KafkaSettings
from loopmesh.mesh.topics import Topic
from loopmesh.rollout.core import NotLeader
from loopmesh.rollout.settings import LeaderSettings

log = logging.getLogger(__name__)
_HOLDING = b"holding"


class KeepLeaderAssignor:
    """Every partition to one member: the one that held them in the last generation when it is
    still in the group (a standby joining or leaving leaves the leadership where it is), else
    the first member by id. One instance per consumer: it remembers that consumer's holding."""

    name = "loopmesh-leader"
    version = 0

    def __init__(self) -> None:
        self.holding = False

    def metadata(self, topics: Iterable[str]) -> Any:
        claim = _HOLDING if self.holding else b""
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), claim)

    def assign(self, cluster: Any, members: Mapping[str, Any]) -> dict[str, Any]:
        ids = sorted(members)
        # Two claims only after a leader was dropped without noticing; either is safe.
        holders = [m for m in ids if members[m].user_data == _HOLDING]
        chosen = (holders or ids)[0]
        topics = sorted({t for m in members.values() for t in m.subscription})
        out: dict[str, Any] = {}
        for member in ids:
            # A topic without metadata yet still has partition 0: the leader topic has one.
            assigned = (
                [(t, sorted(cluster.partitions_for_topic(t) or {0})) for t in topics]
                if member == chosen
                else []
            )
            out[member] = ConsumerProtocolMemberAssignment(self.version, assigned, b"")
        return out

    def on_assignment(self, assignment: Any) -> None:
        self.holding = bool(assignment.partitions())


class Leadership(ConsumerRebalanceListener):  # type: ignore[misc]
    """This controller's membership of the leader group, and the gate its effects pass.

    ``elected`` is started as a task when the leadership is gained (state re-read, loops
    started); ``deposed`` is awaited when it is lost, after that task was cancelled, and must
    stop every part that acts. ``check()`` raises ``NotLeader`` unless this process leads now.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: Topic,
        group_id: str,
        settings: LeaderSettings,
        *,
        service: str,
        elected: Callable[[], Coroutine[Any, Any, None]],
        deposed: Callable[[], Awaitable[None]],
        failed: asyncio.Event,
    ) -> None:
        self.group_id = group_id
        self._topic = topic
        self._session = settings.session_timeout_seconds
        self._interval = settings.heartbeat_interval_seconds
        self._assignor = KeepLeaderAssignor()
        options = group_options(kafka, service, group_id)
        options.update(
            session_timeout_ms=int(self._session * 1000),
            heartbeat_interval_ms=int(self._interval * 1000),
            rebalance_timeout_ms=int(self._session * 1000),
            partition_assignment_strategy=(self._assignor,),
        )
        self._consumer = AIOKafkaConsumer(**options)
        self._elected = elected
        self._deposed = deposed
        self._held: frozenset[TopicPartition] = frozenset()
        self._generation = 0
        """Counts assignments and revocations: a renewal that spans one renews nothing."""
        self._lease_until = 0.0
        self._acting = False
        self._starting: asyncio.Task[None] | None = None
        self._closing = False
        self.decided = asyncio.Event()
        """Set at the first assignment, whichever role it gave."""
        self._failed = failed
        """Set when acting could not be stopped in time: the process must exit."""

    # -- the gate -------------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this process may act now: it holds the partition under a fresh lease."""
        return bool(self._held) and time.monotonic() < self._lease_until

    def check(self) -> None:
        """Raise ``NotLeader`` unless this controller leads now."""
        if not self._acting or not self.leading:
            raise NotLeader(f"this rollout controller does not lead ({self.group_id})")

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        log.info("rollout: joining leader group %s on %s", self.group_id, self._topic.name)
        self._consumer.subscribe([self._topic.name], listener=self)
        await self._consumer.start()

    async def run(self) -> None:
        """Poll (the group drops a member that stops polling) and renew the lease."""
        while not self._closing:
            # Nothing is ever written to the topic: this returns after the interval.
            await self._consumer.getmany(timeout_ms=int(self._interval * 1000))
            if self._held:
                await self._renew()
            if self._acting and not self.leading:
                await self._depose_in_time("the lease expired: the group accepted no commit")
            elif not self._acting and self.leading:
                self._elect()  # the lease is back within the same generation

    async def stop(self) -> None:
        """Stop acting, then leave the group: a standby is assigned within its next heartbeat."""
        self._closing = True
        self._held = frozenset()
        await self._depose("stopping")
        await self._consumer.stop()

    # -- rebalance callbacks (aiokafka's coordination task awaits them) -----------------------

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self._held = frozenset()  # the gate shuts before anything is awaited
        self._generation += 1
        if time.monotonic() >= self._lease_until:
            # Dropped without noticing: a standby may lead by now, so claim nothing.
            self._assignor.holding = False
        await self._depose_in_time("the group rebalances")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        held = frozenset(tp for tp in assigned if tp.topic == self._topic.name)
        self._generation += 1
        if held and not self._closing:
            self._held = held
            # The assignment is the group's word: the broker counts this member's session
            # from its join request, sent before now; the margin covers the round trip.
            self._lease_until = time.monotonic() + self._session - self._interval
            self._elect()
        elif not self._acting:
            log.info("rollout: standby in leader group %s: another controller leads", self.group_id)
        self.decided.set()

    # -- transitions ----------------------------------------------------------------------------

    def _elect(self) -> None:
        if self._acting or self._closing:
            return
        self._acting = True
        log.info(
            "rollout: leading (group %s, %s): re-reading state, then acting",
            self.group_id,
            sorted(f"{tp.topic}[{tp.partition}]" for tp in self._held),
        )
        # Not awaited here: aiokafka starts heartbeats only after this callback returns.
        self._starting = asyncio.create_task(self._elected(), name="rollout-take-over")

    async def _depose(self, reason: str) -> None:
        if not self._acting:
            return
        self._acting = False
        log.warning("rollout: leadership lost (%s): stopping, no more changes", reason)
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await self._deposed()
        log.info("rollout: stopped acting; standby in leader group %s", self.group_id)

    async def _depose_in_time(self, reason: str) -> None:
        # Within the rebalance timeout (the session), or the group drops this member and may
        # assign a new leader while this one is still stopping.
        budget = max(self._session - 2 * self._interval, self._interval)
        try:
            await asyncio.wait_for(self._depose(reason), budget)
        except TimeoutError:
            log.error("rollout: stopping took over %.1fs; exiting to be sure", budget)
            self._failed.set()

    async def _renew(self) -> None:
        held, generation = self._held, self._generation
        sent = time.monotonic()
        try:
            await asyncio.wait_for(
                self._consumer.commit({tp: 0 for tp in held}), self._session - self._interval
            )
        except (CommitFailedError, IllegalStateError) as exc:
            # The group moved on (new generation, member dropped): aiokafka rejoins by itself.
            if self._generation == generation:
                self._held = frozenset()
                self._generation += 1
                self._assignor.holding = False
                await self._depose_in_time(f"the group refused the lease: {exc}")
            return
        except (KafkaError, TimeoutError) as exc:
            log.warning("rollout: renewing the leader lease failed: %r", exc)
            return
        if self._generation == generation:  # no rebalance meanwhile
            self._lease_until = max(self._lease_until, sent + self._session - self._interval)
