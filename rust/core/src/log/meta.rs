//! The `meta` file: hard state and compaction point, updated atomically.
//!
//! Two fixed 64-byte slots, each with a sequence number and a CRC. A write always goes to the
//! slot that does *not* hold the last durable state, and slots swap roles only after an fsync,
//! so a crash at any moment leaves at least one valid slot with the newest durable state.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::HardState;
use crate::pio;
use crate::{Error, Result};

const SLOT_LEN: usize = 64;
const MAGIC: &[u8; 4] = b"DGMT";
const NO_VOTE: u64 = u64::MAX;

/// Everything the meta file stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub hard_state: HardState,
    /// Entries up to this index were compacted away.
    pub compact_index: u64,
    /// Term of the entry at `compact_index` (0 when nothing was compacted).
    pub compact_term: u64,
}

/// The open meta file.
pub struct MetaFile {
    path: PathBuf,
    file: File,
    seq: u64,
    /// Slot holding the newest state known durable; writes go to the other one.
    durable_slot: usize,
    /// A write waits for the next [`MetaFile::sync`].
    dirty: bool,
    /// A write only [`MetaFile::close_sync`] flushes (a commit-index-only change).
    lazy: bool,
    current: Meta,
}

impl MetaFile {
    /// Opens `dir/meta`, creating it durably when missing.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("meta");
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if !existed || len == 0 {
            let mut mf = MetaFile {
                path,
                file,
                seq: 0,
                durable_slot: 1,
                dirty: false,
                lazy: false,
                current: Meta::default(),
            };
            mf.write(Meta::default())?;
            mf.sync()?;
            pio::sync_dir(dir).map_err(|e| Error::io(dir, e))?;
            return Ok(mf);
        }
        let mut buf = [0u8; 2 * SLOT_LEN];
        let n = usize::try_from(len.min(buf.len() as u64)).unwrap_or(0);
        pio::read_exact_at(&file, &mut buf[..n], 0).map_err(|e| Error::io(&path, e))?;
        let slots = [decode(&buf[..SLOT_LEN]), decode(&buf[SLOT_LEN..])];
        let best = match slots {
            [Some(a), Some(b)] => Some(if a.0 >= b.0 { (0, a) } else { (1, b) }),
            [Some(a), None] => Some((0, a)),
            [None, Some(b)] => Some((1, b)),
            [None, None] => None,
        };
        let Some((slot, (seq, meta))) = best else {
            return Err(Error::corrupt(&path, 0, "neither hard-state slot has a valid checksum"));
        };
        // The newest slot may have been written and never flushed (the previous process died
        // between the two): flushed now, the term and vote read here are durable before they
        // are acted on, and the next write's slot is not the only copy on disk.
        file.sync_data().map_err(|e| Error::io(&path, e))?;
        Ok(MetaFile { path, file, seq, durable_slot: slot, dirty: false, lazy: false, current: meta })
    }

    pub fn get(&self) -> Meta {
        self.current
    }

    /// Whether the next [`MetaFile::sync`] has a write to flush.
    #[cfg(test)]
    pub fn needs_sync(&self) -> bool {
        self.dirty
    }

    /// Writes `meta` into the spare slot; durable after [`MetaFile::sync`].
    pub fn write(&mut self, meta: Meta) -> Result<()> {
        self.write_spare(meta)?;
        self.dirty = true;
        Ok(())
    }

    /// Writes `meta` into the spare slot without asking the next [`MetaFile::sync`] to flush
    /// it: for state whose loss in a crash is harmless (a commit index, which a restarted node
    /// clamps to its log and otherwise relearns from the leader). It becomes durable with the
    /// next flushing write, at close, or whenever the kernel writes the page back; since it
    /// goes to the spare slot, a torn write leaves the durable slot intact.
    pub fn write_lazy(&mut self, meta: Meta) -> Result<()> {
        self.write_spare(meta)?;
        self.lazy = true;
        Ok(())
    }

    fn write_spare(&mut self, meta: Meta) -> Result<()> {
        self.seq += 1;
        let slot = 1 - self.durable_slot;
        let bytes = encode(self.seq, &meta);
        pio::write_all_at(&self.file, &bytes, (slot * SLOT_LEN) as u64)
            .map_err(|e| Error::io(&self.path, e))?;
        self.current = meta;
        Ok(())
    }

    /// Makes the last write durable and lets the next write use the other slot.
    ///
    /// Callers hold the meta lock throughout, so no write can land in the slot being flushed:
    /// a write racing an fsync could otherwise tear the very state the fsync reports durable.
    pub fn sync(&mut self) -> Result<()> {
        if self.dirty {
            self.flush()?;
        }
        Ok(())
    }

    /// Like [`MetaFile::sync`], but lazy writes are flushed too: the last sync before closing.
    pub fn close_sync(&mut self) -> Result<()> {
        if self.dirty || self.lazy {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))?;
        self.dirty = false;
        self.lazy = false;
        self.durable_slot = 1 - self.durable_slot;
        Ok(())
    }
}

fn encode(seq: u64, m: &Meta) -> [u8; SLOT_LEN] {
    let mut b = [0u8; SLOT_LEN];
    b[0..4].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&m.hard_state.term.to_le_bytes());
    b[24..32].copy_from_slice(&m.hard_state.vote.unwrap_or(NO_VOTE).to_le_bytes());
    b[32..40].copy_from_slice(&m.hard_state.commit.to_le_bytes());
    b[40..48].copy_from_slice(&m.compact_index.to_le_bytes());
    b[48..56].copy_from_slice(&m.compact_term.to_le_bytes());
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<(u64, Meta)> {
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    if b.len() != SLOT_LEN || &b[0..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(b[60..64].try_into().ok()?);
    if crc32c::crc32c(&b[..60]) != crc {
        return None;
    }
    let vote = word(24);
    let meta = Meta {
        hard_state: HardState { term: word(16), vote: (vote != NO_VOTE).then_some(vote), commit: word(32) },
        compact_index: word(40),
        compact_term: word(48),
    };
    Some((word(8), meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(term: u64) -> Meta {
        Meta { hard_state: HardState { term, vote: Some(2), commit: 9 }, compact_index: 4, compact_term: 1 }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        m.write(sample(5)).unwrap();
        m.sync().unwrap();
        drop(m);
        assert_eq!(MetaFile::open(dir.path()).unwrap().get(), sample(5));
    }

    /// Makes `sample(5)` durable, lets `then` write once more, tears the spare slot as a crash
    /// mid-write would, and returns what a reopen finds.
    fn reopen_after_a_torn_write(then: impl FnOnce(&mut MetaFile)) -> Meta {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        m.write(sample(5)).unwrap();
        m.sync().unwrap();
        let spare = 1 - m.durable_slot;
        then(&mut m);
        drop(m);
        let f = OpenOptions::new().write(true).open(dir.path().join("meta")).unwrap();
        pio::write_all_at(&f, &[0xAB; 7], (spare * SLOT_LEN + 20) as u64).unwrap();
        MetaFile::open(dir.path()).unwrap().get()
    }

    #[test]
    fn a_torn_newer_slot_falls_back_to_the_durable_one() {
        assert_eq!(reopen_after_a_torn_write(|m| m.write(sample(6)).unwrap()), sample(5));
    }

    #[test]
    fn unsynced_writes_never_overwrite_the_durable_slot() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        m.write(sample(5)).unwrap();
        m.sync().unwrap();
        let durable = m.durable_slot;
        for t in 6..10 {
            m.write(sample(t)).unwrap();
        }
        let mut buf = [0u8; SLOT_LEN];
        pio::read_exact_at(&m.file, &mut buf, (durable * SLOT_LEN) as u64).unwrap();
        assert_eq!(decode(&buf).unwrap().1, sample(5));
    }

    fn with_commit(commit: u64) -> Meta {
        Meta { hard_state: HardState { commit, ..sample(5).hard_state }, ..sample(5) }
    }

    #[test]
    fn a_lazy_write_waits_for_close_not_for_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        m.write(sample(5)).unwrap();
        m.sync().unwrap();
        let durable = m.durable_slot;
        m.write_lazy(with_commit(50)).unwrap();
        m.sync().unwrap();
        assert_eq!(m.durable_slot, durable, "a commit-only change must not cost an fsync");
        assert!(m.lazy);
        m.close_sync().unwrap();
        assert_ne!(m.durable_slot, durable);
        drop(m);
        assert_eq!(MetaFile::open(dir.path()).unwrap().get(), with_commit(50));
    }

    #[test]
    fn a_flushing_write_after_a_lazy_one_carries_both() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        m.write(sample(5)).unwrap();
        m.sync().unwrap();
        m.write_lazy(with_commit(50)).unwrap();
        m.write(Meta { hard_state: HardState { term: 6, vote: None, commit: 50 }, ..sample(5) }).unwrap();
        m.sync().unwrap();
        assert!(!m.lazy);
        drop(m);
        let got = MetaFile::open(dir.path()).unwrap().get().hard_state;
        assert_eq!(got, HardState { term: 6, vote: None, commit: 50 });
    }

    #[test]
    fn a_torn_lazy_write_falls_back_to_the_durable_slot() {
        assert_eq!(reopen_after_a_torn_write(|m| m.write_lazy(with_commit(50)).unwrap()), sample(5));
    }

    #[test]
    fn both_slots_corrupt_is_a_hard_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(MetaFile::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("meta"), [0x55u8; 128]).unwrap();
        let err = MetaFile::open(dir.path()).err().unwrap();
        assert!(matches!(err, Error::Corrupt { offset: 0, .. }), "{err}");
    }
}
