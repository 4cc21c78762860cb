"""The ceiling of one awaited future per operation in CPython's asyncio on this machine.

The embedded benchmark (``bench_embedded.py``) has many coroutines each awaiting
``node.propose``: every operation costs at least a future, its result and a task wake-up. This
measures that alone: ``--inflight`` coroutines each awaiting a future that one callback per loop
turn resolves for all of them (what a node's commit does), with nothing else in the loop. No
Raft node running on one event loop can answer more ``await propose`` calls per second than this.

Run:  python benchmarks/bench_asyncio_ceiling.py [--seconds 3] [--inflight 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


async def run(seconds: float, inflight: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[bytes]] = []
    scheduled = False

    def resolve_all() -> None:
        nonlocal waiting, scheduled
        batch, waiting = waiting, []
        scheduled = False
        for fut in batch:
            fut.set_result(b"")

    def propose() -> asyncio.Future[bytes]:
        nonlocal scheduled
        fut: asyncio.Future[bytes] = loop.create_future()
        waiting.append(fut)
        if not scheduled:
            scheduled = True
            loop.call_soon(resolve_all)
        return fut

    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await propose()
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    took = time.perf_counter() - began
    return {"ops_per_s": done / took, "us_per_op": took / done * 1e6, "inflight": inflight}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--inflight", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.seconds, args.inflight)), indent=2))


if __name__ == "__main__":
    main()
