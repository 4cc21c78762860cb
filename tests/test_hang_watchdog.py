"""The suite's watchdog (tests/conftest.py): a hung test fails with where it hangs, and the run
goes on to the next test instead of stalling until CI's own limit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HUNG_TESTS = """
import asyncio
import threading


def test_hangs_in_an_event_loop():
    async def waits_for_ever():
        await asyncio.Event().wait()

    asyncio.run(waits_for_ever())


def test_hangs_in_a_thread_join():
    threading.Event().wait()


def test_after_the_hung_ones():
    pass
"""


def test_a_hung_test_fails_with_its_tasks_and_threads_and_the_run_goes_on(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(Path(__file__).parent / "conftest.py", pytester.path / "conftest.py")
    pytester.makepyfile(test_hung=HUNG_TESTS)
    monkeypatch.setenv("DENGINE_TEST_HANG_SECONDS", "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*the test hung: still running after 1 s*"])
    # The test's captured output is in its failure report.
    err = result.stdout.str()
    assert "test still running after 1 s" in err
    assert "waits_for_ever" in err, "the asyncio task's stack is shown"
    assert "test_hangs_in_a_thread_join" in err, "the main thread's stack is shown"
