"""Custom storage engines: the conformance suite catches engines that break the durability rules,
and a custom engine's failures reach the node as the errors it handles."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from dengine.config import Config
from dengine.errors import ConfigError, LogIndexError, StorageError
from dengine.storage import Entry, GuardedLogStore, HardState, LogStore, MemoryLogStore, open_custom_log_store
from dengine.testing.logstore_conformance import LogStoreConformance, OpenStore


class JournalStore:
    """A small but correct engine: the log in memory, every change journaled to one file, the
    journal written and fsynced by ``sync()`` and by the calls that must be durable on return.

    ``flaw`` breaks one rule on purpose, the way a real engine gets it wrong."""

    flaw = ""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        os.makedirs(path, exist_ok=True)
        self._path = os.path.join(path, "journal")
        self._mem = MemoryLogStore()
        self._pending: list[list[Any]] = []
        self._held: HardState | None = None  # the "hard_state_at_close" flaw keeps it here
        if os.path.exists(self._path):
            with open(self._path) as f:
                for line in f:
                    self._replay(json.loads(line))
        self._file = open(self._path, "a")  # noqa: SIM115 - open for the store's lifetime
        self._durable = self._mem.last_index()

    def _replay(self, op: list[Any]) -> None:
        kind, *args = op
        if kind == "a":
            self._mem.append([Entry(i, t, bytes.fromhex(d)) for i, t, d in args[0]])
        elif kind == "h":
            self._mem.save_hard_state(HardState(*args))
        elif kind == "t":
            self._mem.truncate_suffix(*args)
        elif kind == "c":
            self._mem.compact_prefix(*args)
        else:
            self._mem.reset(*args)

    def _write(self, *, closing: bool = False) -> None:
        if self.flaw == "close_only" and not closing:
            return
        self._file.writelines(json.dumps(op) + "\n" for op in self._pending)
        self._pending.clear()
        self._file.flush()
        os.fsync(self._file.fileno())

    def first_index(self) -> int:
        return self._mem.first_index()

    def last_index(self) -> int:
        return self._mem.last_index()

    def term(self, index: int) -> int:
        return self._mem.term(index)

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        return self._mem.entries(lo, hi, max_bytes)

    def append(self, entries: Sequence[Entry]) -> None:
        self._mem.append(entries)
        self._pending.append(["a", [[e.index, e.term, e.data.hex()] for e in entries]])

    def truncate_suffix(self, index: int) -> None:
        self._mem.truncate_suffix(index)
        self._pending.append(["t", index])
        if self.flaw != "lazy_truncate":
            self._write()
        self._durable = min(self._durable, index - 1)

    def compact_prefix(self, index: int) -> None:
        self._mem.compact_prefix(index)
        self._pending.append(["c", index])
        self._write()

    def reset(self, index: int, term: int) -> None:
        self._mem.reset(index, term)
        self._pending.append(["r", index, term])
        self._write()
        self._durable = index

    def save_hard_state(self, hard_state: HardState) -> None:
        self._mem.save_hard_state(hard_state)
        if self.flaw == "hard_state_at_close":
            self._held = hard_state
        else:
            self._pending.append(["h", hard_state.term, hard_state.vote, hard_state.commit])

    def hard_state(self) -> HardState:
        return self._mem.hard_state()

    def sync(self) -> int:
        self._mem.last_index()  # raises LogClosedError once closed
        last = self._mem.last_index()
        self._write()
        self._durable = last
        return last

    def durable_index(self) -> int:
        return self._mem.last_index() if self.flaw == "durable_ahead" else self._durable

    def close(self) -> None:
        if self._file.closed:
            return
        if self._held is not None:
            self._pending.append(["h", self._held.term, self._held.vote, self._held.commit])
        self._write(closing=True)
        self._file.close()
        self._mem.close()

    def __enter__(self) -> JournalStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TestJournalStore(LogStoreConformance):
    """The baseline: without a flaw the journal engine passes the whole suite."""

    durable = True

    @pytest.fixture
    def open_store(self, tmp_path: Path) -> OpenStore:
        return lambda: JournalStore(tmp_path / "log")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash tests fork")
@pytest.mark.parametrize(
    ("flaw", "caught_by"),
    [
        ("close_only", "test_crash_keeps_synced_entries_and_hard_state"),
        ("hard_state_at_close", "test_crash_keeps_synced_entries_and_hard_state"),
        ("lazy_truncate", "test_crash_keeps_a_truncation_that_returned"),
        ("durable_ahead", "test_durable_index_counts_only_synced_entries"),
    ],
)
def test_the_suite_fails_an_engine_that_breaks_a_durability_rule(
    tmp_path: Path, flaw: str, caught_by: str
) -> None:
    """Each of these engines passes every test that reopens through ``close()``; only a crash (or,
    for durable_index, a look before any sync) tells them apart from a correct one."""
    flawed = type(f"Flawed_{flaw}", (JournalStore,), {"flaw": flaw})

    def open_store() -> JournalStore:
        store: JournalStore = flawed(tmp_path / "log")
        return store

    suite = LogStoreConformance()
    test = getattr(suite, caught_by)
    with pytest.raises(AssertionError):
        test(open_store() if caught_by == "test_durable_index_counts_only_synced_entries" else open_store)
    # A reopen through close() hides the flaw: the old durability test passes.
    suite.test_reopen_keeps_entries_and_hard_state(
        flawed(tmp_path / "other"), lambda: flawed(tmp_path / "other")
    )


# --- loading a custom engine: every failure is a ConfigError naming storage.engine and the cause


ENGINES = """\
import os, sys
sys.path.insert(0, {examples!r})
from sqlite_log_store import SQLiteLogStore
from dengine.storage import LogStore

class CtorRaises(SQLiteLogStore):
    def __init__(self, path):
        raise PermissionError(13, "Permission denied", str(path))

class NoPath(SQLiteLogStore):
    def __init__(self):
        pass

class AsyncSync(SQLiteLogStore):
    async def sync(self):
        return SQLiteLogStore.sync(self)

class ProtocolItself(LogStore):  # the Protocol's stubs would return None
    pass

class ExplicitProtocol(SQLiteLogStore, LogStore):  # subclassing the Protocol is fine when implemented
    pass
"""


@pytest.fixture
def engine_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    examples = str(Path(__file__).parent.parent / "docs" / "examples")
    (tmp_path / "engines_ok.py").write_text(ENGINES.format(examples=examples))
    (tmp_path / "engines_raise.py").write_text("raise RuntimeError('no licence for the disk')\n")
    (tmp_path / "engines_syntax.py").write_text("class (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def load(engine: str) -> type[LogStore]:
    data = {
        "node": {"id": 1},
        "cluster": {"id": "test", "members": {"1": "127.0.0.1:7001"}},
        "storage": {"engine": engine},
    }
    return Config.from_dict(data).storage.load_log_store_class()


@pytest.mark.parametrize(
    ("engine", "cause"),
    [
        ("engines_raise:Store", r"RuntimeError: no licence for the disk"),
        ("engines_syntax:Store", r"SyntaxError"),
        ("engines_ok:ProtocolItself", r"lacks .*append.*sync"),
        ("engines_ok:AsyncSync", r"sync is a coroutine function"),
    ],
)
def test_a_custom_engine_that_cannot_be_loaded_is_a_config_error(
    engine_modules: Path, engine: str, cause: str
) -> None:
    with pytest.raises(ConfigError, match=cause) as info:
        load(engine)
    assert info.value.key == "storage.engine" and engine in str(info.value)


@pytest.mark.parametrize(
    ("engine", "cause"),
    [
        ("engines_ok:CtorRaises", r"PermissionError: \[Errno 13\] Permission denied"),
        ("engines_ok:NoPath", r"must take the log directory path.*TypeError"),
    ],
)
def test_a_custom_engine_whose_constructor_fails_is_a_config_error(
    engine_modules: Path, engine: str, cause: str
) -> None:
    cls = load(engine)
    with pytest.raises(ConfigError, match=cause) as info:
        open_custom_log_store(engine, cls, engine_modules / "log")
    assert info.value.key == "storage.engine" and engine in str(info.value)


def test_an_explicit_subclass_of_the_protocol_loads_and_opens_guarded(engine_modules: Path) -> None:
    cls = load("engines_ok:ExplicitProtocol")
    store = open_custom_log_store("engines_ok:ExplicitProtocol", cls, engine_modules / "log")
    assert isinstance(store, GuardedLogStore) and isinstance(store.engine, cls)
    store.append([Entry(1, 1, b"x")])
    assert store.sync() == 1
    store.close()


# --- the guard the node puts around a custom engine


class Faulty(JournalStore):
    """Raises what a real library raises, from any method, on demand."""

    raise_from: dict[str, Exception]

    def __getattribute__(self, name: str) -> Any:
        errors = object.__getattribute__(self, "__dict__").get("raise_from", {})
        if name in errors:
            raise errors[name]
        return object.__getattribute__(self, name)


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("append", ([Entry(2, 1, b"y")],)),
        ("entries", (1, 2)),
        ("term", (1,)),
        ("first_index", ()),
        ("last_index", ()),
        ("save_hard_state", (HardState(1, 1, 0),)),
        ("hard_state", ()),
        ("truncate_suffix", (1,)),
        ("compact_prefix", (1,)),
        ("reset", (5, 1)),
        ("sync", ()),
        ("durable_index", ()),
        ("close", ()),
    ],
)
def test_the_guard_turns_any_engine_exception_into_a_storage_error_naming_the_method(
    tmp_path: Path, method: str, args: tuple[Any, ...]
) -> None:
    engine = Faulty(tmp_path / "log")
    engine.append([Entry(1, 1, b"x")])
    store = GuardedLogStore(engine)
    assert isinstance(store, LogStore)
    cause = OSError(5, "Input/output error")
    engine.raise_from = {method: cause}
    with pytest.raises(
        StorageError, match=rf"Faulty\.{method}\(\) failed: OSError: .*Input/output error"
    ) as info:
        getattr(store, method)(*args)
    assert info.value.__cause__ is cause
    engine.raise_from = {method: LogIndexError("beyond the end")}  # dengine's own errors pass as they are
    with pytest.raises(LogIndexError, match="beyond the end"):
        getattr(store, method)(*args)
    engine.raise_from = {}
    store.close()


@pytest.mark.parametrize("method", ["term", "sync"])
def test_the_guard_refuses_an_async_method_of_an_engine_handed_over_as_an_object(
    tmp_path: Path, method: str
) -> None:
    """An engine object given to ``Node(log_store=...)`` is not checked when it is loaded from the
    config: an ``async def`` method would hand the node a coroutine whose work never runs."""

    async def never_run(*args: object) -> int:
        raise AssertionError("the coroutine must be closed, not run")

    engine = Faulty(tmp_path / "log")
    engine.append([Entry(1, 1, b"x")])
    setattr(engine, method, never_run)
    store = GuardedLogStore(engine)
    with pytest.raises(
        StorageError, match=rf"Faulty\.{method}\(\) returned coroutine: log store methods must be plain"
    ):
        getattr(store, method)(*((1,) if method == "term" else ()))
    store.close()


def test_the_guarded_engine_passes_the_conformance_suite_and_survives_a_crash(tmp_path: Path) -> None:
    suite = LogStoreConformance()
    path = tmp_path / "log"
    suite.test_crash_keeps_synced_entries_and_hard_state(lambda: GuardedLogStore(JournalStore(path)))
    with GuardedLogStore(JournalStore(tmp_path / "other")) as store:
        store.append([Entry(1, 1, b"x")])
        assert store.entries(1, 2) == [Entry(1, 1, b"x")]
