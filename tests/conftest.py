"""Makes the suite's helper modules (such as logstore_conformance) importable from tests, and
holds the fixtures several test modules share, and a watchdog that fails a hung test."""

import asyncio
import faulthandler
import os
import signal
import sys
import threading
from asyncio import events as asyncio_events
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cluster_procs import ProcCluster

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(params=["direct", "wire"])
def both_deliveries(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a scenario twice (``pytestmark = pytest.mark.usefixtures("both_deliveries")``):
    messages handed over as objects, and through the gRPC codec (entries then arrive framed, as
    an EntryBatch, the way a real follower appends them)."""
    from raft_harness import Cluster  # noqa: PLC0415 - after the path above is set

    Cluster.wire = request.param == "wire"
    try:
        yield request.param
    finally:
        Cluster.wire = False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator["ProcCluster"]:
    """A started 3-process cluster on 127.0.0.1, every process killed afterwards (a module may
    define its own, say one shared by the whole module)."""
    from cluster_procs import running_cluster  # noqa: PLC0415 - after the path above is set

    with running_cluster(tmp_path) as c:
        yield c


# A test that hangs must fail with a picture of where it hangs, not stall the whole run until
# CI's own limit ends it with no trace (a CI run once did). The longest test takes under half a
# minute in CI; DENGINE_TEST_HANG_SECONDS changes the limit (0 turns the watchdog off).
HANG_SECONDS = float(os.environ.get("DENGINE_TEST_HANG_SECONDS", "300"))
# If the test's clean-up hangs as well once it was failed, the run ends here instead.
HANG_GRACE_SECONDS = 120.0


def _dump_where_it_hangs(seconds: float) -> None:
    print(
        f"\n=== test still running after {seconds:.0f} s: every thread and asyncio task ===", file=sys.stderr
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    loop = asyncio_events._get_running_loop()
    if loop is not None:
        for task in asyncio.all_tasks(loop):
            print(f"--- {task!r}", file=sys.stderr)
            try:
                task.print_stack(file=sys.stderr)
            except Exception as exc:  # a Cython coroutine's frame has no line number
                print(f"    (no stack: {exc!r})", file=sys.stderr)
    sys.stderr.flush()


def _fail_hung_test(signum: int, frame: FrameType | None) -> None:
    _dump_where_it_hangs(HANG_SECONDS)
    pytest.fail(f"the test hung: still running after {HANG_SECONDS:.0f} s (stacks above)", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if HANG_SECONDS <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _fail_hung_test)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    faulthandler.dump_traceback_later(HANG_SECONDS + HANG_GRACE_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
