"""Log compaction and InstallSnapshot in the protocol core (Raft §7, Figure 13).

The core never touches snapshot bytes: a leader whose log no longer holds what a follower lacks
asks its driver to send the latest snapshot (``Ready.snapshot_needed``); a follower's driver hands
a fully received snapshot to its core as a SNAPSHOT message, and the core decides whether to
install it (``Ready.restore``), reset its log and answer.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dengine._core import Entry
from dengine.raft import Message, MsgType, Raft, RaftConfig, SnapshotInfo
from dengine.raft.payload import command
from dengine.raft.progress import ProgressState
from dengine.testing.simstore import SimLogStore

from raft_harness import Cluster, make_store, through_the_wire


def lagging_cluster(compact_to: int, *, quiet_elections: bool = False) -> tuple[Cluster, int]:
    """Leader 1 wrote 10 entries while node 3 was down, then compacted its log to
    ``compact_to``. Returns the cluster and the leader's term."""
    # quiet_elections: no pre-vote or leader lease, so a test can elect another node at will.
    c = Cluster(3, pre_vote=not quiet_elections, check_quorum=not quiet_elections)
    leader = c.elect(1)
    c.down.add(3)
    for i in range(10):
        c.propose(1, b"w%d" % i)
    assert leader.commit == 11  # the no-op and ten writes
    c.stores[1].compact_prefix(compact_to)
    c.down.discard(3)
    return c, leader.term


def snapshot_message(c: Cluster, index: int, src: int = 1, dst: int = 3) -> Message:
    raft = c.nodes[src]
    info = SnapshotInfo(index, c.stores[src].term(index), frozenset(c.voters))
    return Message(MsgType.SNAPSHOT, src, dst, raft.term, snapshot=info)


def test_a_follower_behind_the_compaction_point_needs_a_snapshot_once() -> None:
    c, _ = lagging_cluster(compact_to=8)
    c.tick_all(3)  # heartbeats: node 3 answers, the leader probes it and finds its log compacted
    assert c.snapshot_needed[1] == [3]
    assert c.nodes[1].progress[3].state is ProgressState.SNAPSHOT
    c.tick_all(20)
    assert c.snapshot_needed[1] == [3], "a follower waiting for a snapshot is not asked again"
    assert not any(m.type is MsgType.APP and m.dst == 3 and m.entries for m in c.sent[-40:])


def test_installing_a_snapshot_resets_a_log_that_does_not_reach_it() -> None:
    c, term = lagging_cluster(compact_to=8)
    c.tick_all(3)
    c.deliver(snapshot_message(c, 8))
    rd = c.process(3)
    assert rd is not None and rd.restore is not None and rd.restore.index == 8
    follower = c.nodes[3]
    assert (c.stores[3].first_index(), c.stores[3].last_index()) == (9, 8)
    assert c.stores[3].term(8) == term
    assert follower.commit == 8
    assert [m.index for m in rd.messages if m.type is MsgType.APP_RESP] == [8]
    follower.applied_to(8)
    c.nodes[1].report_snapshot(3, 8, ok=True)
    c.settle()
    c.tick_all(2)
    assert c.stores[3].last_index() == 11 and follower.commit == 11
    # It applied the leader's no-op before going down; after that only what follows the snapshot.
    assert [e.index for e in c.applied[3]] == [1, 9, 10, 11]
    assert c.nodes[1].progress[3].state is ProgressState.REPLICATE
    c.propose(1, b"after")
    assert c.nodes[1].progress[3].match == 12


def test_a_snapshot_the_log_already_holds_only_advances_the_commit_index() -> None:
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"a", b"b", b"c")
    follower = c.nodes[3]
    follower.commit = 1  # it holds the entries but has not heard that they committed
    c.deliver(snapshot_message(c, 4))
    rd = c.process(3)
    assert rd is not None and rd.restore is None, "the log already covers it: no state machine restore"
    assert c.stores[3].first_index() == 1, "nothing was reset"
    assert follower.commit == 4
    assert [m.index for m in rd.messages if m.type is MsgType.APP_RESP] == [4]


def test_a_snapshot_at_or_below_the_commit_index_changes_nothing() -> None:
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"a", b"b")
    before = (c.stores[3].first_index(), c.stores[3].last_index(), c.nodes[3].commit)
    c.deliver(snapshot_message(c, 2))
    rd = c.process(3)
    assert rd is not None and rd.restore is None
    assert (c.stores[3].first_index(), c.stores[3].last_index(), c.nodes[3].commit) == before
    assert [m.index for m in rd.messages if m.type is MsgType.APP_RESP] == [3], "acked at its commit"


def test_a_snapshot_from_a_deposed_leader_is_not_installed() -> None:
    c, _ = lagging_cluster(compact_to=8, quiet_elections=True)
    stale = snapshot_message(c, 8)
    c.elect(2)  # node 3 learns of the newer term
    assert c.nodes[3].term > stale.term
    first = c.stores[3].first_index()
    c.deliver(stale)
    rd = c.process(3)
    assert rd is None or rd.restore is None
    assert c.stores[3].first_index() == first


def test_a_failed_transfer_is_retried_after_the_next_heartbeat() -> None:
    c, _ = lagging_cluster(compact_to=8)
    c.tick_all(3)
    assert c.snapshot_needed[1] == [3]
    c.nodes[1].report_snapshot(3, 8, ok=False)
    c.settle()
    assert c.snapshot_needed[1] == [3], "not retried at once"
    c.tick_all(3)
    assert c.snapshot_needed[1] == [3, 3], "retried once the follower answered a heartbeat"


def test_a_report_from_a_former_leader_is_ignored() -> None:
    c, _ = lagging_cluster(compact_to=8, quiet_elections=True)
    c.tick_all(3)
    c.elect(2)
    c.nodes[1].report_snapshot(3, 8, ok=True)  # must not raise or revive old progress
    assert c.nodes[1].progress == {}


def test_a_core_restarts_from_a_snapshot_and_its_membership() -> None:
    store = make_store()
    store.reset(50, 3)
    info = SnapshotInfo(50, 3, frozenset({1, 2, 3}), frozenset({4}))
    raft = Raft(RaftConfig(id=1, voters=frozenset({1, 2, 3})), store, snapshot=info)
    assert (raft.applied, raft.commit) == (50, 50)
    assert raft.learners == frozenset({4})
    ready = raft.ready()
    assert not ready.committed, "nothing before the snapshot is applied again"


def test_a_log_that_does_not_continue_the_snapshot_is_refused_at_start() -> None:
    store = make_store([1, 1, 1])
    info = SnapshotInfo(50, 3, frozenset({1, 2, 3}))
    with pytest.raises(ValueError, match="does not continue the snapshot"):
        Raft(RaftConfig(id=1, voters=frozenset({1, 2, 3})), store, snapshot=info)


def test_a_cluster_restored_from_a_backup_snapshot_continues_in_a_later_term() -> None:
    # Every node starts with an empty data directory holding only a snapshot of term 5 (a backup
    # restored): the saved term is 0, but terms never go back, so the first election is for a
    # term after 5 and the new leader's no-op continues the log.
    voters = frozenset({1, 2, 3})
    stores = {i: make_store() for i in voters}
    for store in stores.values():
        store.reset(10, 5)
    c = Cluster(3, stores=stores)
    for i in voters:
        cfg = RaftConfig(id=i, voters=voters, restart_lease=False)  # elected at once below
        c.nodes[i] = Raft(cfg, stores[i], seed=i, snapshot=SnapshotInfo(10, 5, voters))
    assert all(c.nodes[i].term == 5 and c.nodes[i].vote is None for i in voters)
    leader = c.elect(1)
    assert leader.term > 5
    assert c.stores[1].term(11) == leader.term and leader.commit == 11


def one_follower(store: SimLogStore) -> tuple[Raft, Callable[[Message], tuple[list[Entry], bool]]]:
    """Node 3 of {1, 2, 3} on ``store``, and a function that steps a message to it as the gRPC
    transport delivers them (entries framed) and runs its Ready to the end, syncs included:
    it gives the committed entries handed out and whether a snapshot is to be restored."""
    raft = Raft(RaftConfig(id=3, voters=frozenset({1, 2, 3})), store)

    def run(m: Message) -> tuple[list[Entry], bool]:
        raft.step(through_the_wire(m, {1, 2, 3}))
        committed: list[Entry] = []
        restore = False
        while raft.has_ready():
            rd = raft.ready()
            committed += rd.committed
            restore = restore or rd.restore is not None
            if rd.sync is not None:
                store.begin_sync()
                raft.synced(rd.sync, store.complete_sync())
        return committed, restore

    return raft, run


def entries_of(term: int, first: int, last: int) -> list[Entry]:
    return [Entry(i, term, command(b"term %d entry %d" % (term, i))) for i in range(first, last + 1)]


def test_batches_kept_from_a_log_a_snapshot_replaced_are_never_applied() -> None:
    """A node keeps the batches it appended, to apply them once committed without reading its
    log back. Node 3 holds five entries of term 1 (one committed) when the leader of term 2,
    whose log diverged from index 2, sends a snapshot at 3: the log is reset, and entries 4 and
    5 that follow must be term 2's, not the term-1 ones it kept."""
    store = make_store()
    raft, run = one_follower(store)
    applied, _ = run(Message(MsgType.APP, 1, 3, 1, entries=entries_of(1, 1, 5), commit=1))
    raft.applied_to(1)
    _, restore = run(Message(MsgType.SNAPSHOT, 2, 3, 2, snapshot=SnapshotInfo(3, 2, frozenset({1, 2, 3}))))
    assert restore and store.last_index() == 3
    raft.applied_to(3)
    applied += run(Message(MsgType.APP, 2, 3, 2, index=3, log_term=2, entries=entries_of(2, 4, 5), commit=5))[
        0
    ]
    assert [(e.index, e.term, e.data) for e in applied] == [
        (e.index, e.term, e.data) for e in entries_of(1, 1, 1) + entries_of(2, 4, 5)
    ]


def test_batches_kept_past_a_conflict_are_dropped_with_the_entries_it_truncates() -> None:
    """Figure 7 (f): a follower's uncommitted entries of an old term are overwritten; what it
    applies at those indexes afterwards is the new leader's."""
    raft, run = one_follower(make_store())
    applied, _ = run(Message(MsgType.APP, 1, 3, 1, entries=entries_of(1, 1, 4), commit=2))
    raft.applied_to(2)
    applied += run(Message(MsgType.APP, 2, 3, 2, index=2, log_term=1, entries=entries_of(2, 3, 5), commit=5))[
        0
    ]
    assert [(e.index, e.term, e.data) for e in applied] == [
        (e.index, e.term, e.data) for e in entries_of(1, 1, 2) + entries_of(2, 3, 5)
    ]
