//! One segment file of the write-ahead log: a header and a run of consecutive records.
//!
//! A segment is named after the index of its first entry (`00000000000000000042.wal`), so the
//! directory listing alone orders the log. Only the last segment is ever appended to.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::batch::EncodedBatch;
use super::record::{self, Header, HEADER_LEN};
use super::terms::TermRuns;
use super::Entry;
use crate::pio;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"DGWAL\0\0\x01";
/// Magic plus the first index, repeated inside the file so a renamed file is caught.
pub const SEGMENT_HEADER_LEN: u64 = 16;

/// A partial record cut from the end of the log during recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes_cut: u64,
}

pub struct Segment {
    pub first_index: u64,
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Byte offset of each record, entry `first_index + i` at `offsets[i]`.
    offsets: Vec<u32>,
    /// Length of the valid data; appends go here.
    pub end: u64,
    /// Whether the space after `end` is zero-filled (see `prealloc`).
    pub preallocated: bool,
}

impl Segment {
    pub fn file_name(first_index: u64) -> String {
        format!("{first_index:020}.wal")
    }

    /// The first index encoded in a segment's file name, if it is one.
    pub fn parse_name(name: &str) -> Option<u64> {
        let digits = name.strip_suffix(".wal")?;
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
    }

    /// Creates an empty segment. It becomes durable with the next file and directory sync.
    ///
    /// With `prepared`, a zero-filled file from the preallocator is renamed into place instead
    /// of creating a new one; the zeros past the data read as a clean end during recovery.
    pub fn create(dir: &Path, first_index: u64, prepared: Option<PathBuf>) -> Result<Segment> {
        let path = dir.join(Self::file_name(first_index));
        let preallocated = prepared.is_some();
        let file = match prepared {
            Some(tmp) => {
                let file =
                    OpenOptions::new().read(true).write(true).open(&tmp).map_err(|e| Error::io(&tmp, e))?;
                fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
                file
            }
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?,
        };
        pio::write_all_at(&file, &header_bytes(first_index), 0).map_err(|e| Error::io(&path, e))?;
        Ok(Segment {
            first_index,
            path,
            file: Arc::new(file),
            offsets: Vec::new(),
            end: SEGMENT_HEADER_LEN,
            preallocated,
        })
    }

    /// Opens and verifies an existing segment, appending its entries' terms to `terms`.
    ///
    /// Damage in the last segment counts as a torn tail (cut and reported) only when no valid
    /// record follows it; anywhere else it is corruption and the segment refuses to open.
    pub fn recover(
        path: PathBuf,
        first_index: u64,
        is_last: bool,
        terms: &mut TermRuns,
    ) -> Result<(Segment, Option<TornTail>)> {
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut seg = Segment {
            first_index,
            path,
            file: Arc::new(file),
            offsets: Vec::new(),
            end: SEGMENT_HEADER_LEN,
            preallocated: false,
        };

        if len < SEGMENT_HEADER_LEN {
            if !is_last {
                return Err(Error::corrupt(&seg.path, 0, "segment header is incomplete"));
            }
            // A crash right after creating the file: start it over.
            return seg.start_over(len);
        }
        let mut head = [0u8; SEGMENT_HEADER_LEN as usize];
        pio::read_exact_at(&seg.file, &mut head, 0).map_err(|e| Error::io(&seg.path, e))?;
        if is_last && head.iter().all(|&b| b == 0) {
            // A zero-filled file from the preallocator, renamed into place by a process that
            // died before its header reached the disk. Nothing in it was ever synced (a sync
            // flushes the header with the records): start it over.
            return seg.start_over(len);
        }
        if head != header_bytes(first_index) {
            return Err(Error::corrupt(
                &seg.path,
                0,
                format!("segment header does not match a WAL segment starting at index {first_index}"),
            ));
        }

        let file = Arc::clone(&seg.file);
        let mut reader = BufReader::with_capacity(1 << 20, &*file);
        let mut skip = [0u8; SEGMENT_HEADER_LEN as usize];
        reader.read_exact(&mut skip).map_err(|e| Error::io(&seg.path, e))?;
        let mut payload = Vec::new();
        let mut off = SEGMENT_HEADER_LEN;
        let mut prev_term = terms.last_term().unwrap_or(0);
        let failure = loop {
            if off == len {
                break None;
            }
            if len - off < HEADER_LEN as u64 {
                break Some("incomplete record header");
            }
            let mut hbuf = [0u8; HEADER_LEN];
            reader.read_exact(&mut hbuf).map_err(|e| Error::io(&seg.path, e))?;
            let Some(h) = record::decode_header(&hbuf) else {
                break Some("record header checksum mismatch");
            };
            if h.record_len() > len - off {
                break Some("record extends past the end of the file");
            }
            payload.resize(h.len as usize, 0);
            reader.read_exact(&mut payload).map_err(|e| Error::io(&seg.path, e))?;
            if !record::payload_ok(&h, &payload) {
                break Some("record payload checksum mismatch");
            }
            // A valid record in the wrong place cannot come from a crash: appends only extend
            // the file and truncations are made durable before anything else is written.
            let expected = seg.next_index();
            if h.index != expected {
                return Err(Error::corrupt(
                    &seg.path,
                    off,
                    format!("record has index {}, expected {expected}", h.index),
                ));
            }
            if h.term < prev_term {
                return Err(Error::corrupt(
                    &seg.path,
                    off,
                    format!("record {} has term {} after term {prev_term}", h.index, h.term),
                ));
            }
            prev_term = h.term;
            terms.push(h.index, h.term);
            seg.push_offset(off)?;
            off += h.record_len();
        };
        drop(reader);
        seg.end = off;
        let Some(reason) = failure else {
            return Ok((seg, None));
        };
        // Zeros after the last record are preallocated space, not damage. (In an older segment
        // they hide nothing either: the next segment must start right after its last record.)
        if all_zero(&seg.file, &seg.path, off, len)? {
            seg.preallocated = true;
            return Ok((seg, None));
        }
        if !is_last {
            return Err(Error::corrupt(&seg.path, off, reason));
        }
        if let Some(valid_at) = find_valid_record(&seg.file, &seg.path, off + 1, len)? {
            return Err(Error::corrupt(
                &seg.path,
                off,
                format!("{reason}, but a valid record follows at offset {valid_at}"),
            ));
        }
        seg.file.set_len(off).map_err(|e| Error::io(&seg.path, e))?;
        seg.file.sync_all().map_err(|e| Error::io(&seg.path, e))?;
        let torn = TornTail { path: seg.path.clone(), offset: off, bytes_cut: len - off };
        Ok((seg, Some(torn)))
    }

    /// Empties the last segment down to a fresh header (nothing in it was ever synced), and
    /// reports the `len` bytes cut as a torn tail.
    fn start_over(self, len: u64) -> Result<(Segment, Option<TornTail>)> {
        self.file.set_len(0).map_err(|e| Error::io(&self.path, e))?;
        pio::write_all_at(&self.file, &header_bytes(self.first_index), 0)
            .map_err(|e| Error::io(&self.path, e))?;
        let torn = TornTail { path: self.path.clone(), offset: 0, bytes_cut: len };
        Ok((self, Some(torn)))
    }

    /// Index the next appended entry must have.
    pub fn next_index(&self) -> u64 {
        self.first_index + self.offsets.len() as u64
    }

    fn push_offset(&mut self, off: u64) -> Result<()> {
        let off =
            u32::try_from(off).map_err(|_| Error::corrupt(&self.path, off, "segment larger than 4 GiB"))?;
        self.offsets.push(off);
        Ok(())
    }

    /// Writes already-framed records at the end; `starts` are record offsets within `buf`.
    pub fn append(&mut self, buf: &[u8], starts: &[u64]) -> Result<()> {
        if self.end + buf.len() as u64 > u64::from(u32::MAX) {
            return Err(Error::InvalidArgument(format!(
                "append: batch of {} bytes does not fit in a segment",
                buf.len()
            )));
        }
        pio::write_all_at(&self.file, buf, self.end).map_err(|e| Error::io(&self.path, e))?;
        for s in starts {
            self.push_offset(self.end + s)?;
        }
        self.end += buf.len() as u64;
        Ok(())
    }

    /// Keeps entries `< index`; the cut is fsynced before returning.
    pub fn truncate(&mut self, index: u64) -> Result<()> {
        let keep = (index - self.first_index) as usize;
        if keep >= self.offsets.len() {
            return Ok(());
        }
        let new_end = u64::from(self.offsets[keep]);
        self.file.set_len(new_end).map_err(|e| Error::io(&self.path, e))?;
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        self.offsets.truncate(keep);
        self.end = new_end;
        Ok(())
    }

    fn offset_of(&self, index: u64) -> u64 {
        let i = (index - self.first_index) as usize;
        self.offsets.get(i).map_or(self.end, |&o| u64::from(o))
    }

    /// Reads entries `lo..hi` (all inside this segment) into `out`, stopping before the payload
    /// total passes `*budget`, unless `out` is still empty. Returns false once the budget is spent.
    pub fn read(&self, lo: u64, hi: u64, budget: &mut u64, out: &mut Vec<Entry>) -> Result<bool> {
        let took_any = !out.is_empty();
        let mut buf = Vec::new();
        self.read_records(lo, hi, budget, took_any, &mut buf, |index, term, _, record| {
            out.push(Entry { index, term, data: record[HEADER_LEN..].to_vec() });
        })
    }

    /// [`Segment::read`] into a batch of framed records: the records are read straight into the
    /// batch's buffer and verified there, with no entry built and nothing encoded again.
    pub fn read_framed(&self, lo: u64, hi: u64, budget: &mut u64, out: &mut EncodedBatch) -> Result<bool> {
        let took_any = !out.is_empty();
        let mut buf = std::mem::take(&mut out.buf);
        let within = self.read_records(lo, hi, budget, took_any, &mut buf, |index, term, start, _| {
            out.note_framed(index, term, start);
        });
        out.buf = buf;
        within
    }

    /// Appends the records `lo..hi` that fit `*budget` (at least one unless `took_any`) to `buf`
    /// with one read, verifies each (header and payload checksums, its index), and hands each to
    /// `emit` as `(index, term, its offset in buf, the whole record)`. Returns false once the
    /// budget is spent.
    fn read_records(
        &self,
        lo: u64,
        hi: u64,
        budget: &mut u64,
        took_any: bool,
        buf: &mut Vec<u8>,
        mut emit: impl FnMut(u64, u64, usize, &[u8]),
    ) -> Result<bool> {
        let mut stop = lo;
        let mut within = true;
        while stop < hi {
            let size = self.offset_of(stop + 1) - self.offset_of(stop) - HEADER_LEN as u64;
            if size > *budget && (took_any || stop != lo) {
                within = false;
                break;
            }
            *budget = budget.saturating_sub(size);
            stop += 1;
        }
        if stop == lo {
            return Ok(within);
        }
        let start = self.offset_of(lo);
        let base = buf.len();
        buf.resize(base + (self.offset_of(stop) - start) as usize, 0);
        pio::read_exact_at(&self.file, &mut buf[base..], start).map_err(|e| Error::io(&self.path, e))?;
        let mut pos = base;
        for index in lo..stop {
            let at = start + (pos - base) as u64;
            let hbuf: &[u8; HEADER_LEN] = buf[pos..pos + HEADER_LEN].try_into().expect("header slice");
            let h: Header = record::decode_header(hbuf)
                .ok_or_else(|| Error::corrupt(&self.path, at, "record header checksum mismatch"))?;
            let end = pos + HEADER_LEN + h.len as usize;
            if h.index != index || !record::payload_ok(&h, &buf[pos + HEADER_LEN..end]) {
                return Err(Error::corrupt(
                    &self.path,
                    at,
                    format!("record for index {index} failed verification"),
                ));
            }
            emit(index, h.term, pos, &buf[pos..end]);
            pos = end;
        }
        Ok(within)
    }
}

fn header_bytes(first_index: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8..].copy_from_slice(&first_index.to_le_bytes());
    b
}

/// Looks for any complete, checksum-valid record starting in `from..len`. Only runs on the
/// recovery failure path, so a byte-by-byte search is affordable.
fn find_valid_record(file: &File, path: &Path, from: u64, len: u64) -> Result<Option<u64>> {
    if from >= len {
        return Ok(None);
    }
    let mut buf = vec![0u8; (len - from) as usize];
    pio::read_exact_at(file, &mut buf, from).map_err(|e| Error::io(path, e))?;
    let mut p = 0usize;
    while p + HEADER_LEN <= buf.len() {
        // A valid header is never all zeros (its CRC would not match), so skip zero runs.
        if buf[p + HEADER_LEN - 1] == 0 && buf[p..p + HEADER_LEN].iter().all(|&b| b == 0) {
            p += 1 + buf[p + HEADER_LEN..].iter().position(|&b| b != 0).unwrap_or(buf.len());
            continue;
        }
        let hbuf: &[u8; HEADER_LEN] = buf[p..p + HEADER_LEN].try_into().expect("header slice");
        if let Some(h) = record::decode_header(hbuf) {
            let body_end = p + HEADER_LEN + h.len as usize;
            if body_end <= buf.len() && record::payload_ok(&h, &buf[p + HEADER_LEN..body_end]) {
                return Ok(Some(from + p as u64));
            }
        }
        p += 1;
    }
    Ok(None)
}

/// Whether `from..len` of the file holds only zero bytes.
fn all_zero(file: &File, path: &Path, from: u64, len: u64) -> Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        pio::read_exact_at(file, &mut buf[..n], at).map_err(|e| Error::io(path, e))?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}
