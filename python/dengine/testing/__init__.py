"""Tools to test replicated state machines: the deterministic simulated cluster that dengine itself
is tested with (:mod:`dengine.testing.sim`), Raft's safety invariants checked as it runs
(:mod:`dengine.testing.invariants`), a linearizability checker for recorded client histories
(:mod:`dengine.testing.linearizability`) and the seeded KV fault-injection run
(:mod:`dengine.testing.workload`)."""

from dengine.testing.linearizability import (
    CheckResult,
    HistoryRecorder,
    KVInput,
    KVModel,
    Model,
    Operation,
    RegisterInput,
    RegisterModel,
    check,
)

__all__ = [
    "CheckResult",
    "HistoryRecorder",
    "KVInput",
    "KVModel",
    "Model",
    "Operation",
    "RegisterInput",
    "RegisterModel",
    "check",
]
