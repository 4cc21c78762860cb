"""gRPC settings for a process that runs dengine nodes or clients.

grpcio does its socket I/O through its newer EventEngine by default. On Linux the I/O manager it
still ships alongside (its own default until recently) costs ``grpc.aio`` fewer thread hand-offs
per message, and every dengine write is four messages (client to leader, leader to followers and
back, leader to client). Measured with ``benchmarks/bench_vs_etcd.py`` on the 2-core machine of
``benchmarks/RESULTS.md``, with and without it in alternating runs: the p50 of a write at 1 in
flight 12-20% lower, saturated writes up to 15% more per second.

The choice goes through grpc's ``GRPC_EXPERIMENTS`` environment variable, which grpc reads once,
when it is first imported. So :func:`tune_grpc` works only before anything imports ``grpc``. Every
``dengine`` command (``serve``, ``cluster``, ``demo``, ``kv``, ...) calls it first; an embedding
program or a client application opts in by calling it at the top of its main module. It leaves
the process alone where the setting was not verified (other platforms, other grpcio releases, an
operator's own ``GRPC_EXPERIMENTS``), since a grpc that does not know the names logs an error.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

__all__ = ["LEGACY_IO_EXPERIMENTS", "VERIFIED_GRPCIO", "recommended_experiments", "tune_grpc"]

LEGACY_IO_EXPERIMENTS = "-event_engine_listener,-event_engine_client"
"""The ``GRPC_EXPERIMENTS`` value: grpc's servers and channels on its own I/O manager."""

VERIFIED_GRPCIO = ((1, 85),)
"""grpcio (major, minor) releases the experiment names were checked against, and measured."""


def _grpcio_release() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("grpcio").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def recommended_experiments() -> str | None:
    """The ``GRPC_EXPERIMENTS`` value for processes on this machine (:data:`LEGACY_IO_EXPERIMENTS`),
    or None where it was not verified: off Linux, or with a grpcio release not in
    :data:`VERIFIED_GRPCIO`. For a launcher setting up the environment of other processes."""
    if sys.platform.startswith("linux") and _grpcio_release() in VERIFIED_GRPCIO:
        return LEGACY_IO_EXPERIMENTS
    return None


def tune_grpc() -> bool:
    """Selects grpc's I/O manager for this process, if it is not too late and the setting is
    known to work here. Returns whether it did: False when ``grpc`` is already imported, when
    ``GRPC_EXPERIMENTS`` is already set, or where :func:`recommended_experiments` has nothing."""
    if "grpc" in sys.modules or "GRPC_EXPERIMENTS" in os.environ:
        return False
    value = recommended_experiments()
    if value is None:
        return False
    os.environ["GRPC_EXPERIMENTS"] = value
    return True
