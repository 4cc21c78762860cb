"""Log replication and commitment (Raft §5.3, §5.4.2, Figures 7 and 8)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dengine._core import Entry, EntryBatch
from dengine.raft import Message, MsgType, Role
from dengine.raft.membership import ConfOp
from dengine.raft.payload import command
from dengine.raft.progress import ProgressState

from raft_harness import Cluster, make_store

FIGURE_7_LEADER = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FIGURE_7_FOLLOWERS = {
    "a": [1, 1, 1, 4, 4, 5, 5, 6, 6],
    "b": [1, 1, 1, 4],
    "c": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    "d": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    "e": [1, 1, 1, 4, 4, 4, 4],
    "f": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
}


pytestmark = pytest.mark.usefixtures("both_deliveries")


def test_figure_7_the_leader_repairs_every_divergent_follower() -> None:
    stores = {1: make_store(FIGURE_7_LEADER, term=7)}
    for i, terms in enumerate(FIGURE_7_FOLLOWERS.values(), start=2):
        stores[i] = make_store(terms, term=7)
    c = Cluster(7, stores=stores, pre_vote=False)
    leader = c.elect(1)
    assert leader.term == 8
    c.propose(1, b"after")
    expected = [*FIGURE_7_LEADER, 8, 8]
    for i in c.nodes:
        assert c.log_terms(i) == expected, f"follower {i} not repaired"
    assert all(r.commit == 12 for r in c.nodes.values())


def test_fast_backtracking_skips_a_whole_term_per_round_trip() -> None:
    # Follower f of Figure 7: eight uncommitted entries of terms 2 and 3 to throw away.
    stores = {1: make_store(FIGURE_7_LEADER, term=7), 2: make_store(FIGURE_7_FOLLOWERS["f"], term=7)}
    stores[3] = make_store(FIGURE_7_LEADER, term=7)
    c = Cluster(3, stores=stores, pre_vote=False)
    c.elect(1)
    rejects = [m for m in c.sent if m.type is MsgType.APP_RESP and m.src == 2 and m.reject]
    assert 1 <= len(rejects) <= 2, f"{len(rejects)} rejections: backtracking went one entry at a time"
    assert c.log_terms(2) == [*FIGURE_7_LEADER, 8]


def test_figure_8_only_current_term_entries_commit_by_counting() -> None:
    # S1 led term 2 and got index 2 only onto S2; now S1 leads term 4 (Figure 8 (c)).
    stores = {
        1: make_store([1, 2], term=3, commit=1),
        2: make_store([1, 2], term=3, commit=1),
        3: make_store([1], term=3, commit=1),
        4: make_store([1], term=3, commit=1),
        5: make_store([1, 3], term=3, commit=1),
    }
    c = Cluster(5, stores=stores, pre_vote=False)

    # Let the old-term entry reach S3, but hold back the new leader's own term-4 entry.
    def without_new_term_entries(m: Message) -> Message | None:
        if m.type is MsgType.APP and m.entries:
            kept = [e for e in m.entries if e.term < 4]
            return Message(m.type, m.src, m.dst, m.term, m.index, m.log_term, kept, m.commit)
        return m

    c.filters.append(without_new_term_entries)
    leader = c.elect(1)
    assert leader.term == 4
    assert all(c.stores[i].last_index() >= 2 and c.stores[i].term(2) == 2 for i in (1, 2, 3))
    assert leader.commit == 1, "index 2 (term 2) sits on a majority but must not commit by counting"
    c.heal()
    c.tick_all(2)
    assert leader.commit == 3, "once the term-4 entry is on a majority, both commit"


def test_entries_are_pipelined_up_to_the_inflight_window() -> None:
    c = Cluster(3, max_inflight=4, max_batch_entries=1)
    c.elect(1)
    c.drop_type(MsgType.APP_RESP)  # nothing is acked: the window fills and stops
    c.sent.clear()
    leader = c.nodes[1]
    leader.propose([b"\x01%d" % i for i in range(10)])
    c.settle()
    apps_to_2 = [m for m in c.sent if m.type is MsgType.APP and m.dst == 2 and m.entries]
    assert len(apps_to_2) == 4
    assert leader.progress[2].state is ProgressState.REPLICATE


def test_the_leader_sends_the_batch_it_appended_as_it_is_and_reads_back_only_for_laggards() -> None:
    c = Cluster(3)
    c.elect(1)
    c.isolate(3)
    c.propose(1, b"a", b"b")
    c.heal()
    c.sent.clear()
    c.nodes[1].propose([b"\x01c", b"\x01d"])
    c.settle()
    apps = {m.dst: m for m in c.sent if m.type is MsgType.APP and m.entries and m.src == 1}
    # Node 2 needed exactly the new batch: it got the object the leader appended, framed once
    # for both the log and the wire. Node 3 lacked more and got the whole gap, read from the log.
    assert [e.data for e in apps[2].entries] == [b"\x01c", b"\x01d"]
    assert apps[2].entries is c.nodes[1]._fresh
    assert apps[3].index == 1 and [e.index for e in apps[3].entries] == [2, 3, 4, 5]
    assert c.log_terms(3) == c.log_terms(1)


def test_committed_entries_are_applied_as_appended_without_reading_the_log_back() -> None:
    c = Cluster(3)
    c.elect(1)
    c.propose(1, b"warm-up")
    reads = {i: 0 for i in c.nodes}
    for i, store in c.stores.items():
        original = store.entry_batch

        def counted(
            lo: int,
            hi: int,
            max_bytes: int | None = None,
            i: int = i,
            read: Callable[..., EntryBatch] = original,
        ) -> EntryBatch:
            reads[i] += 1
            return read(lo, hi, max_bytes)

        store.entry_batch = counted  # type: ignore[method-assign]
    for i in c.nodes:
        c.applied[i].clear()
    c.nodes[1].propose([b"\x01c", b"\x01d"])
    c.settle()
    c.tick_all(2)  # the commit index reaches the followers
    assert reads == {1: 0, 2: 0, 3: 0}
    for i in c.nodes:
        assert [e.data for e in c.applied[i]] == [b"\x01c", b"\x01d"], i


def test_batches_respect_the_byte_limit() -> None:
    c = Cluster(3, max_batch_bytes=1000)
    c.elect(1)
    c.sent.clear()
    c.nodes[1].propose([b"\x01" + bytes(400)] * 10)
    c.settle()
    apps = [m for m in c.sent if m.type is MsgType.APP and m.dst == 2 and m.entries]
    assert all(sum(len(e.data) for e in m.entries) <= 1000 or len(m.entries) == 1 for m in apps)
    assert c.stores[2].last_index() == 11


def test_a_slow_follower_is_probed_then_caught_up() -> None:
    c = Cluster(3)
    c.elect(1)
    c.isolate(3)
    for i in range(50):
        c.propose(1, b"%d" % i)
    assert c.stores[3].last_index() == 1
    c.heal()
    c.tick_all(3)
    assert c.log_terms(3) == c.log_terms(1)
    assert c.nodes[1].progress[3].state is ProgressState.REPLICATE


def test_leader_crash_mid_replication_keeps_every_committed_entry() -> None:
    c = Cluster(5, pre_vote=False)
    c.elect(1)
    c.propose(1, b"committed")
    committed = c.nodes[1].commit
    # The next entries reach only node 2 before the leader dies.
    c.filters.append(lambda m: None if m.type is MsgType.APP and m.src == 1 and m.dst != 2 else m)
    c.propose(1, b"maybe")
    c.down.add(1)
    c.heal()
    for _ in range(100):
        c.tick_all()
        if c.leaders():
            break
    (new,) = c.leaders()
    assert c.nodes[new].commit >= committed
    for i in range(2, 6):
        assert c.stores[i].entries(committed, committed + 1) == c.stores[1].entries(committed, committed + 1)


def test_a_leader_does_not_count_itself_before_its_entries_are_durable() -> None:
    c = Cluster(3)
    c.elect(1)
    c.isolate(3)
    c.hold_sync.add(1)
    c.propose(1, b"x")
    leader = c.nodes[1]
    assert c.stores[2].last_index() == 2, "entries went out in parallel with the leader's own fsync"
    assert leader.commit == 1, "node 2's ack alone is not a majority while the leader's copy is not durable"
    c.release_syncs(1)
    c.settle()
    assert leader.commit == 2


def test_a_follower_acks_entries_only_after_they_are_durable() -> None:
    c = Cluster(3)
    c.elect(1)
    c.hold_sync.add(2)
    c.sent.clear()
    c.propose(1, b"x")
    assert not [m for m in c.sent if m.type is MsgType.APP_RESP and m.src == 2 and m.index >= 2]
    c.release_syncs(2)
    c.settle()
    assert [m for m in c.sent if m.type is MsgType.APP_RESP and m.src == 2 and m.index == 2]


def test_a_vote_is_durable_before_it_is_sent() -> None:
    c = Cluster(3, pre_vote=False)
    c.hold_sync.add(2)
    c.campaign(1)
    assert not [m for m in c.sent if m.type is MsgType.VOTE_RESP and m.src == 2]
    assert c.nodes[1].role is Role.CANDIDATE or c.nodes[1].role is Role.LEADER
    c.release_syncs(2)
    c.settle()
    assert c.stores[2].hard_state().vote in (1, None)
    assert [m for m in c.sent if m.type is MsgType.VOTE_RESP and m.src == 2]


def test_restart_recovers_term_vote_log_and_commit() -> None:
    c = Cluster(3)
    c.elect(1)
    for i in range(5):
        c.propose(1, b"%d" % i)
    before = (c.nodes[2].term, c.nodes[2].vote, c.log_terms(2))
    restarted = c.crash_and_restart(2)
    assert (restarted.term, restarted.vote, c.log_terms(2)) == before
    c.tick_all(3)
    assert restarted.commit == c.nodes[1].commit == 6
    assert [e.index for e in c.applied[2]] == list(range(1, 7))


def test_a_follower_behind_the_compacted_log_needs_a_snapshot() -> None:
    c = Cluster(3)
    c.elect(1)
    c.isolate(3)
    for i in range(20):
        c.propose(1, b"%d" % i)
    c.stores[1].compact_prefix(15)  # a snapshot now covers entries up to 15
    c.heal()
    c.tick_all(3)
    assert c.snapshot_needed[1] == [3], "the driver is asked to send node 3 a snapshot, once"
    assert c.nodes[1].progress[3].state is ProgressState.SNAPSHOT
    assert c.nodes[1].progress[3].pending_snapshot == 15


def test_a_follower_that_lost_a_full_window_of_appends_recovers() -> None:
    # Node 3 answers heartbeats but every append to it is lost until its window is full.
    c = Cluster(3, max_inflight=2)
    c.elect(1)
    c.filters.append(lambda m: None if m.type is MsgType.APP and m.dst == 3 else m)
    for i in range(5):
        c.propose(1, b"x%d" % i)
    assert c.nodes[1].progress[3].state is ProgressState.REPLICATE
    assert len(c.nodes[1].progress[3].inflight) == 2, "the window is full of lost appends"
    c.heal()
    c.tick_all(3)
    assert c.stores[3].last_index() == c.stores[1].last_index(), "heartbeats reopened the window"


def test_a_new_commit_index_rides_on_the_next_append_or_waits_for_an_announcement() -> None:
    c = Cluster(3)
    c.elect(1)
    c.announce = False
    c.sent.clear()
    c.propose(1, b"a")
    leader = c.nodes[1]
    assert leader.commit == 2 and [c.nodes[i].commit for i in (2, 3)] == [1, 1]
    assert all(m.entries for m in c.sent if m.type is MsgType.APP), "no append only to carry a commit"
    assert leader.commit_unannounced
    c.propose(1, b"b")
    assert [c.nodes[i].commit for i in (2, 3)] == [2, 2], "the next append carried the commit index"
    leader.announce_commit()
    c.settle()
    assert [c.nodes[i].commit for i in (2, 3)] == [3, 3]
    assert not leader.commit_unannounced


def test_an_announcement_skips_a_commit_index_an_append_already_carried() -> None:
    c = Cluster(3)
    c.elect(1)
    c.announce = False
    leader = c.nodes[1]
    c.propose(1, b"a")
    armed_for = leader.commit  # what a driver's announce timer remembers when it is armed
    c.propose(1, b"b")  # its append carries armed_for; its own commit is newer
    assert leader.commit == armed_for + 1 and leader.commit_unannounced
    c.sent.clear()
    leader.announce_commit(armed_for)
    assert not [m for m in leader.ready().messages if m.type is MsgType.APP], (
        "an index already carried by an append got a round of messages of its own"
    )
    assert leader.commit_unannounced, "the newer index still waits for its own announcement"
    leader.announce_commit(leader.commit)
    c.settle()
    assert [c.nodes[i].commit for i in (2, 3)] == [leader.commit] * 2
    assert not leader.commit_unannounced


def test_a_leader_removing_itself_announces_the_commit_before_it_steps_down() -> None:
    c = Cluster(3)
    c.elect(1)
    c.announce = False
    leader = c.nodes[1]
    leader.propose_conf_change(ConfOp.REMOVE, 1)
    c.settle()
    assert leader.role is not Role.LEADER
    committed = leader.commit
    assert all(c.nodes[i].commit >= committed for i in (2, 3))


def test_a_sync_reported_after_a_truncation_does_not_vouch_for_the_new_entries() -> None:
    """Figure 7's truncation while a sync is under way: the sync of the old suffix completes on
    the driver's thread, and its report reaches the core only after the follower cut that
    suffix and appended the new leader's entries. The report speaks of the old log: the new
    entries are not durable, and are not applied, until a sync that began after them says so."""
    c = Cluster(5)
    c.elect(1)
    c.settle()
    base = c.nodes[2].store.last_index()
    # Leader 1 appends two entries that only node 2 gets; node 2's syncs are held from here
    # on, so they never commit.
    c.cut({1}, {3, 4, 5})
    c.hold_sync.add(2)
    c.propose(1, b"old-a")
    c.propose(1, b"old-b")
    c.settle()
    assert c.nodes[2].store.last_index() == base + 2
    held = c.held_syncs[2]
    stale_report = (held[-1], c.stores[2].complete_sync())  # done, not heard yet
    del held[-1]
    # 3, 4 and 5 elect a leader of a new term; its first append replaces the old suffix on 2.
    c.isolate(1)
    c.tick_all(40)
    (lead,) = [i for i in (3, 4, 5) if c.nodes[i].role is Role.LEADER]
    c.propose(lead, b"new")
    c.settle()
    assert c.nodes[2].store.term(base + 1) == c.nodes[lead].term
    c.nodes[2].synced(*stale_report)
    assert c.nodes[2].durable <= base, "an old report vouched for entries written after it"
    c.release_syncs(2)
    c.tick_all(3)
    assert any(e.data.endswith(b"new") for e in c.applied[2]), "applied once a sync after it reported"


def test_section_5_3_a_follower_commits_only_entries_the_append_checked() -> None:
    """Figure 2, AppendEntries rule 5: commitIndex = min(leaderCommit, index of last new entry).

    Follower 2 still holds entries 7 and 8 of term 2 from an old leader; the leader's log agrees
    with it up to 6 and has term-3 entries at 7 and 8, all committed. An append that checks the
    follower's log only up to 6 (prev 5, one entry) proves nothing about 7 and 8, so the leader's
    commit index of 9 lets the follower commit 6, not its stale 7 and 8."""
    stores = {
        1: make_store([1, 1, 1, 1, 1, 2, 3, 3], term=3, commit=8),
        2: make_store([1, 1, 1, 1, 1, 2, 2, 2], term=3, commit=5),
        3: make_store([1, 1, 1, 1, 1, 2, 3, 3], term=3, commit=8),
    }
    c = Cluster(3, stores=stores, pre_vote=False, max_batch_entries=1)
    c.isolate(2)
    leader = c.elect(1)
    assert leader.commit == 9
    c.heal()
    # What the leader sends when it resumes from a prefix the follower acknowledged before
    # (say a retransmission after lost answers): prev 5, the entry at 6, its commit index.
    c.deliver(Message(MsgType.APP, 1, 2, leader.term, 5, 1, c.stores[1].entries(6, 7), leader.commit))
    c.process(2)
    follower = c.nodes[2]
    assert follower.commit == 6, f"follower committed {follower.commit}: past the entries it checked"
    assert [(e.index, e.term) for e in c.applied[2]] == [(i, t) for i, t in enumerate([1, 1, 1, 1, 1, 2], 1)]
    c.settle()
    assert c.log_terms(2) == [1, 1, 1, 1, 1, 2, 3, 3, 4]
    assert follower.commit == 9
    assert [e.term for e in c.applied[2]] == [1, 1, 1, 1, 1, 2, 3, 3, 4]


def test_an_acknowledgement_past_the_leaders_log_is_ignored() -> None:
    """No follower can hold what the leader never appended: a forged or corrupt answer must
    neither commit anything nor stop the leader (it raised reading the term of that index)."""
    c = Cluster(3)
    leader = c.elect(1)
    c.propose(1, b"a")
    c.settle()
    commit, last = leader.commit, leader.store.last_index()
    leader.step(Message(MsgType.APP_RESP, 2, 1, leader.term, index=1_000_000))
    leader.step(Message(MsgType.APP_RESP, 3, 1, leader.term, index=1_000_000))
    c.settle()
    assert leader.role is Role.LEADER and leader.commit == commit == last
    assert leader.progress[2].match <= last


def test_an_ack_held_for_its_sync_is_dropped_when_the_log_is_cut_under_it() -> None:
    """A follower appends a leader's entry and holds its acknowledgement until the sync that makes
    it durable. Before that sync reports, a newer leader cuts the entry and appends its own at the
    same index; the sync (or a later one) then reports that index durable. The held ack must not
    leave: it vouches for the cut entry, which is on no disk (found by the simulation soak)."""
    c = Cluster(5)
    c.elect(1)
    c.propose(1, b"first")
    c.tick_all(1)
    c.cut({1}, {2, 4, 5})  # the next entry reaches node 3 only
    c.hold_sync.add(3)
    first = c.propose(1, b"only on node 3, not yet durable")
    assert first is not None
    index = first[1]
    c.settle()
    assert c.stores[3].last_index() == index and c.stores[3].durable_index() == index - 1
    # A newer leader (node 2, in a later term: nodes 2, 4 and 5 elected it without the entry)
    # sends its own entry at that index.
    term = c.nodes[3].term + 2
    prev = c.stores[3].term(index - 1)
    newer = Entry(index, term, command(b"the newer leader's"))
    c.nodes[3].step(Message(MsgType.APP, 2, 3, term, index=index - 1, log_term=prev, entries=[newer]))
    c.process(3)
    assert c.stores[3].term(index) == term, "cut, and the newer entry appended"
    c.sent.clear()
    c.release_syncs(3)
    c.settle()
    stale = [m for m in c.sent if m.src == 3 and m.type is MsgType.APP_RESP and m.term < term]
    assert stale == [], f"node 3 released an ack of the entry it no longer holds: {stale}"
