//! Snapshot transfer: splitting a snapshot file into verified chunks and reassembling it.
//!
//! A Raft leader sends a follower that has fallen behind its compacted log a whole snapshot file.
//! Snapshot files can be large, links drop and leaders change, so the transfer is built to resume
//! and to never publish a damaged file:
//!
//! - The sender side, [`SnapshotChunker`], cuts an immutable file into fixed-size [`Chunk`]s, each
//!   carrying its offset and CRC-32C, and knows the SHA-256 of the whole file. Chunks are read with
//!   positional reads, so restarting at any chunk boundary costs nothing.
//! - The receiver side, [`SnapshotAssembler`], accepts chunks strictly in order into
//!   `<final>.partial`, records each accepted chunk in a small CRC-protected `<final>.progress`
//!   sidecar, and on [`SnapshotAssembler::finish`] checks the SHA-256, fsyncs and renames the file
//!   to its final name. After a crash or a dropped connection, creating an assembler for the same
//!   snapshot re-verifies what was written and reports where the sender should resume.
//!
//! Nothing here is fsynced per chunk: a resume re-checks every recorded chunk against its CRC,
//! and only the final, whole-file-verified publish is made durable.

mod assembler;
mod chunker;
mod hashing;
mod progress;
mod wire;

#[cfg(test)]
mod tests;

pub use assembler::{partial_path_for, progress_path_for, SnapshotAssembler};
pub use chunker::{Chunk, ChunkCursor, Chunks, SnapshotChunker};
pub use wire::{parse_chunk_message, ChunkFields};

/// Size of the buffer used when streaming a file for hashing or verification. Large enough to
/// amortise system calls, small enough that a huge chunk never has to sit in memory twice.
const IO_BLOCK: usize = 1 << 20;

/// Formats a digest as lowercase hex, for error messages an operator can compare by eye.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
