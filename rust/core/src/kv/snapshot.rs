//! KV snapshots: a frozen store written as bytes in pieces, and bytes validated back into a store.
//!
//! Layout (integers little-endian): 8 bytes magic | u32 version | u64 revision | u64 last_applied |
//! u64 entry count | that many `kv` entries (see [`super::command::encode_key_value`]) in strictly
//! increasing key order | u32 CRC-32 (zlib's polynomial) of every preceding byte.

use std::ops::Bound;

use imbl::OrdMap;

use super::command::encode_key_value;
use super::store::KvStore;
use super::{Key, Record, MAX_KEY_SIZE, MAX_VALUE_SIZE, SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
use crate::Error;

const HEADER_LEN: usize = 36;
const ENTRY_HEAD_LEN: usize = 32;

/// Writes a frozen copy of a store as snapshot bytes, a piece at a time. Freezing costs a map
/// clone that shares every node, so the store can go on applying while the pieces are built.
#[derive(Debug)]
pub struct SnapshotPieces {
    map: OrdMap<Key, Record>,
    revision: u64,
    last_applied: u64,
    // The last key written; the next piece starts after it.
    after: Option<Key>,
    started: bool,
    finished: bool,
    crc: crc32fast::Hasher,
}

impl SnapshotPieces {
    /// Freezes `store` as it is now.
    pub fn new(store: &KvStore) -> Self {
        Self {
            map: store.map.clone(),
            revision: store.revision,
            last_applied: store.last_applied,
            after: None,
            started: false,
            finished: false,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// The store revision at the freeze.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The last applied log index at the freeze.
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// The next piece of about `size` bytes (at least one entry), or `None` after the last one.
    pub fn next_piece(&mut self, size: usize) -> Option<Vec<u8>> {
        if self.finished {
            return None;
        }
        let mut out = Vec::with_capacity(size.min(16 << 20) + 64);
        if !self.started {
            self.started = true;
            out.extend_from_slice(SNAPSHOT_MAGIC);
            out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
            out.extend_from_slice(&self.revision.to_le_bytes());
            out.extend_from_slice(&self.last_applied.to_le_bytes());
            out.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        }
        let lower = match &self.after {
            Some(key) => Bound::Excluded(&**key),
            None => Bound::Unbounded,
        };
        let mut last = None;
        let mut full = false;
        for (key, record) in self.map.range::<_, [u8]>((lower, Bound::Unbounded)) {
            encode_key_value(&mut out, key, record);
            last = Some(key);
            if out.len() >= size {
                full = true;
                break;
            }
        }
        if let Some(key) = last {
            self.after = Some(key.clone());
        }
        self.crc.update(&out);
        if !full {
            let crc = std::mem::take(&mut self.crc).finalize();
            out.extend_from_slice(&crc.to_le_bytes());
            self.release();
        }
        Some(out)
    }

    /// Lets go of the frozen view; no more pieces come after. Letting go can take tens of
    /// milliseconds: the view holds every node the live store copied on write since the freeze,
    /// up to a whole second tree, freed here. So the last piece lets go by itself, on the
    /// thread that writes the snapshot, and a writer that stops early calls this there too,
    /// rather than leaving the drop to whichever thread drops the last reference.
    pub fn release(&mut self) {
        self.finished = true;
        self.map = OrdMap::new();
    }
}

/// A validated snapshot, ready for [`KvStore::install`].
#[derive(Debug)]
pub struct Restored {
    pub(super) map: OrdMap<Key, Record>,
    pub(super) revision: u64,
    pub(super) last_applied: u64,
}

enum Stage {
    Header,
    Entries { left: u64 },
    Crc,
    Done,
}

/// Validates snapshot bytes fed in any pieces and builds the state they describe. Errors name
/// what is wrong and at which byte, and nothing is installed unless [`finish`](Self::finish)
/// accepts the whole stream.
pub struct SnapshotReader {
    buf: Vec<u8>,
    // Offset in the stream of `buf[0]`.
    offset: u64,
    stage: Stage,
    crc: crc32fast::Hasher,
    map: OrdMap<Key, Record>,
    revision: u64,
    last_applied: u64,
    count: u64,
    previous: Option<Key>,
}

impl Default for SnapshotReader {
    fn default() -> Self {
        Self::new()
    }
}

fn u32_at(data: &[u8], pos: usize) -> u32 {
    u32::from_le_bytes(data[pos..pos + 4].try_into().expect("four bytes"))
}

fn u64_at(data: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(data[pos..pos + 8].try_into().expect("eight bytes"))
}

/// `data` as Python would print a bytes literal, so messages read the same as elsewhere.
pub fn bytes_repr(data: &[u8]) -> String {
    let quote = if data.contains(&b'\'') && !data.contains(&b'"') { '"' } else { '\'' };
    let mut out = format!("b{quote}");
    for &b in data {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            _ if b as char == quote => {
                out.push('\\');
                out.push(quote);
            }
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push(quote);
    out
}

impl SnapshotReader {
    /// A reader expecting the first byte of a snapshot.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            offset: 0,
            stage: Stage::Header,
            crc: crc32fast::Hasher::new(),
            map: OrdMap::new(),
            revision: 0,
            last_applied: 0,
            count: 0,
            previous: None,
        }
    }

    /// Takes the next bytes of the stream and validates every entry they complete.
    pub fn feed(&mut self, data: &[u8]) -> crate::Result<()> {
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        let result = self.parse(&mut pos);
        self.buf.drain(..pos);
        self.offset += pos as u64;
        result.map_err(Error::KvSnapshot)
    }

    /// Hashes and consumes `n` bytes at `pos`.
    fn take(&mut self, pos: &mut usize, n: usize) {
        self.crc.update(&self.buf[*pos..*pos + n]);
        *pos += n;
    }

    fn parse(&mut self, pos: &mut usize) -> Result<(), String> {
        loop {
            let available = self.buf.len() - *pos;
            match self.stage {
                Stage::Header => {
                    if available < HEADER_LEN {
                        return Ok(());
                    }
                    let head = &self.buf[*pos..*pos + HEADER_LEN];
                    if &head[..8] != SNAPSHOT_MAGIC {
                        return Err(format!(
                            "not a dengine KV snapshot: magic is {}, expected {}",
                            bytes_repr(&head[..8]),
                            bytes_repr(SNAPSHOT_MAGIC)
                        ));
                    }
                    let version = u32_at(head, 8);
                    if version != SNAPSHOT_VERSION {
                        return Err(format!(
                            "unsupported KV snapshot format version {version}; this build reads version {SNAPSHOT_VERSION}"
                        ));
                    }
                    self.revision = u64_at(head, 12);
                    self.last_applied = u64_at(head, 20);
                    self.count = u64_at(head, 28);
                    self.take(pos, HEADER_LEN);
                    self.stage =
                        if self.count == 0 { Stage::Crc } else { Stage::Entries { left: self.count } };
                }
                Stage::Entries { left } => {
                    if available < ENTRY_HEAD_LEN {
                        return Ok(());
                    }
                    let n = self.count - left;
                    let at = self.offset + *pos as u64;
                    let head = &self.buf[*pos..*pos + ENTRY_HEAD_LEN];
                    let (create, modr, version) = (u64_at(head, 0), u64_at(head, 8), u64_at(head, 16));
                    let (key_len, value_len) = (u32_at(head, 24) as usize, u32_at(head, 28) as usize);
                    if key_len == 0 || key_len > MAX_KEY_SIZE {
                        return Err(format!(
                            "snapshot entry {n} at byte {at}: key length {key_len} out of range"
                        ));
                    }
                    if value_len > MAX_VALUE_SIZE {
                        return Err(format!(
                            "snapshot entry {n} at byte {at}: value length {value_len} over the limit"
                        ));
                    }
                    let consistent = 0 < create
                        && create <= modr
                        && modr <= self.revision
                        && 0 < version
                        && version <= modr - create + 1;
                    if !consistent {
                        return Err(format!(
                            "snapshot entry {n} at byte {at}: inconsistent revisions (create {create}, mod {modr}, \
                             version {version}, store revision {})",
                            self.revision
                        ));
                    }
                    if available < ENTRY_HEAD_LEN + key_len + value_len {
                        return Ok(());
                    }
                    let body = *pos + ENTRY_HEAD_LEN;
                    let key: Key = Key::from(&self.buf[body..body + key_len]);
                    if self.previous.as_ref().is_some_and(|p| *key <= **p) {
                        return Err(format!(
                            "snapshot entry {n} at byte {at}: keys are not in strictly increasing order"
                        ));
                    }
                    let value = self.buf[body + key_len..body + key_len + value_len].into();
                    self.take(pos, ENTRY_HEAD_LEN + key_len + value_len);
                    let record = Record { value, create_revision: create, mod_revision: modr, version };
                    self.map.insert(key.clone(), record);
                    self.previous = Some(key);
                    self.stage = if left == 1 { Stage::Crc } else { Stage::Entries { left: left - 1 } };
                }
                Stage::Crc => {
                    if available < 4 {
                        return Ok(());
                    }
                    let stored = u32_at(&self.buf, *pos);
                    let computed = std::mem::take(&mut self.crc).finalize();
                    if stored != computed {
                        return Err(format!(
                            "KV snapshot checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
                        ));
                    }
                    *pos += 4;
                    self.stage = Stage::Done;
                }
                Stage::Done => {
                    if available > 0 {
                        return Err(format!(
                            "KV snapshot has trailing bytes after its CRC at byte {}",
                            self.offset + *pos as u64
                        ));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Ends the stream: the snapshot, if it was whole; otherwise where it was cut short.
    pub fn finish(self) -> crate::Result<Restored> {
        let have = self.buf.len();
        let at = self.offset + have as u64;
        let (what, needs) = match self.stage {
            Stage::Done => {
                return Ok(Restored {
                    map: self.map,
                    revision: self.revision,
                    last_applied: self.last_applied,
                })
            }
            Stage::Header => ("the header", HEADER_LEN),
            Stage::Entries { .. } if have < ENTRY_HEAD_LEN => ("an entry header", ENTRY_HEAD_LEN),
            Stage::Entries { .. } => {
                let (key_len, value_len) = (u32_at(&self.buf, 24) as usize, u32_at(&self.buf, 28) as usize);
                ("an entry's key and value", ENTRY_HEAD_LEN + key_len + value_len)
            }
            Stage::Crc => ("the CRC", 4),
        };
        Err(Error::KvSnapshot(format!(
            "KV snapshot truncated at byte {at}: {what} needs {needs} bytes, only {have} remain"
        )))
    }
}
