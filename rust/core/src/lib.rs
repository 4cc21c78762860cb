//! dengine-core: the data-heavy parts of a dengine Raft node, in pure Rust.
//!
//! This crate knows nothing about Python; `rust/bindings` exposes it as `dengine._core`.
//! It owns six things, each in its own module:
//!
//! - [`log`]: the durable, segmented write-ahead log that stores Raft entries and hard state,
//!   plus an in-memory twin with identical semantics.
//! - [`quorum`]: commit-index and vote arithmetic for majority and joint configurations.
//! - [`snapshot`]: splitting a snapshot file into verified chunks and reassembling it.
//! - [`kv`]: the built-in replicated key-value store that `dengine serve` runs on every replica.
//! - [`sessions`]: the exactly-once session table every replica applies client writes through.
//! - [`apply`]: committed entries applied through the session table to the KV store, as one loop.

pub mod apply;
pub mod error;
pub mod kv;
pub mod log;
mod pio;
pub mod quorum;
pub mod sessions;
pub mod snapshot;

pub use error::{Error, Result};
