//! The built-in replicated key-value store behind `dengine serve` (`dengine.kv` in Python).
//!
//! Every replica applies the same committed commands, so this module is on the hot path of every
//! node: a put is parsed, stored and answered here without building Python objects. Its pieces:
//!
//! - [`command`]: the command and result byte formats (documented in `dengine.kv`'s module
//!   docstring, which stays the reference for clients in any language).
//! - [`store`]: [`KvStore`], the ordered map of keys with etcd-style revisions and the bounded
//!   history of watch events.
//! - [`snapshot`]: writing a frozen store as snapshot bytes, and validating snapshot bytes back
//!   into a store.
//!
//! The map is a persistent B-tree (`imbl::OrdMap`): freezing it for a snapshot is a clone that
//! shares every node, and the first later change to a node copies just that node. A snapshot is
//! therefore written from a consistent view on another thread while applies go on.

pub mod command;
pub mod snapshot;
pub mod store;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use command::Command;
pub use snapshot::{SnapshotPieces, SnapshotReader};
pub use store::{Event, KvStore};

/// Version byte leading every command and result.
pub const FORMAT_VERSION: u8 = 1;
/// Largest key (and delete-range prefix) in bytes.
pub const MAX_KEY_SIZE: usize = 64 * 1024;
/// Largest value in bytes.
pub const MAX_VALUE_SIZE: usize = 16 * 1024 * 1024;
/// First eight bytes of every KV snapshot.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"DNGKVSN\x00";
/// Version of the snapshot layout.
pub const SNAPSHOT_VERSION: u32 = 1;

/// A key, shared between the map, the watch history and frozen snapshot views.
pub type Key = Arc<[u8]>;

/// A key's value and revision metadata (see `dengine.kv.KeyValue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The value, shared so that copying a map node for a frozen view copies no value bytes.
    pub value: Arc<[u8]>,
    /// Revision of the put that created the key.
    pub create_revision: u64,
    /// Revision of the key's latest put (or, in a delete event's tombstone, of the delete).
    pub mod_revision: u64,
    /// Puts since the key was created.
    pub version: u64,
}
