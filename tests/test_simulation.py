"""The seeded fault-injection simulation: invariants checked continuously, client histories
checked for linearizability, liveness after healing.

CI runs a fixed range of seeds. To replay one seed bit for bit:
    DENGINE_SIM_SEED=123 python -m pytest tests/test_simulation.py -k replay
More seeds: DENGINE_SIM_SEEDS=10000 (the soak documented in benchmarks/README.md).
"""

from __future__ import annotations

import os

import pytest

from dengine.testing.workload import run_kv_simulation

CI_SEEDS = int(os.environ.get("DENGINE_SIM_SEEDS", "200"))


@pytest.mark.parametrize("block", range(10))
def test_seeded_simulation(block: int) -> None:
    """Runs seeds ``block, block + 10, ...`` below CI_SEEDS (ten blocks keep output readable)."""
    for seed in range(block, CI_SEEDS, 10):
        run_kv_simulation(seed)


@pytest.mark.skipif("DENGINE_SIM_SEED" not in os.environ, reason="set DENGINE_SIM_SEED to replay one seed")
def test_replay() -> None:
    seed = int(os.environ["DENGINE_SIM_SEED"])
    report = run_kv_simulation(seed)
    print(report)


def test_a_seed_replays_bit_for_bit() -> None:
    a, b = run_kv_simulation(4242), run_kv_simulation(4242)
    assert a == b
    assert a.operations > 0 and a.completed > 0 and a.faults
