"""Makes the suite's helper modules (such as logstore_conformance) importable from tests, and
holds the fixtures several test modules share."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
