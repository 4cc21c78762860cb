"""The envelope of every log entry's payload: what kind of entry it is.

The first byte says how to read the rest. It is an explicit binary format, never pickle.

* ``NOOP``: the empty entry a new leader appends to commit entries of earlier terms (§5.4.2).
* ``COMMAND``: a user command, passed to the state machine as is.
* ``SESSION_COMMAND``: a command carrying ``(client id, sequence)``, applied at most once per
  sequence number (Raft thesis §6.3): a retried proposal gets the first result back.
* ``CONF_CHANGE``: a membership change (:mod:`dengine.raft.membership`), never passed to the
  state machine.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from dengine.raft import membership

_SESSION = struct.Struct("<BQQQ")
SESSION_HEADER = _SESSION
"""The head of a ``SESSION_COMMAND`` (kind, client id, sequence, first outstanding): the apply
loop's fast path reads it directly."""


class Kind(enum.IntEnum):
    NOOP = 0
    COMMAND = 1
    SESSION_COMMAND = 2
    CONF_CHANGE = 3


NOOP_PAYLOAD = bytes([Kind.NOOP])
# Plain ints: comparing a byte with an IntEnum member is several times slower.
_NOOP_KIND, _COMMAND_KIND, _SESSION_KIND = int(Kind.NOOP), int(Kind.COMMAND), int(Kind.SESSION_COMMAND)
SESSION_KIND = _SESSION_KIND
CONF_CHANGE_KIND = int(Kind.CONF_CHANGE)


class Decoded(NamedTuple):
    # A tuple rather than a dataclass: one is built per applied entry, on the hot path.
    kind: Kind
    command: bytes
    client_id: int = 0
    sequence: int = 0
    first_outstanding: int = 0


def command(data: bytes) -> bytes:
    """Wraps a plain user command."""
    return b"\x01" + data


def session_command(client_id: int, sequence: int, data: bytes, first_outstanding: int = 0) -> bytes:
    """Wraps a command that must be applied at most once for ``(client_id, sequence)``.

    ``first_outstanding`` is the client's lowest sequence still awaiting an answer (0: unknown);
    replicas then forget results below it.
    """
    if client_id <= 0 or sequence <= 0:
        raise ValueError("client_id and sequence must be positive")
    if not 0 <= first_outstanding <= sequence:
        raise ValueError("first_outstanding must be between 0 and sequence")
    return _SESSION.pack(Kind.SESSION_COMMAND, client_id, sequence, first_outstanding) + data


def conf_change(cc: membership.ConfChange) -> bytes:
    """Wraps a membership change."""
    return membership.encode(cc, CONF_CHANGE_KIND)


def is_conf_change(payload: bytes) -> bool:
    return bool(payload) and payload[0] == CONF_CHANGE_KIND


def decode(payload: bytes) -> Decoded:
    """Reads an envelope; raises ValueError on a payload no dengine version wrote."""
    if not payload:
        raise ValueError("empty entry payload")
    kind = payload[0]
    if kind == _SESSION_KIND:
        if len(payload) < _SESSION.size:
            raise ValueError("truncated session command")
        _, client_id, sequence, first_outstanding = _SESSION.unpack_from(payload)
        return Decoded(Kind.SESSION_COMMAND, payload[_SESSION.size :], client_id, sequence, first_outstanding)
    if kind == _COMMAND_KIND:
        return Decoded(Kind.COMMAND, payload[1:])
    if kind == _NOOP_KIND:
        return Decoded(Kind.NOOP, b"")
    if kind == CONF_CHANGE_KIND:
        membership.decode(payload)
        return Decoded(Kind.CONF_CHANGE, payload)
    raise ValueError(f"unknown entry kind {kind}")


def payload_is_valid(payload: bytes) -> bool:
    """Whether ``payload`` is an envelope :func:`decode` accepts."""
    try:
        decode(payload)
    except ValueError:
        return False
    return True
