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
//! - [`wire`]: the `Batch` RPC's request and response bytes, for the leader's fast path.
//!
//! The map is a persistent B-tree (`imbl::OrdMap`): freezing it for a snapshot is a clone that
//! shares every node, and the first later change to a node copies just that node. A snapshot is
//! therefore written from a consistent view on another thread while applies go on.

pub mod command;
pub mod snapshot;
pub mod store;
pub mod wire;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use command::Command;
pub use snapshot::{SnapshotPieces, SnapshotReader};
pub use store::{Event, KvStore, Replaced};

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

/// A key. Short keys (most of them) are stored inline, so comparing keys while walking the tree
/// reads the tree's own memory instead of chasing a pointer per comparison; longer ones are
/// shared between the map, the watch history and frozen snapshot views. Make keys with
/// `Key::from`: ordering two inline keys reads their padding, which must be zeros.
#[derive(Clone)]
pub enum Key {
    /// Up to [`INLINE_KEY`] bytes, kept in place, zeros after the first `len`.
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    /// A longer key on the heap.
    Shared(Arc<[u8]>),
}

/// Longest key stored inline: what fits beside the length in the size of a shared pointer plus
/// one word (24 bytes in all).
pub const INLINE_KEY: usize = 22;

impl From<&[u8]> for Key {
    fn from(data: &[u8]) -> Self {
        if data.len() <= INLINE_KEY {
            let mut bytes = [0; INLINE_KEY];
            bytes[..data.len()].copy_from_slice(data);
            Key::Inline { len: data.len() as u8, bytes }
        } else {
            Key::Shared(Arc::from(data))
        }
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Shared(data) => data,
        }
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self
    }
}

// Ordering and equality are those of the bytes, as `Borrow<[u8]>` requires.
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            // Zero-padded inline keys compare as three big-endian words, then by length: the
            // byte order, without a `memcmp` call per comparison on the tree's hottest path.
            (Key::Inline { len: a, bytes: x }, Key::Inline { len: b, bytes: y }) => {
                inline_words(x).cmp(&inline_words(y)).then(a.cmp(b))
            }
            _ => (**self).cmp(&**other),
        }
    }
}

fn inline_words(bytes: &[u8; INLINE_KEY]) -> (u64, u64, u64) {
    let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
    let mut tail = [0u8; 8];
    tail[..INLINE_KEY - 16].copy_from_slice(&bytes[16..]);
    (word(0), word(8), u64::from_be_bytes(tail))
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({:?})", &**self)
    }
}

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
