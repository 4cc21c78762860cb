"""Makes the suite's helper modules (such as logstore_conformance) importable from tests, and
holds the fixtures several test modules share."""

import sys
from collections.abc import Iterator
from pathlib import Path
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
