"""Network faults between real processes: a TCP proxy in front of each node's peer address.

Nodes reach node ``j`` through its proxy, so the test can cut what ``j`` hears from its peers
without touching the process: ``blackhole`` holds every byte (connections stay open and stall,
as when packets vanish: only gRPC's keepalive or the protocol's own timeouts notice), ``drop``
resets every connection and refuses new ones (as when a host answers with resets), ``pass``
heals. A node behind a cut proxy still sends: its requests arrive, their answers do not reach it
(an asymmetric partition). The proxies run in a child process of their own, so forwarding
never waits on the test's event loop or its GIL; the test drives them through
:class:`Proxies` (one command per line on the child's stdin, acknowledged on its stdout).

Run alone: ``python tests/net_proxy.py LISTEN:TARGET ...`` (ports on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Literal, cast

Mode = Literal["pass", "blackhole", "drop"]
_MODES = ("pass", "blackhole", "drop")


class _Proxy:
    def __init__(self, target: int) -> None:
        self.target = target
        self.mode: Mode = "pass"
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.held: set[asyncio.StreamWriter] = set()  # accepted while cut, not yet forwarded

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode == "pass":
            self.flowing.set()
        else:
            self.flowing.clear()
        if mode == "drop":
            for a, b in list(self.conns):
                a.transport.abort()
                b.transport.abort()
            for w in list(self.held):
                w.transport.abort()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "drop":
            writer.transport.abort()
            return
        if self.mode == "blackhole":
            # A connection made while the link is cut waits, accepted but unanswered.
            self.held.add(writer)
            await self.flowing.wait()
            self.held.discard(writer)
            if writer.is_closing():
                return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()  # the node is down: so is the link
            return
        pair = (writer, up_writer)
        self.conns.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.conns.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            # Cut: stop reading, so the sender's socket buffers fill and its writes stall.
            if not self.flowing.is_set():
                await self.flowing.wait()
            writer.write(data)
            await writer.drain()
        # One side closed: a gRPC connection is not half-closed, so close both.
        writer.transport.abort()


async def _serve(pairs: list[tuple[int, int]]) -> None:
    loop = asyncio.get_running_loop()
    proxies: dict[int, _Proxy] = {}
    for listen, target in pairs:
        proxy = proxies[listen] = _Proxy(target)
        await asyncio.start_server(proxy.handle, "127.0.0.1", listen)
    print("ready", flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        port, mode = line.split()
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}")
        proxies[int(port)].set_mode(cast(Mode, mode))
        print("ok", flush=True)


class Proxies:
    """The proxy process for a cluster: ``set(port, mode)`` changes the link in front of the
    node behind ``port`` (a proxy's listening port) and returns once it is in force."""

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        spec = [f"{listen}:{target}" for listen, target in pairs]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()  # one command and its answer at a time
        self._expect("ready")

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"the proxy process answered {line!r}, not {word!r}")

    def set(self, port: int, mode: Mode) -> None:
        assert self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(f"{port} {mode}\n")
            self.proc.stdin.flush()
            self._expect("ok")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(_serve([(int(a), int(b)) for a, b in (arg.split(":") for arg in sys.argv[1:])]))
