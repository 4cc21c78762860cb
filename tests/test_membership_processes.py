"""Membership with real `dengine serve` processes while a client writes without pause: grow 3 voters
to 5 (nodes joining with --join, promoted automatically) and shrink back to 3 (the leader removed
too), hand leadership over under load, and replace a node whose disk was wiped. No acknowledged
write may be lost, and the client may see no error: leader changes are retried inside it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dengine.client import Client
from test_client import wait_until

from cluster_procs import ProcCluster, running_cluster, wait_for

MEMBERSHIP = """
[membership]
promote = "auto"
caught_up_for_ms = 300
max_lag_entries = 200
"""


class Writer(threading.Thread):
    """Writes keys continuously (16 in flight) through dengine.Client; records what was acked."""

    def __init__(self, endpoints: str) -> None:
        super().__init__(daemon=True)
        self.endpoints = endpoints
        self.acked: list[bytes] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with Client(self.endpoints, timeout=30) as client:
            n = 0
            while not self.stopping.is_set():
                keys = [b"w%07d" % (n + i) for i in range(16)]
                n += 16
                results = await asyncio.gather(*(client.put(k, k) for k in keys), return_exceptions=True)
                for k, r in zip(keys, results, strict=True):
                    if isinstance(r, BaseException):
                        self.errors.append(r)
                    else:
                        self.acked.append(k)

    def finish(self) -> None:
        self.stopping.set()
        self.join(timeout=60)


@contextlib.contextmanager
def writing(cluster: ProcCluster) -> Iterator[Writer]:
    """A Writer through nodes 1-3 for the length of the block; on leaving, it stops, and none of
    its writes may have failed (leader changes are retried inside the client)."""
    writer = Writer(",".join(cluster.address(i) for i in (1, 2, 3)))
    writer.start()
    try:
        yield writer
    finally:
        writer.finish()
    assert not writer.errors, writer.errors[:3]


def member_cli(cluster: ProcCluster, endpoints: list[int], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dengine",
            "member",
            *args,
            "--endpoints",
            ",".join(cluster.address(i) for i in endpoints),
            "--timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def voters(cluster: ProcCluster, among: list[int]) -> set[int]:
    leader = cluster.wait_leader(among=among)
    status = cluster.status(leader)
    assert status is not None
    return set(status.voters)


def promoted(cluster: ProcCluster, node: int) -> Callable[[], bool]:
    return lambda: node in voters(cluster, [1, 2, 3])


def assert_all_readable(cluster: ProcCluster, among: list[int], keys: list[bytes]) -> None:
    endpoints = ",".join(cluster.address(i) for i in among)

    async def main() -> None:
        async with Client(endpoints, timeout=30) as client:
            for k in keys:
                kv = await client.get(k)
                assert kv is not None and kv.value == k, f"acknowledged write {k!r} is lost"

    asyncio.run(main())


def test_grow_to_five_and_shrink_to_three_while_writing(tmp_path: Path) -> None:
    with running_cluster(tmp_path, extra_toml=MEMBERSHIP) as cluster:
        with writing(cluster) as writer:
            for new in (4, 5):
                cluster.add_joiner(new)
                cluster.start(new, join=cluster.address(1))
                wait_for(promoted(cluster, new), 60, f"node {new} to be promoted")
            assert voters(cluster, [1, 2, 3, 4, 5]) == {1, 2, 3, 4, 5}
            # Hand leadership over under load, then remove the (new) leader and one more voter.
            moved = subprocess.run(
                [sys.executable, "-m", "dengine", "leader", "transfer", "--endpoints", cluster.address(4)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert moved.returncode == 0, moved.stderr
            everyone = [1, 2, 3, 4, 5]
            leader = cluster.wait_leader(among=everyone)
            result = member_cli(cluster, everyone, "remove", str(leader))
            assert result.returncode == 0, result.stderr
            rest = [i for i in everyone if i != leader]
            wait_for(lambda: cluster.leader(among=rest) is not None, 30, "a leader among the others")
            other = next(i for i in rest if i != cluster.leader(among=rest))
            result = member_cli(cluster, rest, "remove", str(other))
            assert result.returncode == 0, result.stderr
            remaining = [i for i in rest if i != other]
            listed = member_cli(cluster, remaining, "list", "--output", "json")
            assert listed.returncode == 0, listed.stderr
            assert sorted(m["id"] for m in json.loads(listed.stdout) if m["role"] == "voter") == remaining
            before = len(writer.acked)
            wait_for(lambda: len(writer.acked) > before + 100, 30, "writes to go on after the changes")
        assert len(writer.acked) > 500
        assert_all_readable(cluster, remaining, writer.acked)


def lose_a_follower_for_good(cluster: ProcCluster, writer: Writer, writes: int) -> tuple[int, list[int]]:
    """After ``writes`` acknowledged writes, kills a follower and wipes its disk; returns it and
    the survivors."""
    leader = cluster.wait_leader()
    victim = next(i for i in (1, 2, 3) if i != leader)
    wait_for(lambda: len(writer.acked) > writes, 60, "some writes")
    cluster.kill(victim)
    shutil.rmtree(cluster.root / f"data{victim}")  # the disk is gone
    return victim, [i for i in (1, 2, 3) if i != victim]


def test_replace_a_node_whose_disk_was_wiped(tmp_path: Path) -> None:
    extra = MEMBERSHIP.replace('"auto"', '"manual"') + "\n[snapshot]\nentries = 500\ntrailing_entries = 50\n"
    with running_cluster(tmp_path, extra_toml=extra) as cluster:
        with writing(cluster) as writer:
            victim, survivors = lose_a_follower_for_good(cluster, writer, 1000)
            address = cluster.add_joiner(6)
            # Added by the operator first; its --join then finds itself a member already.
            result = member_cli(cluster, survivors, "add-learner", "6", address)
            assert result.returncode == 0, result.stderr
            assert "learners [6]" in result.stdout
            cluster.start(6, join=cluster.address(survivors[0]))
            wait_for(
                lambda: (s := cluster.status(6)) is not None and s.applied_index > 1000,
                60,
                "node 6 to catch up",
            )
            result = member_cli(cluster, survivors, "promote", "6")
            assert result.returncode == 0, result.stderr
            result = member_cli(cluster, survivors, "remove", str(victim))
            assert result.returncode == 0, result.stderr
            assert voters(cluster, [*survivors, 6]) == {*survivors, 6}
            before = len(writer.acked)
            wait_for(lambda: len(writer.acked) > before + 100, 30, "writes to go on")
        assert_all_readable(cluster, [*survivors, 6], writer.acked)


def test_member_replace_does_it_in_one_command_and_can_be_run_again(tmp_path: Path) -> None:
    extra = MEMBERSHIP.replace('"auto"', '"manual"')
    with running_cluster(tmp_path, extra_toml=extra) as cluster:
        with writing(cluster) as writer:
            victim, survivors = lose_a_follower_for_good(cluster, writer, 500)
            address = cluster.add_joiner(7)
            endpoints = ",".join(cluster.address(i) for i in survivors)
            command = [sys.executable, "-m", "dengine", "member", "replace", str(victim), "7", address]
            command += ["--endpoints", endpoints, "--wait", "60"]
            # The command adds node 7 and waits for it to catch up; the operator starts it meanwhile.
            replacing = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

            def added() -> bool:
                status = cluster.status(cluster.wait_leader(among=survivors))
                return status is not None and 7 in status.learners

            wait_for(added, 30, "node 7 to be added as a learner")
            cluster.start(7, join=cluster.address(survivors[0]))
            out, err = replacing.communicate(timeout=90)
            assert replacing.returncode == 0, err
            assert out.strip() == f"voters {sorted([*survivors, 7])}, learners []"
            assert voters(cluster, [*survivors, 7]) == {*survivors, 7}
            again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            assert again.returncode == 0, again.stderr  # already done: nothing to do
            before = len(writer.acked)
            wait_for(lambda: len(writer.acked) > before + 100, 30, "writes to go on")
        assert_all_readable(cluster, [*survivors, 7], writer.acked)


def recover_cli(cluster: ProcCluster, node: int, *args: str) -> subprocess.CompletedProcess[str]:
    config = str(cluster.root / f"node{node}.toml")
    return subprocess.run(
        [sys.executable, "-m", "dengine", "recover", "--config", config, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_recover_a_cluster_that_lost_two_of_its_three_nodes_for_good(tmp_path: Path) -> None:
    extra = MEMBERSHIP + "\n[snapshot]\nentries = 400\ntrailing_entries = 50\n"
    with running_cluster(tmp_path, extra_toml=extra) as cluster:
        with writing(cluster) as writer:
            wait_for(lambda: len(writer.acked) > 1500, 60, "some writes")
        leader = cluster.wait_leader()
        survivor = next(i for i in (1, 2, 3) if i != leader)
        lost = [i for i in (1, 2, 3) if i != survivor]
        commit = cluster.status(leader)
        assert commit is not None

        def caught_up() -> bool:
            s = cluster.status(survivor)
            return s is not None and s.applied_index >= commit.commit_index

        wait_for(caught_up, 30, f"node {survivor} to apply every acknowledged write")
        for i in (1, 2, 3):
            cluster.kill(i)
        for i in lost:
            shutil.rmtree(tmp_path / f"data{i}")  # two disks gone for good

        # Alone, the survivor can never elect a leader; and recover refuses a running node.
        cluster.start(survivor)
        wait_for(lambda: cluster.status(survivor) is not None, 20, f"node {survivor} to serve")
        running = recover_cli(cluster, survivor, "--yes")
        assert running.returncode == 1, running.stdout
        assert running.stderr.startswith("dengine recover: ") and "Traceback" not in running.stderr
        assert cluster.leader(among=[survivor]) is None
        cluster.kill(survivor)

        looked = recover_cli(cluster, survivor, "--dry-run", "--output", "json")
        assert looked.returncode == 0, looked.stderr
        report = json.loads(looked.stdout)
        assert report["voters_before"] == [1, 2, 3] and not report["applied"]
        assert report["index"] == report["last_index"] + 1 and report["snapshot_index"] > 0
        unconfirmed = recover_cli(cluster, survivor)
        assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
        done = recover_cli(cluster, survivor, "--yes")
        assert done.returncode == 0, done.stderr
        assert f"node {survivor} is now the only voter" in done.stdout
        assert "nothing to do" in recover_cli(cluster, survivor, "--yes").stdout  # twice is harmless

        cluster.start(survivor)
        assert cluster.wait_leader(among=[survivor]) == survivor
        assert_all_readable(cluster, [survivor], writer.acked)
        # Grow back with new members on new disks; then lose the survivor too.
        members = [survivor]
        for new in (4, 5):
            cluster.add_joiner(new)
            cluster.start(new, join=cluster.address(survivor))
            members.append(new)
            wait_for(lambda n=new: n in voters(cluster, members), 60, f"node {new} to be promoted")  # type: ignore[misc]
        assert voters(cluster, [survivor, 4, 5]) == {survivor, 4, 5}
        cluster.kill(survivor)
        assert cluster.wait_leader(among=[4, 5]) in (4, 5)
        assert_all_readable(cluster, [4, 5], writer.acked)


def test_a_member_removed_while_down_exits_when_restarted_saying_why(tmp_path: Path) -> None:
    """The member being replaced is usually down when it is removed, so it never receives its
    removal. Restarted by mistake (or by a supervisor), `dengine serve` must not campaign for ever
    against members that refuse it: it exits, with one line saying it was removed."""
    with running_cluster(tmp_path) as cluster:
        leader = cluster.wait_leader()
        victim = next(i for i in (1, 2, 3) if i != leader)
        survivors = [i for i in (1, 2, 3) if i != victim]
        cluster.put(b"before", b"1")
        cluster.kill(victim)
        result = member_cli(cluster, survivors, "remove", str(victim))
        assert result.returncode == 0, result.stderr
        time.sleep(20 * 0.4)  # the members' grace for departed members (20 election timeouts)
        cluster.start(victim)
        assert_exits_saying_it_was_removed(cluster, tmp_path, victim, timeout=30)
        assert cluster.put(b"after", b"2") > 0, "the cluster serves on"


def test_a_client_that_only_watches_hears_of_members_added_while_its_watch_stays_open(tmp_path: Path) -> None:
    """A watch can stay on one node while the others are replaced: the client asks again for the
    members every few seconds, so that it still knows an address of the cluster when that node
    goes too (a chaos run once lost its watch that way: all three nodes it had known replaced)."""
    with running_cluster(tmp_path, extra_toml=MEMBERSHIP.replace('"auto"', '"manual"')) as cluster:
        leader = cluster.wait_leader()
        follower = next(i for i in (1, 2, 3) if i != leader)
        address = cluster.add_joiner(4)

        async def main() -> None:
            async with Client([cluster.address(follower)]) as watcher:

                async def watch() -> None:
                    async for _ in watcher.watch(b"w"):
                        pass

                task = asyncio.create_task(watch())
                try:
                    await wait_until(lambda: len(watcher.endpoints) == 3, 10)  # learned at connect
                    admin = Client([cluster.address(leader)])
                    async with admin:
                        await admin.add_learner(4, address)
                    cluster.start(4, join=cluster.address(leader))
                    await wait_until(lambda: address in watcher.endpoints, 15)
                    assert not task.done(), "the watch stayed open on its node"
                finally:
                    task.cancel()

        asyncio.run(main())


def test_a_learner_removed_while_it_runs_exits_saying_why(tmp_path: Path) -> None:
    """A learner never campaigns: it learns of its removal by telling the voters it is alive once
    it hears no leader, and being refused (``dengine.removal``)."""
    with running_cluster(tmp_path, extra_toml=MEMBERSHIP.replace('"auto"', '"manual"')) as cluster:
        cluster.wait_leader()
        cluster.put(b"before", b"1")
        address = cluster.add_joiner(4)
        result = member_cli(cluster, [1, 2, 3], "add-learner", "4", address)
        assert result.returncode == 0, result.stderr
        cluster.start(4, join=cluster.address(1))

        def caught_up() -> bool:
            status = cluster.status(4)
            return status is not None and status.applied_index > 1

        wait_for(caught_up, 30, "node 4 to catch up")
        result = member_cli(cluster, [1, 2, 3], "remove", "4")
        assert result.returncode == 0, result.stderr
        # The members' grace for departed members (20 election timeouts), then its probes.
        assert_exits_saying_it_was_removed(cluster, tmp_path, 4, timeout=20 * 0.4 + 30)
        assert cluster.put(b"after", b"2") > 0, "the cluster serves on"


def assert_exits_saying_it_was_removed(cluster: ProcCluster, root: Path, node: int, timeout: float) -> None:
    code = cluster.procs[node].wait(timeout=timeout)
    output = (root / f"node{node}.log").read_text()
    last = output.strip().splitlines()[-1]
    assert code == 1, output[-2000:]
    assert last.startswith(f"dengine serve: node {node}: the node stopped after its removal"), last
    assert "no longer know it" in last and "Traceback" not in output.split("removed from cluster")[-1]


@pytest.mark.parametrize("catch_up", ["log", "snapshot"])
def test_a_member_down_while_a_node_was_added_catches_up_from_that_node_as_leader(
    tmp_path: Path, catch_up: str
) -> None:
    """Raft §4.1 of Ongaro's dissertation: a server takes messages from servers outside its
    configuration. A member that was down while node 4 was added, and restarted after node 4
    took over as leader, has never appended the entry that names node 4: refusing node 4 as
    unknown, it would never learn of it and stay behind for good, one voter of slack lost. It
    catches up from node 4's log, or, after node 4 compacted it, from node 4's snapshot."""
    snapshots = (
        "\n[snapshot]\nentries = 100\ntrailing_entries = 0\nlog_factor = 0\n"
        if catch_up == "snapshot"
        else ""
    )
    with running_cluster(tmp_path, extra_toml=MEMBERSHIP + snapshots) as cluster:
        leader = cluster.wait_leader()
        sleeper = next(i for i in (1, 2, 3) if i != leader)
        awake = [i for i in (1, 2, 3) if i != sleeper]
        cluster.put(b"before", b"1")
        cluster.kill(sleeper)
        cluster.add_joiner(4)
        cluster.start(4, join=cluster.address(awake[0]))
        wait_for(lambda: 4 in voters(cluster, awake), 60, "node 4 to be promoted")
        transfer = [sys.executable, "-m", "dengine", "leader", "transfer", "4"]
        moved = subprocess.run(
            [*transfer, "--endpoints", cluster.address(awake[0])],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert moved.returncode == 0, moved.stderr
        assert cluster.wait_leader(among=[*awake, 4]) == 4
        for i in range(300 if catch_up == "snapshot" else 1):
            cluster.put(b"k%d" % i, b"v")
        cluster.put(b"after", b"2")
        status = cluster.status(4)
        assert status is not None
        commit = status.commit_index

        cluster.start(sleeper)

        def caught_up() -> bool:
            s = cluster.status(sleeper)
            return s is not None and s.applied_index >= commit and 4 in s.voters

        wait_for(caught_up, 30, f"node {sleeper} to catch up from node 4 and learn of it")
        assert cluster.try_get(sleeper, b"after") == b"2"


def test_a_member_restarted_on_a_wiped_data_dir_refuses_to_vote_as_the_member_it_was(tmp_path: Path) -> None:
    """A member whose disk was wiped (or whose node.data_dir was mistyped) would start as an
    empty voter: it may have voted, and acknowledged entries, that it no longer remembers, and
    its vote could elect a lagging node that misses acknowledged writes. The leader has seen it
    hold entries, so it stops at start saying what to do; the cluster serves on."""
    with running_cluster(tmp_path) as cluster:
        leader = cluster.wait_leader()
        victim = next(i for i in (1, 2, 3) if i != leader)
        cluster.put(b"acknowledged", b"1")

        def leader_saw_it() -> bool:
            s = cluster.status(leader)
            return s is not None and any(p.id == victim and p.match_index > 0 for p in s.peers)

        wait_for(leader_saw_it, 10, f"the leader to see node {victim} hold entries")
        cluster.kill(victim)
        shutil.rmtree(tmp_path / f"data{victim}")
        cluster.start(victim)
        code = cluster.procs[victim].wait(timeout=30)
        output = (tmp_path / f"node{victim}.log").read_text()
        last = output.strip().splitlines()[-1]
        assert code == 1, output[-2000:]
        assert last.startswith(f"dengine serve: node {victim} starts on an empty data dir"), last
        assert f"leader {leader}" in last and f"member replace {victim}" in last
        cluster.start(victim)  # the empty log it opened does not make it a member with data
        assert cluster.procs[victim].wait(timeout=30) == 1
        # Told to join, it would hear it is a member already and go on with nothing.
        cluster.start(victim, join=cluster.address(leader))
        assert cluster.procs[victim].wait(timeout=30) == 1
        last = (tmp_path / f"node{victim}.log").read_text().strip().splitlines()[-1]
        assert last.startswith(f"dengine serve: node {victim} starts on an empty data dir"), last
        assert cluster.put(b"after", b"2") > 0, "the cluster serves on"
