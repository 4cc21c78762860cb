"""Timestamps at the steps of a write, inside a running node (for ``trace_write1.py``).

``install()`` wraps a few of dengine's own methods so that each step records
``time.monotonic_ns()`` (one clock for every process on the machine) and a tag, and writes the
records to ``$DENGINE_TRACE_DIR/trace-<pid>.json`` when the process exits. ``trace_write1.py``
loads it into its ``dengine serve`` nodes through a ``sitecustomize`` module, after choosing
grpc's I/O manager (importing dengine imports grpc). The wrapped names are
private and may move: a missing one fails loudly at start-up, which is the point of a probe.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from dengine import log_sync, node, server
from dengine.transport import peers

Record = tuple[int, str, int]  # (monotonic ns, tag, detail: a message's last index, a count)

_records: list[Record] = []


def _note(tag: str, detail: int = 0) -> None:
    _records.append((time.monotonic_ns(), tag, detail))


def _dump(directory: str) -> None:
    with open(os.path.join(directory, f"trace-{os.getpid()}.json"), "w") as f:
        json.dump(_records, f)


def _message_tag(verb: str, m: Any) -> str:
    """``send app+`` for an append with entries, ``recv app_resp`` for an answer, and so on."""
    return f"{verb} {m.type.name.lower()}{'+' if m.entries else ''}"


def _last_index(m: Any) -> int:
    """The last index an append carries, or the index an answer acknowledges."""
    return int(m.index) + len(m.entries or ())


def _wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    setattr(owner, name, make(getattr(owner, name)))


def install(directory: str) -> None:
    """Wraps the steps of the write path and dumps the records at exit."""

    def on_message(real: Any) -> Any:
        def wrapper(self: Any, m: Any) -> None:
            _note(_message_tag("recv", m), _last_index(m))
            real(self, m)

        return wrapper

    def send(real: Any) -> Any:
        def wrapper(self: Any, m: Any) -> None:
            _note(_message_tag("send", m), _last_index(m))
            real(self, m)

        return wrapper

    def outgoing(real: Any) -> Any:
        async def wrapper(self: Any, q: Any) -> AsyncIterator[Any]:
            async for batch in real(self, q):
                _note("write")
                yield batch

        return wrapper

    def step(tag: str) -> Callable[[Any], Any]:
        def make(real: Any) -> Any:
            def wrapper(self: Any, *args: Any) -> Any:
                _note(tag)
                return real(self, *args)

            return wrapper

        return make

    def answered(real: Any) -> Any:
        def wrapper(self: Any, done: Any) -> None:
            _note("answered", len(done))
            real(self, done)

        return wrapper

    def streamed(real: Any) -> Any:
        async def wrapper(self: Any, *args: Any) -> bytes:
            _note("batch in")
            out: bytes = await real(self, *args)
            _note("batch out")
            return out

        return wrapper

    _wrap(node.Node, "_on_message", on_message)
    _wrap(peers.PeerTransport, "send", send)
    _wrap(peers.PeerTransport, "_outgoing", outgoing)
    _wrap(log_sync.LogSyncer, "want", step("sync asked"))
    _wrap(log_sync.LogSyncer, "_finished", step("synced"))
    _wrap(node.Node, "_answer_applied", answered)
    _wrap(server.KVService, "_answer_streamed", streamed)
    atexit.register(_dump, directory)
