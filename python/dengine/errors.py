"""The dengine exception hierarchy.

Every error dengine raises derives from :class:`DengineError`. The classes are created once, in
the Rust extension, so an error raised deep inside the log store and one raised by Python code
are instances of the same classes::

    DengineError
    └── StorageError                 an I/O failure; the message names the file
        ├── CorruptLogError          checksum/framing failure before the tail (file and offset)
        ├── LogCompactedError        the index was compacted away
        ├── LogIndexError            the index lies beyond the log, or an append leaves a gap
        ├── LogClosedError           the store was closed
        ├── SnapshotChunkError       a snapshot chunk was refused
        └── SnapshotIntegrityError   an assembled snapshot has the wrong size or SHA-256

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
