"""Snapshot chunking, implemented in Rust.

The sender reads a published (immutable) snapshot file with :class:`SnapshotChunker`: each
:class:`SnapshotChunk` carries its offset, bytes and CRC32C, and the whole file a SHA-256. The
receiver feeds chunks to a :class:`SnapshotAssembler`, which verifies each one, accepts only the
next offset (a resent identical chunk is harmless), resumes an interrupted transfer from the last
good offset, and on :meth:`SnapshotAssembler.finish` checks the SHA-256 and publishes the file
atomically (temp file, fsync, rename, directory fsync). :meth:`SnapshotAssembler.abort` removes
every temporary file, for example when the leader changes mid-transfer.
"""

from dengine._core import SnapshotAssembler, SnapshotChunk, SnapshotChunker, SnapshotChunkIterator

__all__ = ["SnapshotAssembler", "SnapshotChunk", "SnapshotChunkIterator", "SnapshotChunker"]
