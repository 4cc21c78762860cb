"""Telling a node that it was removed from its cluster.

A member is usually removed while it is down or cut off: that is why it is being replaced. The
leader stops replicating to it the moment the removal is appended, so the node never receives
the entry that removes it. Back up, it still believes it is a voter: it campaigns every election
timeout, and every member refuses its messages as coming from an unknown node (after the grace
in which departed members are still heard, see ``dengine.members``). Left alone, it would go on
for ever, and every member would log a refusal every second.

A learner does not campaign; one that has heard from no leader for two election timeouts tells
the voters it is alive instead, once per election timeout (``Raft._probe_voters``), and is refused
the same way. So does a node whose own removal is in its log but not known to be committed (a
leader that removed itself and lost touch, or restarted, before it heard the commit): no longer
a voter of the configuration in force, it does not campaign, and once the removal commits nobody
sends it anything; the voters of that configuration refuse it (they refuse a node outside their
committed configuration only), and a majority of them doing so tells it the removal committed.

So a node listens to those refusals. A majority of the voters it knows refusing it means that a
majority holds a configuration without it: that configuration is in the log of any future leader,
and the node will not be a member again unless an operator adds it anew. It then stops, saying
why (``dengine serve`` exits), as an etcd member does when its peers report it removed. One
refusal is not enough: a member that has not yet appended the entry that added a node refuses it
too, for a moment, while the node itself has not appended that entry either (a member takes a
node of a configuration newer than its own log, see ``dengine.transport.codec``). Refusals count
while they keep coming for a while (:attr:`RemovalWatch.persist_s`, two election timeouts: at
least two campaigns), and a member that sends this node a message (it knows the node) stops
counting.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["RemovalWatch"]


class RemovalWatch:
    """Refusals of this node's messages by members that do not know it, and the verdict."""

    def __init__(self, node_id: int, election_timeout_s: float) -> None:
        self.node_id = node_id
        self.persist_s = 2 * election_timeout_s
        """How long a member must have gone on refusing this node before its refusals count."""
        # A campaign every one to two election timeouts, and a reconnect backoff of up to a
        # second after each refusal: refusals further apart than this are not the same run.
        self.window_s = 6 * election_timeout_s + 1.0
        self._runs: dict[int, tuple[float, float]] = {}  # member -> (first, last) refusal of its run

    def refused_by(self, member: int, now: float) -> None:
        """``member`` refused a message of this node as coming from an unknown node."""
        run = self._runs.get(member)
        first = run[0] if run is not None and now - run[1] <= self.window_s else now
        self._runs[member] = (first, now)

    def heard_from(self, member: int) -> None:
        """``member`` sent this node a message: it knows this node."""
        self._runs.pop(member, None)

    @property
    def watching(self) -> bool:
        """Whether any refusal is on record (the receive path asks before :meth:`heard_from`)."""
        return bool(self._runs)

    def removed_by(
        self, voters: Collection[int], learners: Collection[int], now: float, *, leaving: bool = False
    ) -> list[int] | None:
        """The voters refusing this node, when they are a majority of ``voters`` (of the
        configuration this node believes in, where it is a voter or one of the ``learners``, or
        which removes it: ``leaving``, its removal not known to be committed); None otherwise."""
        if self.node_id not in voters and self.node_id not in learners and not leaving:
            return None  # a node that knows it left is told elsewhere
        refusing = sorted(
            m
            for m, (first, last) in self._runs.items()
            if m in voters and now - last <= self.window_s and now - first >= self.persist_s
        )
        return refusing if len(refusing) >= len(voters) // 2 + 1 else None
