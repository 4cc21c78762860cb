"""dengine.event_loop: which loop "auto", "uvloop" and "asyncio" mean, and that run() really
runs on it (a node started this way over real gRPC answers on either loop)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from dengine import event_loop
from dengine.config import Config
from dengine.devcluster import free_ports
from dengine.kv import KVStateMachine, encode_put
from dengine.node import Node
from test_node_embedded import leader_of, until

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_uvloop = pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed (Windows)")


def hide_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop, "_uvloop_installed", lambda: False)


async def loop_name() -> str:
    await asyncio.sleep(0)
    return event_loop.running_loop_name()


def test_auto_is_uvloop_where_installed_and_asyncio_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert event_loop.resolve("auto") == ("uvloop" if HAS_UVLOOP else "asyncio")
    assert event_loop.resolve("asyncio") == "asyncio"
    hide_uvloop(monkeypatch)
    assert event_loop.resolve("auto") == "asyncio"
    assert event_loop.run(loop_name()) == "asyncio"


def test_uvloop_where_it_is_missing_and_an_unknown_loop_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="must be one of auto, uvloop, asyncio, not 'trio'"):
        event_loop.resolve("trio")
    hide_uvloop(monkeypatch)
    main = loop_name()
    with pytest.raises(ImportError, match="uvloop is not installed here"):
        event_loop.run(main, loop="uvloop")
    main.close()


@needs_uvloop
def test_run_runs_on_the_loop_it_is_asked_for() -> None:
    assert event_loop.run(loop_name(), loop="uvloop") == "uvloop"
    assert event_loop.run(loop_name(), loop="auto") == "uvloop"
    assert event_loop.run(loop_name(), loop="asyncio") == "asyncio"
    # Like asyncio.run: a fresh loop each time, and no loop left set for the thread.
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def node_config(tmp_path: Path) -> Config:
    (port,) = free_ports(1)
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nid = 1\nlisten = "127.0.0.1:{port}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'metrics_listen = ""\n[cluster]\nid = "loops"\nmembers = {{ 1 = "127.0.0.1:{port}" }}\n'
        "[raft]\ntick_ms = 10\nheartbeat_ms = 30\nelection_timeout_ms = 200\n"
    )
    return Config.load(path)


@pytest.mark.parametrize("loop", ["asyncio", pytest.param("uvloop", marks=needs_uvloop)])
def test_a_node_elects_itself_writes_and_restarts_on_either_loop(tmp_path: Path, loop: str) -> None:
    config = node_config(tmp_path)

    async def session(first: bool) -> tuple[str, bytes]:
        sm = KVStateMachine()
        async with Node(config, sm) as node:
            await until(lambda: leader_of([node]))
            if first:
                await node.propose(encode_put(b"k", b"v"), timeout=10)
            value = await asyncio.wait_for(node.read(lambda m: m.get(b"k")), 10)
            return event_loop.running_loop_name(), value.value if value else b""

    assert event_loop.run(session(True), loop=loop) == (loop, b"v")
    # The fsync'd log written on this loop is read back on a new one.
    assert event_loop.run(session(False), loop=loop) == (loop, b"v")


@pytest.mark.skipif(sys.platform == "win32", reason="no uvloop")
def test_the_package_depends_on_uvloop_off_windows() -> None:
    from importlib import metadata  # noqa: PLC0415

    requires = metadata.requires("dengine") or []
    assert any(r.startswith("uvloop") and "win32" in r for r in requires), requires
