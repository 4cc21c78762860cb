"""A stand-in for a leading node, for testing the KV service's write groups without a cluster."""

from __future__ import annotations

from types import SimpleNamespace

from dengine.proposals import WriteGroup


class LeaderStandIn:
    """The part of a leading node the KV service's write groups use. Every group it is handed is
    kept in ``groups`` and answered only when the test answers it."""

    def __init__(self) -> None:
        self.id = 1
        self.raft = SimpleNamespace(lead=1)
        self.members = SimpleNamespace(addresses={1: "h:1"})
        self.metrics = SimpleNamespace(grpc_error=lambda method, code, n=1: None)
        self.groups: list[WriteGroup] = []

    def submit_group(self, keys: list[tuple[int, int]], payloads: list[bytes]) -> WriteGroup:
        self.groups.append(WriteGroup(len(keys)))
        return self.groups[-1]

    def forget_group(self, keys: list[tuple[int, int]], group: WriteGroup) -> None:
        pass
