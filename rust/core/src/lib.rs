//! dengine-core: the data-heavy parts of a dengine Raft node, in pure Rust.
//!
//! This crate knows nothing about Python; `rust/bindings` exposes it as `dengine._core`.
//! It owns seven things, each in its own module:
//!
//! - [`log`]: the durable, segmented write-ahead log that stores Raft entries and hard state,
//!   plus an in-memory twin with identical semantics.
//! - [`quorum`]: commit-index and vote arithmetic for majority and joint configurations.
//! - [`snapshot`]: splitting a snapshot file into verified chunks and reassembling it.
//! - [`kv`]: the built-in replicated key-value store that `dengine serve` runs on every replica.
//! - [`sessions`]: the exactly-once session table every replica applies client writes through.
//! - [`apply`]: committed entries applied through the session table to the KV store, as one loop.
//! - [`write_behind`]: a large file's bytes sent to the disk while it is written, not in one
//!   burst when it is synced (snapshots), so that log syncs do not queue behind them.

pub mod apply;
pub mod error;
pub mod kv;
pub mod log;
mod pio;
pub mod quorum;
pub mod sessions;
pub mod snapshot;
pub mod write_behind;

pub use error::{Error, Result};
