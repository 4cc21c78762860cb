"""dengine: a Raft consensus engine for Python.

This release provides the storage and arithmetic foundation of a node, implemented in Rust:
the durable log store (:mod:`dengine.storage`), quorum arithmetic (:mod:`dengine.quorum`) and
snapshot chunking (:mod:`dengine.snapshot`). Errors live in :mod:`dengine.errors`.
"""

from dengine._core import __version__
from dengine.storage import Entry, HardState, LogStore, MemoryLogStore, WalLogStore, open_log_store

__all__ = [
    "Entry",
    "HardState",
    "LogStore",
    "MemoryLogStore",
    "WalLogStore",
    "__version__",
    "open_log_store",
]
