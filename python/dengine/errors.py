"""The dengine exception hierarchy.

Every error dengine raises derives from :class:`DengineError`. The classes are created once, in
the Rust extension, so an error raised deep inside the log store and one raised by Python code
are instances of the same classes. Storage errors come from Rust, the others are defined below::

    DengineError
    └── StorageError                 an I/O failure; the message names the file
        ├── CorruptLogError          checksum/framing failure before the tail (file and offset)
        ├── LogCompactedError        the index was compacted away
        ├── LogIndexError            the index lies beyond the log, or an append leaves a gap
        ├── LogClosedError           the store was closed
        ├── SnapshotChunkError       a snapshot chunk was refused
        └── SnapshotIntegrityError   an assembled snapshot has the wrong size or SHA-256
    NotLeaderError                   this node cannot take the request; carries the leader hint
    ProposalDroppedError             a proposal was refused without being appended; retry

Invalid arguments (a zero chunk size, a negative index) raise the built-in ``ValueError`` or
``OverflowError``, as any Python API does.
"""

from dengine._core import (
    CorruptLogError,
    DengineError,
    LogClosedError,
    LogCompactedError,
    LogIndexError,
    SnapshotChunkError,
    SnapshotIntegrityError,
    StorageError,
)

__all__ = [
    "CorruptLogError",
    "DengineError",
    "LogClosedError",
    "LogCompactedError",
    "LogIndexError",
    "SnapshotChunkError",
    "SnapshotIntegrityError",
    "StorageError",
]


class NotLeaderError(DengineError):
    """This node is not the leader. ``leader`` is the current leader's id when known, so a caller
    can retry there."""

    def __init__(self, leader: int | None, message: str | None = None) -> None:
        self.leader = leader
        hint = f"; the leader is node {leader}" if leader is not None else "; no leader is known"
        super().__init__(message or f"this node is not the leader{hint}")


class ProposalDroppedError(DengineError):
    """The proposal was refused and not appended (for example during a leadership transfer);
    it is safe to retry."""


__all__ += ["NotLeaderError", "ProposalDroppedError"]
