"""dengine: a Raft consensus engine for Python.

The names most programs need are here: :class:`Node` (embed a replica), :class:`Config`,
:class:`StateMachine` (the protocol your state machine implements), :class:`Client` (talk to a
``dengine serve`` cluster), and the storage classes. Errors live in :mod:`dengine.errors`. The
networking names are imported on first use, so ``import dengine`` stays cheap.
"""

from typing import TYPE_CHECKING, Any

from dengine._core import __version__
from dengine.state_machine import StateMachine
from dengine.storage import Entry, HardState, LogStore, MemoryLogStore, WalLogStore, open_log_store

if TYPE_CHECKING:
    from dengine.client import Client
    from dengine.config import Config
    from dengine.node import Node

__all__ = [
    "Client",
    "Config",
    "Entry",
    "HardState",
    "LogStore",
    "MemoryLogStore",
    "Node",
    "StateMachine",
    "WalLogStore",
    "__version__",
    "open_log_store",
]

_LAZY = {"Client": "dengine.client", "Config": "dengine.config", "Node": "dengine.node"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dengine' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(module), name)
