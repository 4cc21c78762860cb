"""What a leader knows about each follower's log (etcd-raft's Progress, simplified)."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class ProgressState(enum.Enum):
    PROBE = "probe"  # position unknown: one APP at a time until one is accepted
    REPLICATE = "replicate"  # position known: stream APPs, up to the in-flight window
    SNAPSHOT = "snapshot"  # needs a snapshot: the entries it lacks were compacted


@dataclass(slots=True)
class Progress:
    match: int = 0
    next: int = 1
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False
    inflight: deque[int] = field(default_factory=deque)
    recent_active: bool = False
    last_heard_tick: int = -(10**9)
    pending_snapshot: int = 0
    responded_tick: int = -(10**9)  # when it last answered: only real answers count
    commit_sent: int = 0  # the highest commit index sent to it (the follower may know more)

    def become_probe(self) -> None:
        # After a snapshot the follower is known to hold everything up to the snapshot index.
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflight.clear()
        self.pending_snapshot = 0

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.inflight.clear()

    def maybe_update(self, index: int) -> bool:
        """Records an ack of ``index``; True when it moved ``match`` forward."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        return updated

    def is_paused(self, max_inflight: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True
