"""The Cluster gRPC service every node serves, embedded or standalone: status, membership
changes, leader transfer and snapshots (``proto/dengine/v1/cluster.proto``).

Requests that only the leader can serve are answered FAILED_PRECONDITION with
``not leader; leader=<id>@<address>`` when they reach another node, like the KV service's writes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError, Message

from dengine.errors import DengineError, LeadershipTransferError, NotLeaderError
from dengine.raft.membership import ConfChangeError, check_address
from dengine.v1 import cluster_pb2, cluster_pb2_grpc

if TYPE_CHECKING:
    from dengine.node import Node

__all__ = ["ClusterService", "add_cluster_service", "decoding", "leader_details"]

log = logging.getLogger("dengine.server")


def decoding(
    handler: Callable[[Any, Any], Any], message: type[Message], method: str, node: Node, *, streaming: bool
) -> Callable[[bytes, Any], Any]:
    """``handler`` served on the request's raw bytes, which it decodes itself: bytes that are not
    a ``message`` are refused with INVALID_ARGUMENT, counted and logged. (The generated decoders
    raise inside gRPC, which answers UNKNOWN, "Unexpected DecodeError", and counts nothing.)
    ``streaming``: the handler is an async generator of responses (a server-streaming method)."""
    name = message.DESCRIPTOR.name

    async def refuse(context: Any) -> None:
        node.metrics.grpc_error(method, grpc.StatusCode.INVALID_ARGUMENT)
        log.warning("refused a %s call from %s: the request is not a valid %s", method, context.peer(), name)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name}")

    if streaming:

        async def stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
            try:
                request = message.FromString(raw)
            except DecodeError:
                await refuse(context)
                return
            async for response in handler(request, context):
                yield response

        return stream

    async def unary(raw: bytes, context: Any) -> Any:
        try:
            request = message.FromString(raw)
        except DecodeError:
            await refuse(context)
            raise AssertionError("unreachable") from None
        return await handler(request, context)

    return unary


def add_cluster_service(server: grpc.aio.Server, service: ClusterService) -> None:
    """Serves ``service`` as ``dengine.v1.Cluster``, like the generated
    ``add_ClusterServicer_to_server`` except that requests that do not decode are refused with
    INVALID_ARGUMENT (see :func:`decoding`)."""
    descriptor = cluster_pb2.DESCRIPTOR.services_by_name["Cluster"]
    handlers = {}
    for method in descriptor.methods:
        request = getattr(cluster_pb2, method.input_type.name)
        response = getattr(cluster_pb2, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            decoding(getattr(service, method.name), request, method.name, service.node, streaming=False),
            request_deserializer=None,
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)


def leader_hint(node: Node, leader: int | None) -> str:
    """``leader=<id>@<address>`` (``leader=0@`` when none is known): how a refusal names the
    leader, for clients to go there."""
    address = node.members.addresses.get(leader, "") if leader else ""
    return f"leader={leader or 0}@{address}"


def leader_details(node: Node, leader: int | None) -> str:
    """The FAILED_PRECONDITION text that points a client at the leader."""
    return f"not leader; {leader_hint(node, leader)}"


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    """Serves one node's Cluster RPCs."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def _abort(self, context: Any, method: str, code: grpc.StatusCode, details: str) -> None:
        """Ends the call with ``code``, counted in ``dengine_grpc_errors_total``."""
        self.node.metrics.grpc_error(method, code)
        await context.abort(code, details)

    async def Status(self, request: cluster_pb2.StatusRequest, context: Any) -> cluster_pb2.StatusResponse:
        s = self.node.status()
        members = self.node.members.addresses
        return cluster_pb2.StatusResponse(
            cluster_id=s.cluster_id,
            id=s.id,
            address=s.address,
            role=s.role,
            term=s.term,
            leader_id=s.leader or 0,
            leader_address=members.get(s.leader, "") if s.leader else "",
            commit_index=s.commit,
            applied_index=s.applied,
            first_index=s.first_index,
            last_index=s.last_index,
            voters=list(s.voters),
            learners=list(s.learners),
            snapshot_index=s.snapshot_index,
            peers=[
                cluster_pb2.PeerStatus(
                    id=p.id,
                    address=p.address,
                    match_index=p.match,
                    lag=p.lag,
                    inflight=p.inflight,
                    state=p.state,
                )
                for p in s.peers
            ],
        )

    async def _unimplemented(self, context: Any, what: str) -> Any:
        await self._abort(context, what, grpc.StatusCode.UNIMPLEMENTED, f"{what} is not available yet")

    async def _membership(
        self, change: Awaitable[None], context: Any, method: str
    ) -> cluster_pb2.MembershipResponse:
        try:
            await change
        except NotLeaderError as exc:
            details = leader_details(self.node, exc.leader)
            await self._abort(context, method, grpc.StatusCode.FAILED_PRECONDITION, details)
        except ValueError as exc:  # ConfChangeError: refused, with the reason
            await self._abort(context, method, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except DengineError as exc:
            await self._abort(context, method, grpc.StatusCode.UNAVAILABLE, str(exc))
        raft = self.node.raft
        assert raft is not None
        return cluster_pb2.MembershipResponse(
            voters=sorted(raft.conf.voters),
            learners=sorted(raft.learners),
            members=self.node.members.addresses,
        )

    async def AddLearner(
        self, request: cluster_pb2.AddLearnerRequest, context: Any
    ) -> cluster_pb2.MembershipResponse:
        if not request.id or not request.address:
            details = "a new member needs an id and an address"
            await self._abort(context, "AddLearner", grpc.StatusCode.INVALID_ARGUMENT, details)
        try:
            check_address(request.address)
        except ConfChangeError as exc:
            await self._abort(context, "AddLearner", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        change = self.node.add_learner(request.id, request.address)
        return await self._membership(change, context, "AddLearner")

    async def _require_id(self, context: Any, method: str, node_id: int) -> None:
        # A missing id is wrong whatever the cluster holds (INVALID_ARGUMENT); an id that names no
        # member depends on the membership, and is refused as the change's precondition.
        if not node_id:
            details = f"{method} needs the id of a member (ids start at 1)"
            await self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, details)

    async def Promote(
        self, request: cluster_pb2.PromoteRequest, context: Any
    ) -> cluster_pb2.MembershipResponse:
        await self._require_id(context, "Promote", request.id)
        return await self._membership(self.node.promote(request.id, force=request.force), context, "Promote")

    async def RemoveMember(
        self, request: cluster_pb2.RemoveMemberRequest, context: Any
    ) -> cluster_pb2.MembershipResponse:
        await self._require_id(context, "RemoveMember", request.id)
        return await self._membership(self.node.remove_member(request.id), context, "RemoveMember")

    async def Snapshot(
        self, request: cluster_pb2.SnapshotRequest, context: Any
    ) -> cluster_pb2.SnapshotResponse:
        try:
            snap = await self.node.snapshot()
        except DengineError as exc:
            details = f"snapshot failed: {exc}"
            await self._abort(context, "Snapshot", grpc.StatusCode.FAILED_PRECONDITION, details)
            raise
        if snap is None:
            details = "nothing has been applied yet"
            await self._abort(context, "Snapshot", grpc.StatusCode.FAILED_PRECONDITION, details)
            raise AssertionError("unreachable")
        return cluster_pb2.SnapshotResponse(index=snap.meta.index, term=snap.meta.term, bytes=snap.size)

    async def TransferLeader(
        self, request: cluster_pb2.TransferLeaderRequest, context: Any
    ) -> cluster_pb2.TransferLeaderResponse:
        try:
            target = await self.node.move_leader(request.id or None)
        except NotLeaderError as exc:
            details = leader_details(self.node, exc.leader)
            await self._abort(context, "TransferLeader", grpc.StatusCode.FAILED_PRECONDITION, details)
        except ValueError as exc:
            await self._abort(context, "TransferLeader", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LeadershipTransferError as exc:
            await self._abort(context, "TransferLeader", grpc.StatusCode.ABORTED, str(exc))
        return cluster_pb2.TransferLeaderResponse(leader_id=target)
