"""Long soak of the seeded simulation: runs seeds [start, stop) and reports failures.

Run:  python benchmarks/soak_simulation.py --start 0 --stop 10000 [--jobs 2]
Each failing seed replays with DENGINE_SIM_SEED=<seed> python -m pytest tests/test_simulation.py -k replay
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor

from dengine.testing.workload import run_kv_simulation


def _chunk(seeds: range) -> tuple[int, int, int, list[str]]:
    ops = indeterminate = 0
    failures: list[str] = []
    for seed in seeds:
        try:
            r = run_kv_simulation(seed)
            ops += r.operations
            indeterminate += r.indeterminate
        except Exception as exc:  # report every kind of failure, then go on
            failures.append(f"seed {seed}: {type(exc).__name__}: {str(exc)[:300]}")
    return len(seeds), ops, indeterminate, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", help="write the summary as JSON here")
    args = parser.parse_args()
    began = time.perf_counter()
    step = 100
    chunks = [range(s, min(s + step, args.stop)) for s in range(args.start, args.stop, step)]
    seeds = ops = indeterminate = 0
    failures: list[str] = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for n, o, i, failed in pool.map(_chunk, chunks):
            seeds, ops, indeterminate = seeds + n, ops + o, indeterminate + i
            failures.extend(failed)
    summary = {
        "seeds": seeds,
        "operations": ops,
        "indeterminate": indeterminate,
        "failures": failures,
        "seconds": round(time.perf_counter() - began, 1),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
