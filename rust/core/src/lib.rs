//! dengine-core: the data-heavy parts of a dengine Raft node, in pure Rust.
//!
//! This crate knows nothing about Python; `rust/bindings` exposes it as `dengine._core`.
//! It owns three things, each in its own module:
//!
//! - [`log`]: the durable, segmented write-ahead log that stores Raft entries and hard state,
//!   plus an in-memory twin with identical semantics.
//! - [`quorum`]: commit-index and vote arithmetic for majority and joint configurations.
//! - [`snapshot`]: splitting a snapshot file into verified chunks and reassembling it.

pub mod error;
pub mod log;
mod pio;
pub mod quorum;
pub mod snapshot;

pub use error::{Error, Result};
