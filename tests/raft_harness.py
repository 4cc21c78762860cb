"""A hand-cranked network of Raft cores for scenario tests: no clock, no randomness in delivery.

Messages are delivered in FIFO order when the test says so; syncs complete at once unless a node
is told to hold them. Filters drop or rewrite messages to stage the paper's situations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from dengine._core import Entry, HardState
from dengine.raft import Message, MsgType, Raft, RaftConfig, Ready, Role
from dengine.raft.payload import command
from dengine.testing.simstore import SimLogStore
from dengine.transport.codec import from_wire, to_wire

Filter = Callable[[Message], Message | None]

WIRE_CLUSTER_ID = "harness"


def through_the_wire(m: Message, members: Iterable[int]) -> Message:
    """``m`` as a peer receives it from the gRPC transport: encoded and decoded by the real codec,
    entries framed (an EntryBatch). Snapshots travel on their own stream and are left as they are."""
    if m.type is MsgType.SNAPSHOT:
        return m
    return from_wire(to_wire(m, WIRE_CLUSTER_ID), cluster_id=WIRE_CLUSTER_ID, me=m.dst, members=set(members))


def make_store(
    terms: Iterable[int] = (), *, term: int = 0, vote: int | None = None, commit: int = 0
) -> SimLogStore:
    """A durable store whose log has one entry per item of ``terms`` (payload: its index)."""
    store = SimLogStore()
    entries = [Entry(i, t, command(str(i).encode())) for i, t in enumerate(terms, start=1)]
    if entries:
        store.append(entries)
    store.save_hard_state(HardState(term, vote, commit))
    store.sync()
    return store


class Cluster:
    def __init__(
        self,
        n: int = 3,
        *,
        stores: dict[int, SimLogStore] | None = None,
        learners: Iterable[int] = (),
        **options: Any,
    ) -> None:
        learner_ids = frozenset(learners)
        voters = frozenset(range(1, n + 1)) - learner_ids
        # Scenarios elect at once in clusters built from stored logs (terms above zero): a test
        # of the restart lease turns it on.
        options.setdefault("restart_lease", False)
        self.options = options
        self.voters = voters
        self.learners = learner_ids
        self.stores = stores or {}
        self.nodes: dict[int, Raft] = {}
        for i in range(1, n + 1):
            self.stores.setdefault(i, make_store())
            self.start(i)
        self.queue: list[Message] = []
        self.filters: list[Filter] = []
        self.down: set[int] = set()
        self.held_syncs: dict[int, list[int]] = {}
        self.hold_sync: set[int] = set()
        self.no_apply: set[int] = set()
        self.applied: dict[int, list[Entry]] = {i: [] for i in self.nodes}
        self.reads: dict[int, list[tuple[int, int]]] = {i: [] for i in self.nodes}
        self.failed_reads: dict[int, list[int]] = {i: [] for i in self.nodes}
        self.snapshot_needed: dict[int, list[int]] = {i: [] for i in self.nodes}
        self.sent: list[Message] = []
        self.announce = True  # announce new commit indexes, as a runtime does soon after one
        if Cluster.wire:
            self.filters.append(lambda m: through_the_wire(m, self.nodes))

    wire = False
    """Whether every cluster delivers its messages through the wire codec (see ``wire`` fixtures)."""

    def start(self, i: int, **overrides: Any) -> Raft:
        options = {**self.options, **overrides}
        cfg = RaftConfig(id=i, voters=self.voters, learners=self.learners, **options)
        self.nodes[i] = Raft(cfg, self.stores[i], seed=i)
        return self.nodes[i]

    def add_node(self, i: int) -> Raft:
        """Starts an empty node that belongs to no configuration (it waits to be added)."""
        self.stores[i] = make_store()
        cfg = RaftConfig(id=i, voters=frozenset(), **self.options)
        self.nodes[i] = Raft(cfg, self.stores[i], seed=i)
        for table in (self.applied, self.reads, self.failed_reads, self.snapshot_needed):
            table.setdefault(i, [])
        return self.nodes[i]

    def crash_and_restart(self, i: int, **overrides: Any) -> Raft:
        self.stores[i].crash()
        self.held_syncs.pop(i, None)
        self.applied[i] = []
        return self.start(i, **overrides)

    # --- driving -----------------------------------------------------------------------------

    def process(self, i: int) -> Ready | None:
        raft = self.nodes[i]
        if self.announce and i not in self.down and raft.commit_unannounced:
            raft.announce_commit()
        if i in self.down or not raft.has_ready():
            return None
        rd = raft.ready()
        if rd.sync is not None:
            self.stores[i].begin_sync()
            if i in self.hold_sync:
                self.held_syncs.setdefault(i, []).append(rd.sync)
            else:
                raft.synced(rd.sync, self.stores[i].complete_sync())
        self.queue.extend(rd.messages)
        self.sent.extend(rd.messages)
        if rd.committed:
            self.applied[i].extend(rd.committed)
            if i not in self.no_apply:
                raft.applied_to(rd.committed[-1].index)
        self.reads[i].extend((r.context, r.index) for r in rd.reads)
        self.failed_reads[i].extend(rd.failed_reads)
        self.snapshot_needed[i].extend(rd.snapshot_needed)
        return rd

    def release_syncs(self, i: int) -> None:
        self.hold_sync.discard(i)
        for seq in self.held_syncs.pop(i, []):
            self.nodes[i].synced(seq, self.stores[i].complete_sync())

    def settle(self, max_rounds: int = 10_000) -> None:
        """Processes every node and delivers messages until nothing moves."""
        for _ in range(max_rounds):
            moved = False
            for i in sorted(self.nodes):
                while self.process(i):
                    moved = True
            if self.queue:
                moved = True
                queue, self.queue = self.queue, []
                for m in queue:
                    self.deliver(m)
            if not moved:
                return
        raise AssertionError("cluster did not settle")

    def deliver(self, m: Message) -> None:
        for f in self.filters:
            filtered = f(m)
            if filtered is None:
                return
            m = filtered
        if m.dst in self.down or m.src in self.down:
            return
        self.nodes[m.dst].step(m)

    def tick(self, i: int, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[i].tick()

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for i in sorted(self.nodes):
                if i not in self.down:
                    self.nodes[i].tick()
            self.settle()

    def campaign(self, i: int) -> None:
        """Makes node ``i`` time out now and lets the election play out."""
        raft = self.nodes[i]
        while raft.role is Role.FOLLOWER:
            raft.tick()
        self.settle()

    def elect(self, i: int) -> Raft:
        self.campaign(i)
        assert self.nodes[i].role is Role.LEADER, f"node {i} did not win: {self.nodes[i].role}"
        return self.nodes[i]

    def isolate(self, i: int) -> None:
        self.filters.append(lambda m: None if i in (m.src, m.dst) else m)

    def cut(self, a: set[int], b: set[int]) -> None:
        self.filters.append(
            lambda m: None if (m.src in a and m.dst in b) or (m.src in b and m.dst in a) else m
        )

    def heal(self) -> None:
        self.filters.clear()

    def drop_type(self, *types: MsgType) -> None:
        self.filters.append(lambda m: None if m.type in types else m)

    def hold_type(self, *types: MsgType) -> tuple[list[Message], Filter]:
        """Keeps back every message of ``types`` from now on: returns the list they gather in
        (deliver them later with ``queue.extend``) and the filter (remove it to stop holding)."""
        held: list[Message] = []

        def hold(m: Message) -> Message | None:
            if m.type in types:
                held.append(m)
                return None
            return m

        self.filters.append(hold)
        return held, hold

    def propose(self, i: int, *datas: bytes) -> tuple[int, int] | None:
        result = self.nodes[i].propose([command(d) for d in datas])
        self.settle()
        return result

    def log_terms(self, i: int) -> list[int]:
        s = self.stores[i]
        return [e.term for e in s.entries(s.first_index(), s.last_index() + 1)]

    def leaders(self) -> list[int]:
        return [i for i, r in self.nodes.items() if r.role is Role.LEADER and i not in self.down]
