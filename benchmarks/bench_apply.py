"""The apply step alone, in one process: KV puts with client sessions, applied one entry at a time
(``apply_entry``), in batches through ``KVStateMachine.apply``, and in batches straight into the
Rust store (``native_target()``, what the node runs). Reports µs per entry.

Every replica pays this for every write, so it bounds throughput: three replicas on two cores
cannot apply more than about 2 / (3 * this) entries per second.

Run:  python benchmarks/bench_apply.py [--entries 100000] [--batch 500]
"""

from __future__ import annotations

import argparse
import json
import time

from dengine._core import Entry
from dengine.kv import KVStateMachine, encode_put
from dengine.raft import payload
from dengine.raft.sessions import SessionTable, apply_entries, apply_entry

VALUE = b"v" * 256
IN_FLIGHT = 1000  # the client's window: results below it are dropped, as in the node benchmarks


def make_log(n: int) -> list[Entry]:
    log = []
    for i in range(n):
        command = encode_put(b"key-%d" % (i % 1000), VALUE)
        log.append(Entry(i + 1, 2, payload.session_command(7, i + 1, command, max(1, i - IN_FLIGHT))))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    log = make_log(args.entries)

    sm, table = KVStateMachine(), SessionTable()
    began = time.perf_counter()
    for e in log:
        apply_entry(e, table, sm.apply)
    one = (time.perf_counter() - began) / len(log)

    sm, table = KVStateMachine(), SessionTable()
    began = time.perf_counter()
    for i in range(0, len(log), args.batch):
        apply_entries(log[i : i + args.batch], table, sm.apply, ())
    batched = (time.perf_counter() - began) / len(log)

    sm, table = KVStateMachine(), SessionTable()
    store = sm.native_target()
    assert store is not None
    began = time.perf_counter()
    for i in range(0, len(log), args.batch):
        apply_entries(log[i : i + args.batch], table, store, ())
    native = (time.perf_counter() - began) / len(log)
    result = {
        "entries": len(log),
        "us_one_by_one": one * 1e6,
        "us_batched": batched * 1e6,
        "us_batched_native": native * 1e6,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
