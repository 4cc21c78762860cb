//! The Raft log store: where entries and hard state live.
//!
//! [`LogStore`] is the storage contract the protocol layer relies on. Two engines implement it
//! with identical observable behaviour: [`WalLogStore`] (the durable default: a segmented,
//! CRC-checked write-ahead log with group commit) and [`MemLogStore`] (for tests and
//! `storage.engine = "memory"`).
//!
//! Index conventions follow the Raft paper: indexes start at 1, an empty fresh log has
//! `first_index() == 1` and `last_index() == 0`. After compaction up to `i`, `first_index() == i+1`
//! and `term(i)` still answers (the boundary term is kept, as `prevLogTerm` needs it).

mod batch;
mod bounds;
mod memory;
mod meta;
mod prealloc;
pub mod record;
mod segment;
mod terms;
mod wal;

pub use batch::EncodedBatch;
pub use memory::MemLogStore;
pub use wal::{RecoveryReport, WalLogStore, WalOptions};

use crate::Result;

/// One Raft log entry. The payload is opaque to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub data: Vec<u8>,
}

impl Entry {
    pub fn new(index: u64, term: u64, data: impl Into<Vec<u8>>) -> Self {
        Entry { index, term, data: data.into() }
    }
}

/// The part of Raft state that must survive a restart besides the log (Raft Figure 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    pub term: u64,
    pub vote: Option<u64>,
    pub commit: u64,
}

/// The storage contract of the Raft layer.
///
/// Every method takes `&self` and is internally synchronised, so one thread may `sync` while
/// another appends: that is what lets group commit overlap disk flushes with new appends.
/// Nothing written is durable until a later [`LogStore::sync`] has returned.
pub trait LogStore: Send + Sync {
    /// Index of the first entry still stored (`compacted index + 1`).
    fn first_index(&self) -> Result<u64>;
    /// Index of the last entry, or `first_index() - 1` when the log is empty.
    fn last_index(&self) -> Result<u64>;
    /// Term of the entry at `index`; valid for `first_index()-1 ..= last_index()`.
    fn term(&self, index: u64) -> Result<u64>;
    /// Entries in `lo..hi`, stopping early once the payloads exceed `max_bytes`, but always
    /// returning at least one entry when `lo < hi` so that progress is never blocked by one
    /// oversized entry.
    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>>;
    /// [`LogStore::entries`] framed as one batch, the form entries travel in to followers. A
    /// store that keeps records framed (the WAL) hands them over without decoding them.
    fn entry_batch(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<EncodedBatch> {
        let entries = self.entries(lo, hi, max_bytes)?;
        let mut batch =
            EncodedBatch::with_capacity(entries.len(), entries.iter().map(|e| e.data.len()).sum());
        for e in &entries {
            batch.push(e.index, e.term, &e.data)?;
        }
        Ok(batch)
    }
    /// Appends a batch. The first entry must be `last_index() + 1`, indexes consecutive and terms
    /// never decreasing. Conflicting suffixes are removed explicitly with `truncate_suffix` first.
    fn append_batch(&self, batch: &EncodedBatch) -> Result<()>;
    /// [`LogStore::append_batch`] for entries that are not framed yet.
    fn append(&self, entries: &[Entry]) -> Result<()> {
        let payload: usize = entries.iter().map(|e| e.data.len()).sum();
        let mut batch = EncodedBatch::with_capacity(entries.len(), payload);
        for e in entries {
            batch.push(e.index, e.term, &e.data)?;
        }
        self.append_batch(&batch)
    }
    /// Removes every entry with index `>= index` (conflict repair). Durable on return, because a
    /// removed entry that reappeared after a crash would be indistinguishable from a real one.
    fn truncate_suffix(&self, index: u64) -> Result<()>;
    /// Discards every entry with index `<= index` after a snapshot covers them. Durable on return.
    fn compact_prefix(&self, index: u64) -> Result<()>;
    /// Drops the whole log and restarts it after a snapshot at (`index`, `term`): afterwards
    /// `first_index() == index + 1` and `term(index) == term`. Durable on return.
    fn reset(&self, index: u64, term: u64) -> Result<()>;
    /// Records the hard state. Term and vote are durable after the next `sync`; a change of the
    /// commit index alone may wait for a later flushing write or `close` (losing it in a crash
    /// is harmless: a restarted node clamps it to its log and relearns it from the leader).
    fn save_hard_state(&self, hs: HardState) -> Result<()>;
    /// The last saved hard state (the default one for a fresh store).
    fn hard_state(&self) -> Result<HardState>;
    /// Group commit: makes every earlier append and hard-state save durable with as few fsyncs
    /// as possible, and returns the index up to which the log is now durable.
    fn sync(&self) -> Result<u64>;
    /// The index up to which entries are known durable.
    fn durable_index(&self) -> Result<u64>;
    /// Flushes and releases files; every later call fails with `Error::Closed`.
    fn close(&self) -> Result<()>;
}
