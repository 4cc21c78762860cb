"""dengine.recovery on a real write-ahead log: the node keeps every entry it holds (past its
commit index too), becomes its cluster's only voter, and then commits and applies them all. The
process-level scenario (two of three disks lost) is in test_membership_processes.py."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from dengine.config import Config
from dengine.devcluster import free_ports
from dengine.errors import StorageError
from dengine.identity import FILE_NAME
from dengine.kv import KVStateMachine, encode_put
from dengine.node import Node, open_node_log
from dengine.raft import membership
from dengine.raft.payload import command, decode
from dengine.recovery import RecoveryError, recover
from dengine.storage import Entry, HardState
from test_node_embedded import leader_of, until

# The custom engine of docs/storage-engines.md: recovery goes through the LogStore protocol alone.
sys.path.insert(0, str(Path(__file__).parent.parent / "docs" / "examples"))
ENGINES = ["file", "sqlite_log_store:SQLiteLogStore"]


def node_config(tmp_path: Path, engine: str = "file") -> Config:
    ports = free_ports(3)
    members = ", ".join(f'{i} = "127.0.0.1:{p}"' for i, p in enumerate(ports, start=1))
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "node1.toml"
    path.write_text(
        f'[node]\nid = 1\nlisten = "127.0.0.1:{ports[0]}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'metrics_listen = ""\n[cluster]\nid = "lost"\nmembers = {{ {members} }}\n'
        "[raft]\ntick_ms = 10\nheartbeat_ms = 30\nelection_timeout_ms = 200\n"
        f'[storage]\nengine = "{engine}"\n'
    )
    return Config.load(path)


def write_log(config: Config, entries: int, *, term: int, commit: int) -> None:
    """The log a follower of a 3-node cluster might hold: ``entries`` puts, ``commit`` known."""
    with open_node_log(config) as store:
        store.append(
            [Entry(i, term, command(encode_put(b"k%d" % i, b"v%d" % i))) for i in range(1, entries + 1)]
        )
        store.save_hard_state(HardState(term, 2, commit))
        store.sync()


@pytest.mark.parametrize("engine", ENGINES)
def test_recovery_keeps_every_entry_and_the_node_then_applies_them_alone(tmp_path: Path, engine: str) -> None:
    config = node_config(tmp_path, engine)
    write_log(config, 10, term=3, commit=4)
    looked = recover(config, dry_run=True)
    assert (looked.voters_before, looked.last_index, looked.commit, looked.index) == ((1, 2, 3), 10, 4, 11)
    assert not looked.applied
    with open_node_log(config) as store:
        assert store.last_index() == 10  # a dry run writes nothing

    done = recover(config)
    assert done.applied and (done.index, done.term) == (11, 3)
    with open_node_log(config) as store:
        (entry,) = store.entries(11, 12)
    change = membership.decode(decode(entry.data).command)
    assert change.op is membership.ConfOp.RECOVER
    assert (change.voters, change.learners) == (frozenset({1}), frozenset())
    assert change.addresses == {1: config.node.advertise}
    assert not recover(config).applied  # already the only voter: nothing more is written

    async def serve() -> list[bytes | None]:
        sm = KVStateMachine()
        async with Node(config, sm) as node:
            await until(lambda: leader_of([node]))

            def values(m: KVStateMachine) -> list[bytes | None]:
                return [(kv.value if (kv := m.get(b"k%d" % i)) else None) for i in range(1, 11)]

            return await asyncio.wait_for(node.read(values), 10)

    # Entries 5-10 were past the recorded commit index: kept, committed, applied.
    assert asyncio.run(serve()) == [b"v%d" % i for i in range(1, 11)]


def test_what_cannot_be_recovered_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(RecoveryError, match="holds no log: node 1 has nothing to recover from"):
        recover(node_config(tmp_path / "a"))
    empty = node_config(tmp_path / "b")
    open_node_log(empty).close()
    with pytest.raises(RecoveryError, match="no log entries and no snapshot"):
        recover(empty)
    memory = Config.from_dict(
        {
            "node": {"id": 1},
            "cluster": {"id": "c", "members": {1: "127.0.0.1:7001", 2: "127.0.0.1:7002"}},
            "storage": {"engine": "memory"},
        }
    )
    with pytest.raises(RecoveryError, match="keeps nothing on disk"):
        recover(memory)


def test_a_node_whose_log_is_open_is_not_recovered(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    write_log(config, 3, term=1, commit=3)
    with open_node_log(config), pytest.raises(StorageError, match="already open in another process"):
        recover(config)
    assert recover(config).applied  # once the other holder closed it


def test_a_data_dir_of_another_node_or_cluster_is_not_recovered(tmp_path: Path) -> None:
    """A wrong --data-dir (or node.id) would make node 1 the only voter in node 2's log; recover
    checks the data dir's identity before it reads or writes anything."""
    config = node_config(tmp_path)
    write_log(config, 3, term=2, commit=1)
    data = Path(config.node.data_dir)
    (data / FILE_NAME).write_text('{"format": 1, "cluster": "lost", "node": 2, "voters": [1, 2, 3]}')
    with open_node_log(config) as store:
        before = store.last_index()
    with pytest.raises(RecoveryError, match="belongs to node 2"):
        recover(config)
    (data / FILE_NAME).write_text('{"format": 1, "cluster": "other", "node": 1, "voters": [1, 2, 3]}')
    with pytest.raises(RecoveryError, match="belongs to cluster 'other'"):
        recover(config, dry_run=True)
    with open_node_log(config) as store:
        assert store.last_index() == before, "nothing written"
    (data / FILE_NAME).write_text('{"format": 1, "cluster": "lost", "node": 1, "voters": [1, 2, 3]}')
    assert recover(config).applied, "its own data dir is recovered"
