//! The `.progress` sidecar: which chunks of a `.partial` file were accepted.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! header  (52 bytes): magic "DSNPROG1" | total_size u64 | sha256 [32] | crc32c of the 48 bytes before
//! record  (24 bytes): offset u64 | len u64 | crc32c of the chunk's bytes u32 | crc32c of the 20 bytes before
//! ```
//!
//! Records are fixed-size and individually CRC-protected so that a record torn by a crash is
//! recognised and cut, and so that the n-th record always lives at a known position.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::pio;
use crate::{Error, Result};

const MAGIC: [u8; 8] = *b"DSNPROG1";
/// Bytes in the header.
pub(crate) const HEADER_LEN: u64 = 52;
/// Bytes in one record.
pub(crate) const RECORD_LEN: u64 = 24;

/// Identifies the snapshot a partial file belongs to; a resume is only allowed for the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub total_size: u64,
    pub sha256: [u8; 32],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut buf = [0u8; HEADER_LEN as usize];
        buf[0..8].copy_from_slice(&MAGIC);
        buf[8..16].copy_from_slice(&self.total_size.to_le_bytes());
        buf[16..48].copy_from_slice(&self.sha256);
        let crc = crc32c::crc32c(&buf[0..48]);
        buf[48..52].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Returns `None` for anything that is not an intact header: a torn or foreign file is
    /// simply not resumable.
    fn decode(buf: &[u8; HEADER_LEN as usize]) -> Option<Header> {
        let crc = u32::from_le_bytes(buf[48..52].try_into().ok()?);
        if buf[0..8] != MAGIC || crc32c::crc32c(&buf[0..48]) != crc {
            return None;
        }
        Some(Header {
            total_size: u64::from_le_bytes(buf[8..16].try_into().ok()?),
            sha256: buf[16..48].try_into().ok()?,
        })
    }
}

/// One accepted, contiguous run of bytes in the partial file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub offset: u64,
    pub len: u64,
    pub crc32c: u32,
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN as usize] {
        let mut buf = [0u8; RECORD_LEN as usize];
        buf[0..8].copy_from_slice(&self.offset.to_le_bytes());
        buf[8..16].copy_from_slice(&self.len.to_le_bytes());
        buf[16..20].copy_from_slice(&self.crc32c.to_le_bytes());
        let crc = crc32c::crc32c(&buf[0..20]);
        buf[20..24].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Returns `None` for a record whose own CRC does not match (torn or garbage).
    fn decode(buf: &[u8; RECORD_LEN as usize]) -> Option<Record> {
        let crc = u32::from_le_bytes(buf[20..24].try_into().ok()?);
        if crc32c::crc32c(&buf[0..20]) != crc {
            return None;
        }
        Some(Record {
            offset: u64::from_le_bytes(buf[0..8].try_into().ok()?),
            len: u64::from_le_bytes(buf[8..16].try_into().ok()?),
            crc32c: u32::from_le_bytes(buf[16..20].try_into().ok()?),
        })
    }
}

/// An open `.progress` file positioned to append its next record.
pub(crate) struct ProgressFile {
    path: PathBuf,
    file: File,
    records: u64,
}

impl ProgressFile {
    /// Starts a fresh progress file for `header`, replacing whatever was at `path`.
    pub fn create(path: &Path, header: &Header) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        pio::write_all_at(&file, &header.encode(), 0).map_err(|e| Error::io(path, e))?;
        Ok(ProgressFile { path: path.to_owned(), file, records: 0 })
    }

    /// Opens an existing progress file and reads its header. `Ok(None)` means there is nothing
    /// usable to resume from (no file, or a torn or foreign header).
    pub fn open_existing(path: &Path) -> Result<Option<(Self, Header)>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let mut buf = [0u8; HEADER_LEN as usize];
        match pio::read_exact_at(&file, &mut buf, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        }
        let Some(header) = Header::decode(&buf) else {
            return Ok(None);
        };
        Ok(Some((ProgressFile { path: path.to_owned(), file, records: 0 }, header)))
    }

    /// Streams the records stored after the header, stopping at the first torn or corrupt one
    /// (everything after a bad record is untrusted). The caller decides how many to keep.
    pub fn stored_records(&self) -> Result<RecordReader<'_>> {
        let mut reader = BufReader::with_capacity(64 * 1024, &self.file);
        // `&File` reads from the shared cursor; start right after the header.
        io::Seek::seek(&mut reader, io::SeekFrom::Start(HEADER_LEN)).map_err(|e| Error::io(&self.path, e))?;
        Ok(RecordReader { path: &self.path, reader, done: false })
    }

    /// Keeps only the first `records` records and cuts the rest (a torn tail or records whose
    /// chunks failed re-verification).
    pub fn truncate_to(&mut self, records: u64) -> Result<()> {
        self.file.set_len(HEADER_LEN + records * RECORD_LEN).map_err(|e| Error::io(&self.path, e))?;
        self.records = records;
        Ok(())
    }

    /// Appends one record at its fixed position, so a failed earlier attempt is overwritten
    /// rather than leaving a misaligned tail.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let pos = HEADER_LEN + self.records * RECORD_LEN;
        pio::write_all_at(&self.file, &record.encode(), pos).map_err(|e| Error::io(&self.path, e))?;
        self.records += 1;
        Ok(())
    }
}

/// Iterator over the intact records of a progress file, in file order.
pub(crate) struct RecordReader<'a> {
    path: &'a Path,
    reader: BufReader<&'a File>,
    done: bool,
}

impl Iterator for RecordReader<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.done {
            return None;
        }
        let mut buf = [0u8; RECORD_LEN as usize];
        match self.reader.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.done = true;
                return None;
            }
            Err(e) => {
                self.done = true;
                return Some(Err(Error::io(self.path, e)));
            }
        }
        let record = Record::decode(&buf);
        self.done = record.is_none();
        record.map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_any_flipped_bit() {
        let h = Header { total_size: 123_456, sha256: [7; 32] };
        let enc = h.encode();
        assert_eq!(Header::decode(&enc), Some(h));
        for bit in 0..enc.len() * 8 {
            let mut bad = enc;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(Header::decode(&bad), None, "bit {bit}");
        }
    }

    #[test]
    fn record_round_trips_and_rejects_any_flipped_bit() {
        let r = Record { offset: 1 << 40, len: 4096, crc32c: 0xdead_beef };
        let enc = r.encode();
        assert_eq!(Record::decode(&enc), Some(r));
        for bit in 0..enc.len() * 8 {
            let mut bad = enc;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(Record::decode(&bad), None, "bit {bit}");
        }
    }

    #[test]
    fn reader_stops_at_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.progress");
        let header = Header { total_size: 100, sha256: [1; 32] };
        let mut p = ProgressFile::create(&path, &header).unwrap();
        p.append(&Record { offset: 0, len: 10, crc32c: 1 }).unwrap();
        p.append(&Record { offset: 10, len: 10, crc32c: 2 }).unwrap();
        drop(p);
        // Tear the second record and add a stray byte.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_LEN + RECORD_LEN + 7).unwrap();
        drop(f);
        let (p, h) = ProgressFile::open_existing(&path).unwrap().unwrap();
        assert_eq!(h, header);
        let recs: Vec<Record> = p.stored_records().unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(recs, vec![Record { offset: 0, len: 10, crc32c: 1 }]);
    }

    #[test]
    fn torn_header_is_not_resumable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.progress");
        std::fs::write(&path, &Header { total_size: 1, sha256: [0; 32] }.encode()[..30]).unwrap();
        assert!(ProgressFile::open_existing(&path).unwrap().is_none());
        assert!(ProgressFile::open_existing(&dir.path().join("missing")).unwrap().is_none());
    }
}
