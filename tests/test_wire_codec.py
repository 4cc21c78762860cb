"""The peer wire codec: round trips, and refusal of anything a peer should not have sent."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dengine._core import Entry, EntryBatch, encode_entries
from dengine.raft import Message, MsgType
from dengine.transport.codec import (
    ReceivedChunk,
    Sender,
    UnknownSenderError,
    WireError,
    check_snapshot_header,
    from_wire,
    to_wire,
)
from dengine.v1 import raft_pb2

MEMBERS = {1, 2, 3}


def decode(w: raft_pb2.RaftMessage) -> Message:
    return from_wire(w, cluster_id="c1", me=2, members=MEMBERS)


def test_round_trip_of_an_append_with_entries() -> None:
    entries = [Entry(6, 3, b"a"), Entry(7, 3, b""), Entry(8, 4, b"\x00" * 1000)]
    m = Message(MsgType.APP, 1, 2, 4, index=5, log_term=3, entries=entries, commit=5, context=9)
    back = decode(to_wire(m, "c1"))
    assert isinstance(back.entries, EntryBatch), "a follower gets them framed, not as an object each"
    assert list(back.entries) == entries
    assert dataclasses.replace(back, entries=entries) == m


def test_round_trip_of_forwarded_proposals_and_rejections() -> None:
    prop = Message(MsgType.PROP, 3, 2, 1, payloads=[b"x", b"y"])
    assert decode(to_wire(prop, "c1")).payloads == (b"x", b"y")
    rej = Message(MsgType.APP_RESP, 3, 2, 7, index=10, reject=True, reject_hint=4, log_term=2)
    assert decode(to_wire(rej, "c1")) == rej


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"cluster_id": "other"}, "cluster 'other'"),
        ({"from": 9}, "unknown node 9"),
        ({"to": 3}, "for node 3"),
        ({"type": 99}, "unknown message type"),
        ({"term": 2**63}, "term"),
    ],
)
def test_refusals(change: dict[str, object], reason: str) -> None:
    w = to_wire(Message(MsgType.HEARTBEAT, 1, 2, 1), "c1")
    for key, value in change.items():
        setattr(w, key, value)
    with pytest.raises(WireError, match=reason):
        decode(w)


def test_damaged_or_misplaced_entries_are_refused() -> None:
    good = encode_entries([Entry(6, 3, b"payload")])
    damaged = bytearray(good)
    damaged[-2] ^= 1
    w = to_wire(Message(MsgType.APP, 1, 2, 3, index=5, log_term=3), "c1")
    w.entries = bytes(damaged)
    with pytest.raises(WireError, match="damaged entries"):
        decode(w)
    w.entries = good
    w.index = 7  # entries must follow the index they are appended after
    with pytest.raises(WireError, match="not after index 7"):
        decode(w)


def test_a_received_snapshot_chunk_is_read_in_place() -> None:
    header = raft_pb2.SnapshotHeader(cluster_id="c", term=3, index=9, log_term=2, size=100, sha256=b"s" * 32)
    data = bytes(range(256)) * 4
    message = raft_pb2.SnapshotChunk(header=header, offset=1 << 33, data=data, crc32c=0xFFFFFFFF)
    raw = message.SerializeToString()
    chunk = ReceivedChunk.parse(raw)
    assert chunk.header == header and (chunk.offset, chunk.crc32c) == (1 << 33, 0xFFFFFFFF)
    assert chunk.buffer is raw and raw[chunk.start : chunk.start + chunk.length] == data
    assert ReceivedChunk.of(message).buffer == data


@pytest.mark.parametrize(
    "raw",
    [b"\x0b", b"\x1a\xff\xff\x03", b"\x20\x80\x80\x80\x80\x10", b"\x0a\x02\xff\xff", b"\x11" + b"\0" * 8],
)
def test_a_malformed_snapshot_chunk_is_refused(raw: bytes) -> None:
    with pytest.raises(WireError, match="malformed snapshot chunk"):
        ReceivedChunk.parse(raw)


def from_node_9(
    conf_index: int = 40,
    conf_term: int = 3,
    address: str = "10.0.0.9:7001",
    kind: MsgType = MsgType.HEARTBEAT,
) -> raft_pb2.RaftMessage:
    """A message of term 5 from node 9, which is not in the receiver's configuration {1, 2, 3}."""
    return to_wire(Message(kind, 9, 2, 5), "c1", Sender(conf_index, conf_term, address))


def test_the_core_decides_on_a_leader_or_candidate_outside_the_configuration() -> None:
    """What the receiver's core is asked (``Raft.takes_outsider``), with what, and that its answer
    stands: section 4.1 of Ongaro's dissertation, messages from servers outside the configuration."""
    asked: list[tuple[int, int, int]] = []

    def takes(src: int, conf_index: int, conf_term: int) -> bool:
        asked.append((src, conf_index, conf_term))
        return conf_index == 40

    for kind in (MsgType.APP, MsgType.HEARTBEAT, MsgType.VOTE, MsgType.PRE_VOTE, MsgType.TIMEOUT_NOW):
        m = from_wire(from_node_9(kind=kind), cluster_id="c1", me=2, members=MEMBERS, takes_outsider=takes)
        assert m.src == 9 and m.type is kind
    assert asked[0] == (9, 40, 3)
    with pytest.raises(UnknownSenderError, match="unknown node 9"):
        from_wire(from_node_9(conf_index=20), cluster_id="c1", me=2, members=MEMBERS, takes_outsider=takes)
    with pytest.raises(UnknownSenderError):  # without a core to ask, never
        from_wire(from_node_9(), cluster_id="c1", me=2, members=MEMBERS)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"address": ""}, "no address to answer on"),
        ({"address": "0.0.0.0:7001"}, "an address no one can dial"),
        ({"address": "10.0.0.9"}, "not host:port"),
        ({"conf_term": 6}, "a configuration of a term after the message's"),
        ({"kind": MsgType.APP_RESP}, "an answer: only a leader or a candidate speaks first"),
        ({"kind": MsgType.PROP}, "a forwarded proposal"),
        ({"kind": MsgType.READ_INDEX}, "a read index request"),
    ],
)
def test_outsiders_are_refused_whatever_the_core_says_unless_they_act_as_a_leader_or_candidate(
    change: dict[str, Any], why: str
) -> None:
    w = from_node_9(**change)
    with pytest.raises(UnknownSenderError, match="unknown node 9"):
        from_wire(w, cluster_id="c1", me=2, members=MEMBERS, takes_outsider=lambda *_: True)


def test_a_snapshot_from_an_outsider_the_core_takes_is_taken() -> None:
    h = raft_pb2.SnapshotHeader(
        cluster_id="c1",
        to=2,
        term=5,
        index=100,
        log_term=5,
        size=10,
        sha256=b"\x00" * 32,
        conf_index=40,
        conf_term=3,
    )
    setattr(h, "from", 9)
    check_snapshot_header(h, cluster_id="c1", me=2, members=MEMBERS, takes_outsider=lambda *_: True)
    with pytest.raises(UnknownSenderError):
        check_snapshot_header(h, cluster_id="c1", me=2, members=MEMBERS, takes_outsider=lambda *_: False)
