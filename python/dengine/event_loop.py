"""The asyncio event loop a process that runs dengine uses.

A node's event loop turns over for every message, timer, disk sync and answer, and with many writes
in flight the loop's own overhead is a large share of the node's CPU. uvloop (libuv behind
asyncio's API) makes that overhead about half of CPython's: one awaited future per operation costs
2.3-2.4 µs on uvloop against 3.9-4.2 µs on the stdlib loop
(``benchmarks/bench_asyncio_ceiling.py --loop uvloop|asyncio``, 2-core machine of
``benchmarks/RESULTS.md``). A whole cluster gains less, since gRPC and the state machine keep
their cost. Alternating runs: embedded writes +10% (``benchmarks/bench_embedded.py
--event-loop``), saturated linearizable reads +11%, saturated writes +2-3%
(``benchmarks/bench_vs_etcd.py --event-loop``).

``dengine serve`` runs on the loop ``node.event_loop`` names, ``"auto"`` by default: uvloop where it
is installed (a dependency of dengine on Linux and macOS), else the stdlib loop. An embedding
program owns its loop; :func:`run` is :func:`asyncio.run` with the same choice.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, get_args

__all__ = [
    "EVENT_LOOPS",
    "EventLoopChoice",
    "cancelling_itself",
    "loop_factory",
    "resolve",
    "run",
    "running_loop_name",
]

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
EVENT_LOOPS: tuple[str, ...] = get_args(EventLoopChoice)
"""The values ``node.event_loop`` and :func:`run` accept."""

T = TypeVar("T")


def _uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(choice: str = "auto") -> Literal["uvloop", "asyncio"]:
    """The loop ``choice`` means on this machine. Raises ValueError for a choice outside
    :data:`EVENT_LOOPS`, and ImportError for ``"uvloop"`` where uvloop is not installed."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, not {choice!r}")
    if choice == "asyncio":
        return "asyncio"
    if _uvloop_installed():
        return "uvloop"
    if choice == "uvloop":
        raise ImportError(
            "event loop 'uvloop' asked for, but uvloop is not installed here "
            "(pip install uvloop, or choose 'auto' or 'asyncio')"
        )
    return "asyncio"


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """A function that makes a new event loop of the kind ``choice`` resolves to (:func:`resolve`)."""
    if resolve(choice) == "uvloop":
        import uvloop  # noqa: PLC0415  (optional: absent on Windows)

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], *, loop: str = "auto", debug: bool | None = None) -> T:
    """Runs ``main`` to completion on a new event loop of the kind ``loop`` names, as
    :func:`asyncio.run` does (the loop is closed after, its async generators finished).

    For a program that embeds a node: ``dengine.event_loop.run(main())`` in place of
    ``asyncio.run(main())`` gives the node uvloop where it is installed."""
    factory = loop_factory(loop)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
            return runner.run(main)
    # Python 3.10 has no Runner: asyncio.run makes its loop through the policy.
    previous = asyncio.get_event_loop_policy()

    class _Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return factory()

    asyncio.set_event_loop_policy(_Policy())
    try:
        return asyncio.run(main, debug=debug)
    finally:
        asyncio.set_event_loop_policy(previous)


def running_loop_name() -> str:
    """The package of the running event loop's class, ``"uvloop"`` or ``"asyncio"`` (for logs)."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def cancelling_itself() -> bool:
    """Whether the running task is itself being cancelled, as opposed to a CancelledError that
    came out of something it awaited (a call cancelled elsewhere, a user's code). Python 3.10
    cannot tell the two apart: there it is always taken for the task's own."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return task is None or cancelling is None or cancelling() > 0
