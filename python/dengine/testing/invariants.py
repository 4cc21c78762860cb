"""Raft's safety properties (Figure 3 of the paper), checked while a simulation runs.

* Election safety: at most one leader per term.
* Log matching: two logs with an entry of the same index and term agree on every entry up to it.
* Leader completeness: a leader's log holds every entry committed before its term began.
* State machine safety: no two nodes apply different entries at one index, and applying one
  entry gives every node the same answer (a nondeterministic state machine forks its replicas).
* A committed entry is never lost: it is durable on a majority of the configuration (both
  halves of a joint one) when it commits, and stays so through every crash.
* Nothing is promised before it is durable: a node sends a message of a term only once that term
  is on its disk, grants a vote only once that vote is, and acknowledges entries only up to its
  durable index (checked as each message leaves, not only when a crash exposes it).
* Term, commit index and applied index never go backwards within a node's life, and after a
  restart a node's term is at least that of any message it ever sent (terms are durable first).
* Snapshots: every snapshot of index ``i`` (taken, received or restored, on any node) holds the
  same state and session table, and ``i`` is a committed entry of that term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dengine._core import Entry
from dengine.errors import DengineError
from dengine.raft import Message, MsgType, Ready, Role, membership
from dengine.raft.payload import is_conf_change
from dengine.raft.sessions import Applied, Outcome

if TYPE_CHECKING:
    from dengine.testing.sim import SimCluster, SimNode, SimSnapshot


class SimulationFailure(AssertionError):
    """A safety property broke (or a run could not make progress); the message says which and
    how to replay the run."""


class InvariantChecker:
    """Watches a :class:`~dengine.testing.sim.SimCluster` and fails the run on the first violation."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self.leaders: dict[int, int] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}
        self.applied: dict[int, tuple[int, bytes]] = {}
        self.results: dict[int, tuple[int, Outcome, bytes | None, str | None]] = {}  # (node, answer)
        self._seen: dict[int, tuple[int, int, int, int]] = {}  # node -> (incarnation, term, commit, applied)
        self._checks = 0
        self.max_sent_term: dict[int, int] = {}
        self.snapshots: dict[int, SimSnapshot] = {}

    def fail(self, what: str) -> None:
        raise SimulationFailure(
            f"{what} (seed {self.cluster.seed}, at {self.cluster.now:.1f} ms virtual time; "
            f"{self.cluster.replay})"
        )

    def on_ready(self, node: SimNode, rd: Ready) -> None:
        raft = node.raft
        assert raft is not None
        prev = self._seen.get(node.id)
        if prev is not None and prev[0] == node.incarnation:
            _, term, commit, applied = prev
            if raft.term < term or raft.commit < commit or raft.applied < applied:
                self.fail(
                    f"node {node.id} went backwards: term {term}->{raft.term}, "
                    f"commit {commit}->{raft.commit}, applied {applied}->{raft.applied}"
                )
        if raft.term < self.max_sent_term.get(node.id, 0):
            self.fail(
                f"node {node.id} is at term {raft.term} after sending messages of term "
                f"{self.max_sent_term[node.id]}: a term it used was not durable"
            )
        self._seen[node.id] = (node.incarnation, raft.term, raft.commit, raft.applied)

        if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
            self._on_new_leader(node)
        old_commit = prev[2] if prev is not None and prev[0] == node.incarnation else 0
        if raft.commit > old_commit:
            new = self._record_committed(node, max(old_commit + 1, raft.store.first_index()), raft.commit)
            if new:
                self._check_durable_when_committed(node, new)
        self._checks += 1
        if self._checks % 2000 == 0:
            self.check_log_matching()

    def _on_new_leader(self, node: SimNode) -> None:
        raft = node.raft
        assert raft is not None
        other = self.leaders.setdefault(raft.term, node.id)
        if other != node.id:
            self.fail(f"two leaders in term {raft.term}: nodes {other} and {node.id}")
        store = raft.store
        for index, (term, data) in self.committed.items():
            if index < store.first_index():
                continue
            if index > store.last_index() or self._entry(node, index) != (term, data):
                self.fail(f"leader {node.id} of term {raft.term} lacks committed entry {index} (term {term})")

    def _entry(self, node: SimNode, index: int) -> tuple[int, bytes] | None:
        try:
            (e,) = node.store.entries(index, index + 1)
        except DengineError:
            return None
        return e.term, e.data

    def _record_committed(self, node: SimNode, lo: int, hi: int) -> list[tuple[int, int]]:
        """Records entries ``lo..hi`` as committed; returns ``(index, term)`` of those nobody
        had committed before."""
        new = []
        for e in node.store.entries(lo, hi + 1):
            known = self.committed.get(e.index)
            if known is None:
                known = self.committed[e.index] = (e.term, e.data)
                new.append((e.index, e.term))
            if known != (e.term, e.data):
                self.fail(
                    f"entry {e.index} committed twice with different contents: term {known[0]} and term "
                    f"{e.term} (node {node.id})"
                )
        return new

    def _check_durable_when_committed(self, node: SimNode, new: list[tuple[int, int]]) -> None:
        """The first node to commit an index (its leader) may count only disks that hold it:
        a majority of each half of its configuration must have it durable (or compacted into a
        snapshot) at that moment."""
        raft = node.raft
        assert raft is not None
        nodes = self.cluster.nodes
        for half in (raft.conf.incoming, raft.conf.outgoing):
            if not half:
                continue
            stores = [nodes[v].store for v in half if v in nodes]
            for index, term in new:
                # A disk compacted past the entry holds it in a snapshot.
                holders = sum(
                    1
                    for store in stores
                    if index < store.first_index()
                    or (index <= store.durable_index() and store.term(index) == term)
                )
                if holders <= len(half) // 2:
                    self.fail(
                        f"node {node.id} committed entry {index} (term {term}) while it was durable "
                        f"on only {holders} of the {len(half)} voters {sorted(half)}"
                    )

    def on_send(self, m: Message) -> None:
        t = m.type
        # Pre-vote messages carry a future term the sender has not entered.
        if t is MsgType.PRE_VOTE or t is MsgType.PRE_VOTE_RESP:
            return
        if m.term > self.max_sent_term.get(m.src, 0):
            self.max_sent_term[m.src] = m.term
        store = self.cluster.nodes[m.src].store
        hs = store.durable_hard_state()
        if hs.term < m.term:
            self.fail(f"node {m.src} sent {t.name} of term {m.term} while its disk holds term {hs.term}")
        if t is MsgType.VOTE_RESP and not m.reject and hs.term == m.term and hs.vote != m.dst:
            # (A grant released late, after a newer term reached the disk, is no promise broken.)
            self.fail(
                f"node {m.src} granted its vote in term {m.term} to node {m.dst} while its disk "
                f"holds the vote {hs.vote}"
            )
        if t is MsgType.APP_RESP and not m.reject and m.index > store.durable_index():
            self.fail(
                f"node {m.src} acknowledged entries up to {m.index} while only {store.durable_index()} "
                "were durable"
            )

    def on_apply(self, node: SimNode, entry: Entry, applied: Applied | None = None) -> None:
        known = self.applied.setdefault(entry.index, (entry.term, entry.data))
        if known != (entry.term, entry.data):
            self.fail(f"node {node.id} applied a different entry at index {entry.index} than another node")
        if applied is not None:
            answer = (node.id, applied.outcome, applied.result, applied.error)
            first = self.results.setdefault(entry.index, answer)
            if first[1:] != answer[1:]:
                self.fail(
                    f"entry {entry.index} gave node {node.id} the answer {answer[1:]} but node {first[0]} "
                    f"{first[1:]}: the state machine is not deterministic, so the replicas diverged"
                )
        committed = self.committed.get(entry.index)
        if committed is not None and committed != (entry.term, entry.data):
            self.fail(f"node {node.id} applied entry {entry.index} that differs from the committed one")

    def on_snapshot(self, node: SimNode, snap: SimSnapshot) -> None:
        """A snapshot reached ``node``'s disk (taken there or received)."""
        info = snap.info
        committed = self.committed.get(info.index)
        if committed is not None and committed[0] != info.term:
            self.fail(
                f"node {node.id} holds a snapshot at index {info.index} of term {info.term}, but the "
                f"entry committed there has term {committed[0]}"
            )
        known = self.snapshots.setdefault(info.index, snap)
        if (known.info, known.state, known.sessions) != (info, snap.state, snap.sessions):
            self.fail(f"node {node.id} holds a snapshot at index {info.index} that differs from another's")

    def on_restore(self, node: SimNode, snap: SimSnapshot) -> None:
        """``node``'s state machine was replaced by ``snap``."""
        self.on_snapshot(node, snap)

    def on_crash(self, node: SimNode) -> None:
        self.check_durable_quorum()

    def on_wipe(self, node: SimNode) -> None:
        """A node restarted on an empty disk forgot its term on purpose (it may not vote until it
        catches up, see RaftConfig.can_vote): the terms it used before are no longer its own."""
        self.max_sent_term.pop(node.id, None)

    def check_durable_quorum(self) -> None:
        """Every committed entry must survive on a majority of the disks, whatever crashes next."""
        live = [n for n in self.cluster.nodes.values() if n.raft is not None]
        if not live:
            return
        # Every majority of the newest configuration must include a node that holds each
        # committed entry (or a snapshot covering it): at least ceil(n / 2) of its n voters.
        # The newest configuration is the one at the end of the most up-to-date durable log
        # (down nodes included): only a log at least that up-to-date can win an election.
        _, newest = max(self._disk_view(n) for n in self.cluster.nodes.values())
        voters = [self.cluster.nodes[v] for v in sorted(newest) if v in self.cluster.nodes]
        needed = len(voters) - len(voters) // 2
        durable = []
        for n in voters:
            entries = n.store.durable_entries()
            durable.append({e.index: (e.term, e.data) for e in entries})
        for index, value in self.committed.items():
            holders = sum(1 for d in durable if d.get(index) == value)
            compacted = sum(1 for n in voters if index < n.store.first_index())
            if holders + compacted < needed:
                self.fail(
                    f"committed entry {index} is durable on only {holders} of {len(voters)} voters' disks"
                )

    @staticmethod
    def _disk_view(node: SimNode) -> tuple[tuple[int, int], frozenset[int]]:
        """``((term, index) of the last durable entry, voters in force there)`` from what
        ``node``'s disk holds (its log, else its newest snapshot, else its initial config)."""
        entries = node.store.durable_entries()
        snap = node.latest_snapshot()
        if entries:
            last = (entries[-1].term, entries[-1].index)
        else:
            last = (snap.info.term, snap.info.index) if snap is not None else (0, 0)
        for e in reversed(entries):
            if is_conf_change(e.data):
                return last, membership.decode(e.data).voters
        return last, snap.info.voters if snap is not None else node.config.voters

    def check_log_matching(self) -> None:
        logs = []
        for n in self.cluster.nodes.values():
            first = n.store.first_index()
            logs.append((n.id, first, n.store.entries(first, n.store.last_index() + 1)))
        for i, (a_id, a_first, a) in enumerate(logs):
            for b_id, b_first, b in logs[i + 1 :]:
                lo = max(a_first, b_first)
                hi = min(a_first + len(a), b_first + len(b)) - 1
                last_same = 0
                for index in range(hi, lo - 1, -1):
                    if a[index - a_first].term == b[index - b_first].term:
                        last_same = index
                        break
                for index in range(lo, last_same + 1):
                    ea, eb = a[index - a_first], b[index - b_first]
                    if (ea.term, ea.data) != (eb.term, eb.data):
                        self.fail(
                            f"log matching broken: nodes {a_id} and {b_id} agree on entry {last_same} "
                            f"but differ at {index}"
                        )
