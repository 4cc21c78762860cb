"""The peer wire codec: round trips, and refusal of anything a peer should not have sent."""

from __future__ import annotations

import dataclasses

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


def from_node_9(conf_index: int, conf_term: int, address: str) -> raft_pb2.RaftMessage:
    """A heartbeat from node 9, which is not in the receiver's configuration {1, 2, 3}."""
    return to_wire(Message(MsgType.HEARTBEAT, 9, 2, 5), "c1", Sender(conf_index, conf_term, address))


def test_a_sender_of_a_configuration_the_receiver_has_not_appended_is_taken() -> None:
    """Section 4.1 of Ongaro's dissertation: node 9 was added at index 40 of term 3, which the
    receiver's log (up to index 30 here) does not hold yet: it was down."""
    log = {i: 2 for i in range(1, 31)}

    def holds(index: int, term: int) -> bool:
        return log.get(index) == term

    m = from_wire(
        from_node_9(40, 3, "10.0.0.9:7001"), cluster_id="c1", me=2, members=MEMBERS, holds_entry=holds
    )
    assert m.src == 9
    # A change at an index it holds, but of another term: its own entry there was cut since.
    m = from_wire(
        from_node_9(20, 3, "10.0.0.9:7001"), cluster_id="c1", me=2, members=MEMBERS, holds_entry=holds
    )
    assert m.src == 9


@pytest.mark.parametrize(
    ("conf_index", "conf_term", "address", "why"),
    [
        (20, 2, "10.0.0.9:7001", "a configuration the receiver holds: node 9 was removed, or never in it"),
        (0, 0, "10.0.0.9:7001", "the initial configuration, which everyone holds"),
        (40, 3, "", "no address to answer on"),
        (40, 3, "0.0.0.0:7001", "an address no one can dial"),
        (40, 3, "10.0.0.9", "not host:port"),
    ],
)
def test_other_senders_outside_the_configuration_are_refused(
    conf_index: int, conf_term: int, address: str, why: str
) -> None:
    log = {i: 2 for i in range(1, 31)}
    w = from_node_9(conf_index, conf_term, address)
    with pytest.raises(UnknownSenderError, match="unknown node 9"):
        from_wire(w, cluster_id="c1", me=2, members=MEMBERS, holds_entry=lambda i, t: log.get(i) == t)
    with pytest.raises(UnknownSenderError):  # and without the receiver's log to ask, always
        from_wire(from_node_9(40, 3, "10.0.0.9:7001"), cluster_id="c1", me=2, members=MEMBERS)


def test_a_snapshot_from_a_sender_of_a_newer_configuration_is_taken() -> None:
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
    check_snapshot_header(h, cluster_id="c1", me=2, members=MEMBERS, holds_entry=lambda i, t: False)
    with pytest.raises(UnknownSenderError):
        check_snapshot_header(h, cluster_id="c1", me=2, members=MEMBERS, holds_entry=lambda i, t: True)
