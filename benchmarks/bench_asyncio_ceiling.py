"""The ceiling of one awaited future per operation in CPython's asyncio on this machine.

The embedded benchmark (``bench_embedded.py``) has many coroutines each awaiting
``node.propose``: every operation costs at least a future, its result and a task wake-up. This
measures that alone: ``--inflight`` coroutines each awaiting a future that one callback per loop
turn resolves for all of them (what a node's commit does), with nothing else in the loop. No
Raft node running on one event loop can answer more ``await propose`` calls per second than this.

``--loop`` picks the event loop (``dengine.event_loop``): uvloop where installed by default.

Run:  python benchmarks/bench_asyncio_ceiling.py [--seconds 3] [--inflight 1000] [--loop auto|uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from dengine import event_loop
from dengine.event_loop import EVENT_LOOPS


async def run(seconds: float, inflight: int) -> dict[str, float | str]:
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
    return {
        "ops_per_s": done / took,
        "us_per_op": took / done * 1e6,
        "inflight": inflight,
        "event_loop": event_loop.running_loop_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument("--loop", choices=EVENT_LOOPS, default="auto")
    args = parser.parse_args()
    print(json.dumps(event_loop.run(run(args.seconds, args.inflight), loop=args.loop), indent=2))


if __name__ == "__main__":
    main()
