"""Throughput of the pure Raft core: a 3-node cluster in one process, zero network delay,
in-memory logs, proposals arriving in batches. Measures committed-and-applied proposals per
second of wall time on every node (the core must not be the bottleneck of a real node).

Run:  python benchmarks/bench_raft_core.py [--batch 1000] [--proposals 300000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections import deque

from dengine._core import MemoryLogStore
from dengine.raft import Message, Raft, RaftConfig, Role
from dengine.raft.payload import command


def run(batch: int, proposals: int, payload_size: int) -> dict[str, float]:
    voters = frozenset({1, 2, 3})
    stores = {i: MemoryLogStore() for i in voters}
    nodes = {i: Raft(RaftConfig(id=i, voters=voters), stores[i], seed=i) for i in voters}
    applied = dict.fromkeys(voters, 0)
    queue: deque[Message] = deque()

    def pump() -> None:
        moved = True
        while moved:
            moved = False
            for i, raft in nodes.items():
                while raft.has_ready():
                    moved = True
                    rd = raft.ready()
                    if rd.sync is not None:
                        raft.synced(rd.sync, stores[i].sync())
                    queue.extend(rd.messages)
                    if rd.committed:
                        applied[i] += len(rd.committed)
                        raft.applied_to(rd.committed[-1].index)
            while queue:
                moved = True
                m = queue.popleft()
                nodes[m.dst].step(m)

    while nodes[1].role is not Role.LEADER:
        nodes[1].tick()
        pump()
    leader = nodes[1]
    payloads = [command(bytes(payload_size))] * batch
    target = leader.commit + proposals
    began = time.perf_counter()
    sent = 0
    while sent < proposals:
        leader.propose(payloads)
        sent += batch
        pump()
    while min(r.applied for r in nodes.values()) < target:
        pump()
    took = time.perf_counter() - began
    return {"batch": batch, "proposals": sent, "seconds": took, "proposals_per_s": sent / took}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--proposals", type=int, default=300_000)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        result = run(args.batch, args.proposals, args.payload)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    else:
        result = run(args.batch, args.proposals, args.payload)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
