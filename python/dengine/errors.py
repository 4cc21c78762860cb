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
    KVSnapshotError                  a KV snapshot is corrupt, truncated or of an unknown format
    NotLeaderError                   this node cannot take the request; carries the leader hint
    ProposalDroppedError             a proposal was refused without being appended; retry
    └── LeaderOverloadedError        the leader holds too many writes not applied yet; back off
    OutcomeUnknownError              a write's outcome is not known: it may have been applied
    ApplyError                       the state machine raised applying a committed command
    LeadershipTransferError          a leadership transfer did not complete; the message says why
    ConfigError                      invalid configuration: names the key and allowed values
    TLSConfigError                   a TLS file is missing, malformed or not valid now
    Unavailable                      (client) no node could serve the request before its deadline
    DeadlineExceeded                 (client) the call's deadline passed
    └── OutcomeUnknownAtDeadline     (client) ... after an attempt that may have taken effect
    RequestFailed                    (client) refused for a reason retrying will not fix
    NotFound                         (client, strict calls) the key does not exist
    CompareFailed                    (client, strict cas) the key did not hold the expected value

``KVCommandError`` (malformed KV command bytes) is a ``ValueError``, since it is always bad input.
Invalid arguments (a zero chunk size, a negative index) raise the built-in ``ValueError`` or
``OverflowError``, as any Python API does.
"""

from pathlib import Path

from dengine._core import (
    CorruptLogError,
    DengineError,
    KVCommandError,
    KVSnapshotError,
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
    "KVCommandError",
    "KVSnapshotError",
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


class LeaderOverloadedError(ProposalDroppedError):
    """The leader holds ``held`` bytes of writes it accepted and has not applied yet, and
    ``size`` more would pass its ``limit`` (``raft.max_unapplied_bytes``): its followers are
    not keeping up or cannot be reached, or its state machine is slower than the writes. Retry
    after a backoff."""

    def __init__(self, held: int, size: int, limit: int) -> None:
        self.held = held
        self.size = size
        self.limit = limit
        super().__init__(
            f"the leader holds {held} bytes of writes not applied yet; {size} more would pass its "
            f"limit of {limit} (raft.max_unapplied_bytes): retry after a backoff"
        )


class OutcomeUnknownError(DengineError):
    """The node stopped waiting for a proposal before its outcome was known: the node stopped,
    was removed from the cluster, or failed. The write may be in the log, and other nodes may
    still commit and apply it. Unlike :class:`ProposalDroppedError`, proposing it again may apply
    it twice: read the state to find out (a ``dengine.Client`` retries with its session, which
    is safe).

    ``dengine.Client`` raises it too, for a write whose call failed as a whole in a way that
    retrying cannot fix (the node's handler failed: ``UNKNOWN``, ``INTERNAL``) or whose answer
    could not be read: the node may have applied it."""


class ApplyError(DengineError):
    """The state machine raised while applying a committed command. The command is in the log
    and counts as applied on every replica; the message is the exception it raised."""


class LeadershipTransferError(DengineError):
    """A leadership transfer did not complete: the target did not take over within the time
    allowed (it is down, or too far behind to catch up), or another node was elected. The old
    leader resumes, or the new one serves; nothing written is lost. Retrying is safe."""


class ConfigError(DengineError, ValueError):
    """The configuration is invalid; the message names the key, what it accepts and the source.

    ``key`` is the dotted key at fault (``"raft.heartbeat_ms"``) when there is one, ``source``
    where its value came from (``"file node1.toml"``, ``"environment variable DENGINE_NODE_ID"``,
    ``"override node.id"``) when known, and ``detail`` the message without the source.
    """

    def __init__(self, detail: str, *, key: str | None = None, source: str | None = None) -> None:
        self.detail = detail
        self.key = key
        self.source = source
        super().__init__(f"{detail} (from {source})" if source else detail)


class TLSConfigError(DengineError, ValueError):
    """A TLS file is missing, unreadable, not PEM, does not match its partner, or is not valid now.

    ``path`` is the offending file (``None`` when the problem is a combination of arguments).
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class Unavailable(DengineError):
    """No node could serve the request before its deadline (cluster down or without a leader)."""


class DeadlineExceeded(DengineError):
    """The call's deadline passed before any attempt could have taken effect (see
    :class:`OutcomeUnknownAtDeadline` for one that may have)."""


class OutcomeUnknownAtDeadline(DeadlineExceeded, OutcomeUnknownError):
    """The call's deadline passed after an attempt that may have taken effect (a node took it
    and did not answer in time, or said its outcome is unknown): it may have been applied, or
    may still be. Both a :class:`DeadlineExceeded` and an :class:`OutcomeUnknownError`. Calling
    again is a new write with a new sequence: the first may still apply as well (a put applied
    twice, a cas that then fails its compare). Read the key before writing again; a membership
    change is safe to call again (it reports a change already made as done)."""


class RequestFailed(DengineError):
    """The cluster refused the request for a reason retrying will not fix (bad argument, too
    large); ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class NotFound(DengineError, KeyError):
    """A strict ``get`` or ``delete`` found no such key; ``key`` is the key and ``revision`` the
    store's revision when it was looked up."""

    def __init__(self, key: bytes, revision: int) -> None:
        super().__init__(f"key {key!r} not found (revision {revision})")
        self.key = key
        self.revision = revision

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class CompareFailed(DengineError):
    """A strict ``cas`` found another value than the one expected; ``current`` is the key's
    value now (``None`` when absent), so a caller can retry without a read."""

    def __init__(self, key: bytes, current: object, revision: int) -> None:
        held = "absent" if current is None else "holding another value"
        super().__init__(f"compare-and-swap on {key!r} failed: the key is {held} (revision {revision})")
        self.key = key
        self.current = current
        self.revision = revision


__all__ += [
    "ApplyError",
    "CompareFailed",
    "ConfigError",
    "DeadlineExceeded",
    "LeaderOverloadedError",
    "LeadershipTransferError",
    "NotFound",
    "NotLeaderError",
    "OutcomeUnknownAtDeadline",
    "OutcomeUnknownError",
    "ProposalDroppedError",
    "RequestFailed",
    "TLSConfigError",
    "Unavailable",
]
