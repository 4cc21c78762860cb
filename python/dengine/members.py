"""Membership on a running node: the member addresses the transport uses, the operator's changes
(add a learner, promote it, remove a member, replace one), automatic promotion of learners that
caught up, and joining a running cluster.

The protocol side (one change at a time, in force once in the log) is
:mod:`dengine.raft.membership`; this module waits for changes to commit, keeps the peer transport
in step with the configuration, and applies the operator-facing rules (a learner far behind is
not promoted unless forced).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc

from dengine.errors import DengineError, LogCompactedError, NotLeaderError
from dengine.raft import Role
from dengine.raft.membership import ConfChangeError, ConfChangePendingError, ConfOp, check_replacement
from dengine.v1 import cluster_pb2, cluster_pb2_grpc

if TYPE_CHECKING:
    from dengine.node import Node

__all__ = ["MembershipManager"]

_LOST = "leadership changed and the membership change was lost; retry"

log = logging.getLogger("dengine.membership")
_LEADER_HINT = re.compile(r"leader=(\d+)@(\S+)")


class MembershipManager:
    """Owns one node's view of member addresses and its membership operations."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.config.membership
        self.base_addresses: dict[int, str] = dict(node.config.cluster.members)
        self.addresses: dict[int, str] = dict(self.base_addresses)
        self._seen_conf_id = (-1, -1)  # the configuration's (index, term) last adopted
        # Members that just left stay reachable for a while: a removed leader keeps managing the
        # cluster until its removal commits, and late messages still need an answer.
        self._departed: dict[int, tuple[str, float]] = {}
        self._caught_up_since: dict[int, float] = {}
        self._promoting: asyncio.Task[None] | None = None

    # --- keeping the transport in step --------------------------------------------------------

    def sync(self) -> None:
        """Called after each Ready: adopts the addresses of the configuration now in force."""
        raft, transport = self.node.raft, self.node.transport
        if raft is None or transport is None or raft.conf_id == self._seen_conf_id:
            return
        self._adopt_configuration()

    def restored(self, addresses: dict[int, str]) -> None:
        """An installed snapshot's members' addresses: those of the configuration it holds,
        which no entry names any more (the log starts after it). The configuration itself was
        adopted when the core took the snapshot, before these addresses were known, so members
        added in the part of the log it covers are only reachable from now on."""
        self.base_addresses = dict(addresses)
        if self.node.raft is not None and self.node.transport is not None:
            self._adopt_configuration(announce=False)  # the install announced the change

    def _adopt_configuration(self, *, announce: bool = True) -> None:
        raft = self.node.raft
        assert raft is not None
        first = self._seen_conf_id[0] < 0
        self._seen_conf_id = raft.conf_id
        cc = raft.conf_change
        members = raft.conf.voters | raft.learners
        known = dict(cc.addresses) if cc is not None else dict(self.base_addresses)
        if not members and first:
            return  # a joining node keeps the addresses it was given until it learns the cluster
        # Keep what we knew for members an entry did not name (an old cluster's config file).
        previous = self.addresses
        current = {m: known.get(m) or previous.get(m, "") for m in members}
        self.addresses = {m: a for m, a in current.items() if a}
        grace = time.monotonic() + 20 * self.node.config.raft.election_timeout_ms / 1000
        for m, address in previous.items():
            if m not in self.addresses:
                self._departed[m] = (address, grace)
        for m in self.addresses:
            self._departed.pop(m, None)
        self._update_transport()
        if self.node.id not in members and self.addresses:
            self.node.on_removed()
        if announce and not first:
            self.node.metrics.membership_change(cc.op.name.lower() if cc is not None else "restore")
            log.info(
                "node %d: configuration now voters %s, learners %s",
                self.node.id,
                sorted(raft.conf.voters),
                sorted(raft.learners),
                extra={
                    "node_id": self.node.id,
                    "term": raft.term,
                    "index": raft.conf_index,
                    "event": "membership",
                },
            )

    def _update_transport(self) -> None:
        transport = self.node.transport
        assert transport is not None
        peers = {m: a for m, (a, _) in self._departed.items()}
        peers.update(self.addresses)
        peers.pop(self.node.id, None)
        transport.set_peers(peers)

    def expire(self) -> None:
        """Stops talking to members that left long enough ago, and to nodes outside the
        configuration that this node answered (see ``PeerTransport._welcome``) once silent for
        ten election timeouts (a leader sends a heartbeat several times per election timeout)."""
        if self.node.transport is not None:
            self.node.transport.expire_guests(10 * self.node.config.raft.election_timeout_ms / 1000)
        now = time.monotonic()
        gone = [m for m, (_, until) in self._departed.items() if until <= now]
        if gone:
            for m in gone:
                del self._departed[m]
            self._update_transport()

    def addresses_at(self, index: int) -> dict[int, str]:
        """Member addresses of the configuration in force at ``index`` (for snapshots)."""
        raft = self.node.raft
        assert raft is not None
        cc = raft.conf_entry_at(index)
        voters, learners = raft.conf_at(index)
        known = dict(cc.addresses) if cc is not None else {**self.addresses, **self.base_addresses}
        return {m: known[m] for m in voters | learners if m in known}

    # --- operator changes ---------------------------------------------------------------------

    async def change(self, op: ConfOp, node_id: int, *, address: str = "", timeout: float = 10.0) -> None:
        """Proposes one change on the leader and waits until it is committed."""
        node = self.node
        raft, store = node.raft, node.store
        assert raft is not None and store is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                index = raft.propose_conf_change(
                    op, node_id, address=address, addresses=dict(self.addresses), nonce=secrets.randbits(63)
                )
                break
            except ConfChangePendingError:
                # The previous change (perhaps an automatic promotion) is about to commit.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(node.config.raft.tick_ms / 1000)
        term = raft.term
        node.pump()
        while raft.commit < index:
            if time.monotonic() > deadline:
                raise DengineError(
                    f"the membership change at log index {index} did not commit in {timeout:.0f} s"
                )
            if raft.term != term and (store.last_index() < index or store.term(index) != term):
                raise DengineError(_LOST)
            await asyncio.sleep(node.config.raft.tick_ms / 1000)
        if not self._committed_as_proposed(index, term, op, node_id):
            raise DengineError(_LOST)
        log.info(
            "node %d: %s of node %d committed at index %d",
            node.id,
            op.name.lower().replace("_", " "),
            node_id,
            index,
            extra={"node_id": node.id, "term": term, "index": index, "event": "membership"},
        )

    def _committed_as_proposed(self, index: int, term: int, op: ConfOp, node_id: int) -> bool:
        """Whether the entry committed at ``index`` is the change this leader proposed there in
        ``term``. A leader cut off after proposing it can hear, in one message between two
        polls, of a newer leader's entries committed over that index: the commit index alone
        would report a change that no node holds."""
        raft, store = self.node.raft, self.node.store
        assert raft is not None and store is not None
        try:
            return store.term(index) == term
        except LogCompactedError:
            # A snapshot covers it already: the change was made if its effect is in force.
            members = raft.conf.voters | raft.learners
            if op is ConfOp.ADD_LEARNER:
                return node_id in members
            if op is ConfOp.PROMOTE:
                return node_id in raft.conf.voters
            return op is ConfOp.REMOVE and node_id not in members

    def learner_lag(self, node_id: int) -> int | None:
        raft, store = self.node.raft, self.node.store
        assert raft is not None and store is not None
        pr = raft.progress.get(node_id) if raft.role is Role.LEADER else None
        return None if pr is None else max(0, store.last_index() - pr.match)

    async def promote(self, node_id: int, *, force: bool = False) -> None:
        raft = self.node.raft
        assert raft is not None
        if raft.role is not Role.LEADER:
            raise NotLeaderError(raft.lead)
        lag = self.learner_lag(node_id)
        if not force and node_id in raft.learners and (lag is None or lag > self.cfg.max_lag_entries):
            raise ConfChangeError(
                f"node {node_id} is {lag if lag is not None else 'an unknown number of'} entries behind "
                f"(membership.max_lag_entries = {self.cfg.max_lag_entries}); wait for it to catch up or force"
            )
        await self.change(ConfOp.PROMOTE, node_id)

    async def wait_caught_up(self, node_id: int, timeout: float) -> None:
        """Waits until learner ``node_id`` is caught up and answering: promoted while it does
        not answer (down, or slow to answer under load), it would be refused as unreachable."""
        raft = self.node.raft
        assert raft is not None
        deadline = time.monotonic() + timeout
        while True:
            lag = self.learner_lag(node_id)
            answering = raft.heard_from_recently(node_id)
            if lag is not None and lag <= self.cfg.max_lag_entries and answering:
                return
            if time.monotonic() > deadline:
                state = f"lag {lag}" if answering else f"lag {lag}, not answering"
                raise DengineError(f"node {node_id} did not catch up within {timeout:.0f} s ({state})")
            await asyncio.sleep(0.05)

    async def replace(self, old: int, new: int, address: str, *, timeout: float = 120.0) -> None:
        """Adds ``new`` as a learner, waits until it caught up, promotes it, removes ``old``: the
        cluster never has fewer healthy voters than before."""
        raft = self.node.raft
        assert raft is not None
        check_replacement(old, new, address, self.addresses)
        if old not in raft.conf.voters:
            raise ConfChangeError(f"node {old} is not a voter")
        if new not in raft.conf.voters | raft.learners:
            await self.change(ConfOp.ADD_LEARNER, new, address=address)
        if new in raft.learners:
            await self.wait_caught_up(new, timeout)
            try:
                await self.change(ConfOp.PROMOTE, new)
            except ConfChangeError:
                if new not in raft.conf.voters:
                    raise
                # Promoted meanwhile by the automatic promotion (it is caught up): done.
        await self.change(ConfOp.REMOVE, old)

    # --- automatic promotion ------------------------------------------------------------------

    def tick(self) -> None:
        """Called periodically on the leader: promotes learners that stayed caught up."""
        raft = self.node.raft
        if raft is None or raft.role is not Role.LEADER:
            self._caught_up_since.clear()
            return
        now = time.monotonic()
        self.node.metrics.keep_learners(raft.learners)
        for learner in sorted(raft.learners):
            lag = self.learner_lag(learner)
            if lag is not None:
                self.node.metrics.set_learner_lag(learner, lag)
            if lag is None or lag > self.cfg.max_lag_entries:
                self._caught_up_since.pop(learner, None)
                continue
            since = self._caught_up_since.setdefault(learner, now)
            due = (now - since) * 1000 >= self.cfg.caught_up_for_ms
            if self.cfg.promote == "auto" and due and (self._promoting is None or self._promoting.done()):
                self._promoting = asyncio.create_task(self._auto_promote(learner))

    def tasks(self) -> list[asyncio.Task[None]]:
        """Work of its own under way (an automatic promotion), for the node to end when it stops."""
        promoting = self._promoting
        return [promoting] if promoting is not None and not promoting.done() else []

    async def _auto_promote(self, learner: int) -> None:
        try:
            await self.promote(learner)
            # Counted once, as "promote", when the change applies (on every node alike).
            log.info(
                "node %d: promoted node %d automatically: it caught up",
                self.node.id,
                learner,
                extra={"node_id": self.node.id, "peer": learner, "event": "auto_promote"},
            )
        except (DengineError, ValueError) as exc:
            log.debug("node %d: automatic promotion of node %d deferred: %s", self.node.id, learner, exc)

    # --- joining ------------------------------------------------------------------------------

    async def join(
        self, address: str, advertise: str, *, credentials: grpc.ChannelCredentials | None
    ) -> None:
        """Asks the cluster at ``address`` (any member; refusals name the leader) to add this
        node as a learner, then learns every member's address from the answer."""
        node = self.node
        delay = 0.2
        target = address
        while True:
            try:
                members = await self._ask_to_join(target, advertise, credentials)
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                hint = _LEADER_HINT.search(details)
                if hint and hint.group(2):
                    target = hint.group(2)
                    continue
                if "already a member" in details:
                    log.info("node %d is already a member of the cluster", node.id)
                    return
                log.info("node %d: joining through %s: %s; retrying", node.id, target, details or exc.code())
                target = address
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.base_addresses = dict(members)
            self.addresses = dict(members)
            assert node.transport is not None
            node.transport.set_peers({m: a for m, a in members.items() if m != node.id})
            log.info("node %d joined the cluster as a learner (members %s)", node.id, sorted(members))
            return

    async def _ask_to_join(
        self, target: str, advertise: str, credentials: grpc.ChannelCredentials | None
    ) -> Mapping[int, str]:
        node = self.node
        channel = (
            grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        )
        async with channel:
            stub = cluster_pb2_grpc.ClusterStub(channel)  # type: ignore[no-untyped-call]
            reply = await stub.AddLearner(
                cluster_pb2.AddLearnerRequest(id=node.id, address=advertise), timeout=15
            )
        return dict(reply.members)
