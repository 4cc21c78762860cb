"""The cluster operations of :class:`dengine.Client`: membership, leadership, the members list.

What ``dengine member ...`` and ``dengine leader transfer`` do, for programs: each call goes to
the leader (found and followed as the KV calls do), is retried across leader changes and nodes
that cannot be reached within the call's deadline, and answers with typed results or the
``dengine.errors`` exceptions. A change the cluster refuses (a node that is not a member, the
last voter, a learner far behind) raises :class:`~dengine.errors.RequestFailed` at once.

Retrying a membership change is safe: when an attempt's outcome is unknown (the leader did not
answer in time, or went away) and a later attempt is refused because the change is already in
force, the call succeeds; it is the earlier attempt that did it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from dengine.batch_stream import NOT_CONNECTED
from dengine.endpoints import retry_delay
from dengine.errors import (
    DeadlineExceeded,
    OutcomeUnknownAtDeadline,
    RequestFailed,
    Unavailable,
)
from dengine.raft.membership import ConfChangeError, check_replacement
from dengine.v1 import cluster_pb2, cluster_pb2_grpc

if TYPE_CHECKING:
    from dengine.endpoints import Endpoints

__all__ = ["ClusterAdmin", "Membership", "membership_of"]


# The refusal that says a change is already in force, per method.
_ALREADY_DONE = {
    "AddLearner": "is already a member",
    "Promote": "is already a voter",
    "RemoveMember": "is not a member",
}
# Failures after which an attempt may or may not have taken effect.
_UNCERTAIN = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}


@dataclass(frozen=True, slots=True)
class Membership:
    """The cluster's configuration: its voters, its learners and every member's address."""

    voters: tuple[int, ...]
    learners: tuple[int, ...]
    addresses: Mapping[int, str]


def membership_of(status: cluster_pb2.StatusResponse) -> Membership:
    """The membership a node's Status answer shows (only a leader's has every address)."""
    addresses = {status.id: status.address, **{p.id: p.address for p in status.peers}}
    return Membership(tuple(sorted(status.voters)), tuple(sorted(status.learners)), addresses)


class ClusterAdmin:
    """Cluster operations through the leader; mixed into :class:`dengine.Client`."""

    timeout: float
    attempt_timeout: float
    _endpoints: Endpoints

    def _channel(self, address: str) -> grpc.aio.Channel:
        raise NotImplementedError

    def _call_failed(self, address: str, code: str, details: str) -> None:
        raise NotImplementedError

    def _follow(self, address: str) -> None:
        raise NotImplementedError

    async def _wait_to_retry(self, address: str, attempts: int) -> None:
        """The pause before retry number ``attempts`` of a call that failed at ``address``: none
        when that node failed outright and another may serve (see :mod:`dengine.endpoints`)."""
        if not self._endpoints.go_elsewhere_now(address):
            await asyncio.sleep(retry_delay(attempts))

    async def members(self, *, timeout: float | None = None) -> Membership:
        """The voters, learners and member addresses, as the leader knows them."""
        deadline = time.monotonic() + (timeout or self.timeout)
        attempts = 0
        while True:
            s: cluster_pb2.StatusResponse = await self._call_leader(
                "Status", cluster_pb2.StatusRequest(), deadline - time.monotonic()
            )
            if s.role == "leader":
                return membership_of(s)
            if s.leader_address:
                self._follow(s.leader_address)
            else:
                self._endpoints.leader = None  # no leader known there: ask another node
            if time.monotonic() >= deadline:
                raise Unavailable("no node knew a leader to ask for the members")
            attempts += 1
            await asyncio.sleep(retry_delay(attempts))

    async def add_learner(self, node_id: int, address: str, *, timeout: float | None = None) -> Membership:
        """Adds node ``node_id``, listening at ``address``, as a learner: it receives the log but
        does not vote. Returns once the change is committed. Start the node with
        ``dengine serve --join`` (or as a member of an existing cluster) to have it catch up."""
        request = cluster_pb2.AddLearnerRequest(id=node_id, address=address)
        return await self._change("AddLearner", request, timeout)

    async def promote(self, node_id: int, *, force: bool = False, timeout: float | None = None) -> Membership:
        """Makes learner ``node_id`` a voter; refused while it lags far behind unless ``force``."""
        return await self._change("Promote", cluster_pb2.PromoteRequest(id=node_id, force=force), timeout)

    async def remove_member(self, node_id: int, *, timeout: float | None = None) -> Membership:
        """Removes voter or learner ``node_id`` (the leader too: it hands leadership over)."""
        return await self._change("RemoveMember", cluster_pb2.RemoveMemberRequest(id=node_id), timeout)

    async def replace_member(
        self,
        old: int,
        new: int,
        address: str,
        *,
        timeout: float = 120.0,
        progress: Callable[[str], None] | None = None,
    ) -> Membership:
        """Replaces voter ``old`` by node ``new`` listening at ``address``, never with fewer
        voters than before: adds ``new`` as a learner, waits until it has caught up (start it
        meanwhile, with ``dengine serve --join``), promotes it (unless the leader already did),
        then removes ``old``. Every step is skipped when already done, so a call that failed
        half-way can be made again. ``progress`` hears what is being waited for."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.05, deadline - time.monotonic())

        m = await self.members(timeout=left())
        try:
            check_replacement(old, new, address, m.addresses)
        except ConfChangeError as exc:
            raise RequestFailed("INVALID_ARGUMENT", str(exc)) from None
        if old not in m.voters:
            if new in m.voters and old not in m.learners:
                return m  # done by an earlier call
            raise RequestFailed("FAILED_PRECONDITION", f"node {old} is not a voter")
        if new not in m.voters and new not in m.learners:
            m = await self.add_learner(new, address, timeout=left())
        while new not in m.voters:
            try:
                m = await self.promote(new, timeout=left())
            except RequestFailed as exc:
                # Behind (not caught up yet), or promoted meanwhile by the leader itself.
                if "behind" not in str(exc) and _ALREADY_DONE["Promote"] not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(f"node {new} did not catch up in {timeout:g} s: {exc}") from exc
                if progress is not None and "behind" in str(exc):
                    progress(f"waiting for node {new} at {address} to catch up ({exc})")
                await asyncio.sleep(0.5)
                m = await self.members(timeout=left())
        return await self.remove_member(old, timeout=left())

    async def transfer_leader(self, to: int | None = None, *, timeout: float | None = None) -> int:
        """Hands leadership to node ``to`` (default: the most up-to-date voter) and returns the
        id of the node that leads once it is done. A target that cannot take over (down, or too
        far behind) raises :class:`~dengine.errors.RequestFailed` with code ``ABORTED``."""
        reply = await self._call_leader(
            "TransferLeader", cluster_pb2.TransferLeaderRequest(id=to or 0), timeout or self.timeout
        )
        self._endpoints.leader = None  # found again at the next call, from the new leader's hint
        leader: int = reply.leader_id
        return leader

    async def _change(self, method: str, request: Any, timeout: float | None) -> Membership:
        deadline = time.monotonic() + (timeout or self.timeout)
        reply = await self._call_leader(method, request, deadline - time.monotonic())
        if reply is None:  # already in force: an earlier attempt made it
            return await self.members(timeout=max(0.05, deadline - time.monotonic()))
        return Membership(tuple(sorted(reply.voters)), tuple(sorted(reply.learners)), dict(reply.members))

    async def _call_leader(self, method: str, request: Any, timeout: float) -> Any:
        """Calls ``method`` of the Cluster service on the leader, retrying what can be retried
        within ``timeout`` seconds. None: a membership change found already in force after an
        attempt whose outcome is unknown."""
        deadline = time.monotonic() + timeout
        attempts = 0
        uncertain = False
        while True:
            # Any node, the leader too, may be frozen or cut off: it gets one attempt's time, not
            # the whole deadline (a change whose attempt timed out is found in force by a retry).
            address = self._endpoints.pick()
            wait = min(deadline - time.monotonic(), self.attempt_timeout)
            stub = cluster_pb2_grpc.ClusterStub(self._channel(address))  # type: ignore[no-untyped-call]
            try:
                answer = await getattr(stub, method)(request, timeout=max(0.05, wait))
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details() or ""
                self._call_failed(address, code, details)  # follows a refusal's leader hint
                if code in _UNCERTAIN:
                    # A call that never connected cannot have made the change.
                    uncertain = uncertain or not details.startswith(NOT_CONNECTED)
                elif code == "FAILED_PRECONDITION" and details.startswith("not leader"):
                    pass  # refused before anything was proposed: on to the leader it names
                elif uncertain and _ALREADY_DONE.get(method, "\0") in details:
                    return None
                else:
                    raise RequestFailed(code, details) from exc
                if time.monotonic() >= deadline:
                    last = f"{method}: the deadline passed (last: {code} {details})"
                    if uncertain and method != "Status":
                        raise OutcomeUnknownAtDeadline(f"{last}; the change may have been made") from exc
                    if code == "DEADLINE_EXCEEDED":
                        raise DeadlineExceeded(last) from exc
                    raise Unavailable(f"no leader could serve {method}: {code} {details}") from exc
            else:
                self._endpoints.answered(address)
                return answer
            attempts += 1
            await self._wait_to_retry(address, attempts)
