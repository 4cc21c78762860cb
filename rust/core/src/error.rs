//! The one error type of the core crate.
//!
//! Every variant maps to exactly one Python exception class in the bindings, so the split between
//! variants follows what a caller can do about the failure, not where it happened.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Result alias used throughout the core crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong inside the core.
#[derive(Debug)]
pub enum Error {
    /// An operating-system I/O failure on a named file. Retrying may help; data already reported
    /// durable is unaffected.
    Io { path: PathBuf, source: io::Error },
    /// Stored data failed verification somewhere other than a crash-torn tail. The store refuses
    /// to open rather than drop data: an operator has to look at `path` at `offset`.
    Corrupt { path: PathBuf, offset: u64, reason: String },
    /// The requested index was compacted away (it lies below the first index).
    Compacted { index: u64, first_index: u64 },
    /// The requested index is beyond the last index, or an append would leave a gap.
    IndexOutOfRange { index: u64, first_index: u64, last_index: u64, op: &'static str },
    /// A snapshot chunk was refused: out of order, corrupt, or conflicting with earlier bytes.
    SnapshotChunk(String),
    /// A fully assembled snapshot does not match its declared size or SHA-256.
    SnapshotIntegrity(String),
    /// The caller passed a value outside the allowed range (for example a zero chunk size).
    InvalidArgument(String),
    /// The store was closed and can no longer be used.
    Closed,
    /// KV snapshot bytes are corrupt, truncated or of an unknown format; the message says where.
    KvSnapshot(String),
}

impl Error {
    /// Wraps an `io::Error` with the path it concerns, so messages always name the file.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Builds a corruption error that names the file and byte offset.
    pub fn corrupt(path: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt { path: path.into(), offset, reason: reason.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "I/O error on {}: {source}", path.display()),
            Error::Corrupt { path, offset, reason } => {
                write!(f, "corrupt data in {} at offset {offset}: {reason}", path.display())
            }
            Error::Compacted { index, first_index } => write!(
                f,
                "log index {index} was compacted away (first available index is {first_index})"
            ),
            Error::IndexOutOfRange { index, first_index, last_index, op } => write!(
                f,
                "{op}: log index {index} is outside the log (first index {first_index}, last index {last_index})"
            ),
            Error::SnapshotChunk(msg) => write!(f, "snapshot chunk rejected: {msg}"),
            Error::SnapshotIntegrity(msg) => write!(f, "snapshot failed verification: {msg}"),
            Error::InvalidArgument(msg) => write!(f, "invalid argument: {msg}"),
            Error::Closed => write!(f, "the log store is closed"),
            Error::KvSnapshot(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
