//! The receiver side: writing chunks in order, resuming after interruption, publishing atomically.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::hashing::BackgroundHasher;
use super::progress::{Header, ProgressFile, Record};
use super::{hex, Chunk, IO_BLOCK};
use crate::pio;
use crate::write_behind::WriteBehind;
use crate::{Error, Result};

/// Where the bytes of a snapshot being received for `final_path` are written.
pub fn partial_path_for(final_path: &Path) -> PathBuf {
    with_suffix(final_path, ".partial")
}

/// Where the record of accepted chunks for `final_path` is kept, so a transfer can resume.
pub fn progress_path_for(final_path: &Path) -> PathBuf {
    with_suffix(final_path, ".progress")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// Reassembles one snapshot file from chunks received in order.
///
/// Bytes go to `<final>.partial`; each accepted chunk is recorded in `<final>.progress`. The
/// file appears at `final_path` only after [`finish`](Self::finish) has checked its SHA-256, so
/// readers never see a half-written snapshot. Dropping an assembler keeps both files so that a
/// later [`create`](Self::create) for the same snapshot resumes; [`abort`](Self::abort) removes
/// them. One assembler at a time may own a given `final_path`.
pub struct SnapshotAssembler {
    final_path: PathBuf,
    partial_path: PathBuf,
    partial: File,
    progress: ProgressFile,
    header: Header,
    next_offset: u64,
    /// SHA-256 of exactly the bytes `[0, next_offset)`: chunks are only ever appended in order,
    /// so the digest is built as they arrive and `finish` never re-reads the file.
    hasher: BackgroundHasher,
    /// Received bytes go to the disk as they arrive, so that `finish` has little left to flush
    /// and the log's syncs never queue behind the whole snapshot (Linux; elsewhere the caller's
    /// periodic [`data_file`](Self::data_file) flushes do that part).
    behind: WriteBehind,
}

impl std::fmt::Debug for SnapshotAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotAssembler")
            .field("final_path", &self.final_path)
            .field("next_offset", &self.next_offset)
            .field("total_size", &self.header.total_size)
            .finish_non_exhaustive()
    }
}

impl SnapshotAssembler {
    /// Prepares to receive a snapshot of `total_size` bytes whose SHA-256 is `sha256`.
    ///
    /// If an interrupted transfer of the same snapshot (same size and digest) left its partial
    /// and progress files behind, they are re-verified chunk by chunk and the transfer resumes
    /// after the last intact chunk (see [`next_offset`](Self::next_offset)); anything after it is
    /// cut. Files left by a different snapshot are discarded.
    pub fn create(final_path: impl Into<PathBuf>, total_size: u64, sha256: [u8; 32]) -> Result<Self> {
        let final_path = final_path.into();
        let partial_path = partial_path_for(&final_path);
        let progress_path = progress_path_for(&final_path);
        let header = Header { total_size, sha256 };
        if let Some(resumed) = Self::resume(&final_path, &partial_path, &progress_path, header)? {
            return Ok(resumed);
        }
        let partial = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial_path)
            .map_err(|e| Error::io(&partial_path, e))?;
        let progress = ProgressFile::create(&progress_path, &header)?;
        let hasher = BackgroundHasher::start(Sha256::new()).map_err(|e| Error::io(&partial_path, e))?;
        Ok(SnapshotAssembler {
            final_path,
            partial_path,
            partial,
            progress,
            header,
            next_offset: 0,
            hasher,
            behind: WriteBehind::new(0),
        })
    }

    /// Picks up an earlier attempt, or returns `None` when there is nothing trustworthy to keep.
    fn resume(
        final_path: &Path,
        partial_path: &Path,
        progress_path: &Path,
        header: Header,
    ) -> Result<Option<Self>> {
        let Some((mut progress, stored)) = ProgressFile::open_existing(progress_path)? else {
            return Ok(None);
        };
        if stored != header {
            return Ok(None);
        }
        let partial = match OpenOptions::new().read(true).write(true).open(partial_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(partial_path, e)),
        };

        let mut hasher = Sha256::new();
        let mut next_offset = 0u64;
        let mut kept = 0u64;
        let mut buf = Vec::new();
        for record in progress.stored_records()? {
            let record = record?;
            let in_place = record.offset == next_offset
                && record.len > 0
                && record.offset.checked_add(record.len).is_some_and(|end| end <= header.total_size);
            if !in_place {
                break;
            }
            // Hash a copy so that a chunk failing its CRC leaves the digest of the good prefix.
            let mut candidate = hasher.clone();
            if !verify_region(&partial, partial_path, &record, &mut candidate, &mut buf)? {
                break;
            }
            hasher = candidate;
            next_offset += record.len;
            kept += 1;
        }
        partial.set_len(next_offset).map_err(|e| Error::io(partial_path, e))?;
        progress.truncate_to(kept)?;
        let hasher = BackgroundHasher::start(hasher).map_err(|e| Error::io(partial_path, e))?;
        Ok(Some(SnapshotAssembler {
            final_path: final_path.to_owned(),
            partial_path: partial_path.to_owned(),
            partial,
            progress,
            header,
            next_offset,
            hasher,
            behind: WriteBehind::new(next_offset),
        }))
    }

    /// The path the finished snapshot will be published at.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// The file receiving the bytes until `finish`.
    pub fn partial_path(&self) -> &Path {
        &self.partial_path
    }

    /// Declared size of the whole snapshot.
    pub fn total_size(&self) -> u64 {
        self.header.total_size
    }

    /// Declared SHA-256 of the whole snapshot.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.header.sha256
    }

    /// Offset of the next byte wanted: where the sender should (re)start.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// True once every byte has been received (the SHA-256 is checked by `finish`).
    pub fn is_complete(&self) -> bool {
        self.next_offset == self.header.total_size
    }

    /// A second handle on the file being written: another thread can flush what has arrived
    /// (`sync_data`) while chunks keep coming, so that `finish` has little left to flush. On
    /// virtual disks a flush costs in proportion to what it flushes, and one flush of a whole
    /// large snapshot at the end would hold up the reply for a long time.
    pub fn data_file(&self) -> Result<File> {
        self.partial.try_clone().map_err(|e| Error::io(&self.partial_path, e))
    }

    /// Accepts a chunk produced by a [`SnapshotChunker`](super::SnapshotChunker).
    pub fn accept_chunk(&mut self, chunk: &Chunk) -> Result<()> {
        self.accept(chunk.offset, &chunk.data, chunk.crc32c)
    }

    /// Accepts the bytes `data` claimed to start at `offset` with CRC-32C `crc32c`.
    ///
    /// - A chunk at [`next_offset`](Self::next_offset) is written and recorded.
    /// - A chunk wholly before it (a resend) must equal the bytes already written and changes
    ///   nothing; one that overlaps `next_offset` (a sender using another chunk size) must agree
    ///   on the overlap, and its new tail is written.
    /// - A chunk after it, beyond `total_size`, or failing its CRC is refused with
    ///   [`Error::SnapshotChunk`].
    ///
    /// A refused chunk (or an I/O error) leaves the assembler as it was.
    pub fn accept(&mut self, offset: u64, data: &[u8], crc32c: u32) -> Result<()> {
        let len = data.len() as u64;
        let total = self.header.total_size;
        let end = match offset.checked_add(len) {
            Some(end) if end <= total => end,
            _ => {
                return Err(Error::SnapshotChunk(format!(
                    "chunk at offset {offset} with {len} bytes ends past the snapshot size {total}"
                )))
            }
        };
        let actual = crc32c::crc32c(data);
        if actual != crc32c {
            return Err(Error::SnapshotChunk(format!(
                "chunk at offset {offset}: CRC mismatch (expected {crc32c:#010x}, got {actual:#010x})"
            )));
        }
        let next = self.next_offset;
        if offset > next {
            return Err(Error::SnapshotChunk(format!("out of order: expected offset {next}, got {offset}")));
        }
        if offset == next {
            return self.append(data, crc32c);
        }
        // A resend of bytes we already have, possibly extending past them.
        let overlap = (end.min(next) - offset) as usize;
        self.check_same_as_written(offset, &data[..overlap])?;
        let tail = &data[overlap..];
        if tail.is_empty() {
            return Ok(());
        }
        self.append(tail, crc32c::crc32c(tail))
    }

    /// Compares `data` with the bytes already written at `offset`.
    fn check_same_as_written(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut buf = vec![0u8; IO_BLOCK.min(data.len())];
        let mut done = 0usize;
        while done < data.len() {
            let n = buf.len().min(data.len() - done);
            let pos = offset + done as u64;
            pio::read_exact_at(&self.partial, &mut buf[..n], pos)
                .map_err(|e| Error::io(&self.partial_path, e))?;
            if let Some(i) = buf[..n].iter().zip(&data[done..done + n]).position(|(a, b)| a != b) {
                return Err(Error::SnapshotChunk(format!(
                    "chunk at offset {offset} conflicts with bytes already received \
                     (first difference at offset {})",
                    pos + i as u64
                )));
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `next_offset`, records it, then advances. State only changes once both
    /// writes succeeded; a retry after an I/O error overwrites the same positions.
    fn append(&mut self, data: &[u8], crc32c: u32) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let offset = self.next_offset;
        pio::write_all_at(&self.partial, data, offset).map_err(|e| Error::io(&self.partial_path, e))?;
        self.progress.append(&Record { offset, len: data.len() as u64, crc32c })?;
        self.hasher.update(data);
        self.next_offset += data.len() as u64;
        self.behind.wrote(&self.partial, self.next_offset);
        Ok(())
    }

    /// Fails with [`Error::SnapshotIntegrity`] unless every byte has been received. `finish`
    /// checks this first; it is separate so a caller can test without giving up the assembler.
    pub fn check_complete(&self) -> Result<()> {
        if self.is_complete() {
            return Ok(());
        }
        Err(Error::SnapshotIntegrity(format!(
            "incomplete: have {} of {} bytes for {}",
            self.next_offset,
            self.header.total_size,
            self.final_path.display()
        )))
    }

    /// Verifies the SHA-256 and atomically publishes the snapshot at `final_path`.
    ///
    /// On success the partial file is fsynced, renamed to `final_path`, the directory fsynced
    /// and the progress file removed. On a digest mismatch the received bytes are garbage: both
    /// files are removed and [`Error::SnapshotIntegrity`] is returned. If the transfer is
    /// incomplete the files are kept (a new assembler resumes them).
    pub fn finish(mut self) -> Result<PathBuf> {
        self.check_complete()?;
        let digest = std::mem::replace(&mut self.hasher, BackgroundHasher::idle()).finalize();
        match self.integrity_problem(digest)? {
            Some(problem) => Err(self.discard(problem)),
            None => self.publish(),
        }
    }

    /// Describes why the received bytes are not the declared snapshot, if they are not.
    fn integrity_problem(&self, digest: Option<[u8; 32]>) -> Result<Option<String>> {
        let Some(digest) = digest else {
            return Ok(Some(format!("hashing {} failed", self.final_path.display())));
        };
        if digest != self.header.sha256 {
            return Ok(Some(format!(
                "SHA-256 mismatch for {}: expected {}, got {}",
                self.final_path.display(),
                hex(&self.header.sha256),
                hex(&digest)
            )));
        }
        let on_disk = self.partial.metadata().map_err(|e| Error::io(&self.partial_path, e))?;
        if on_disk.len() != self.header.total_size {
            return Ok(Some(format!(
                "{} holds {} bytes, expected {}",
                self.partial_path.display(),
                on_disk.len(),
                self.header.total_size
            )));
        }
        Ok(None)
    }

    /// Removes the (garbage) partial and progress files and builds the integrity error.
    fn discard(self, mut msg: String) -> Error {
        let progress_path = progress_path_for(&self.final_path);
        let partial_path = self.partial_path.clone();
        drop(self);
        match remove_pair(&partial_path, &progress_path) {
            Ok(()) => msg.push_str("; the received bytes were discarded"),
            Err(e) => msg.push_str(&format!(" (and cleaning up failed: {e})")),
        }
        Error::SnapshotIntegrity(msg)
    }

    /// fsync, rename into place, fsync the directory, then drop the progress file.
    fn publish(self) -> Result<PathBuf> {
        let SnapshotAssembler { final_path, partial_path, partial, progress, .. } = self;
        partial.sync_all().map_err(|e| Error::io(&partial_path, e))?;
        // Close both files first: Windows cannot rename or delete files that are still open.
        drop((partial, progress));
        fs::rename(&partial_path, &final_path).map_err(|e| Error::io(&final_path, e))?;
        let dir = match final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        pio::sync_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        // The snapshot is published; a progress file that cannot be removed is harmless (without
        // its partial file it is never resumed, and the next `create` overwrites it).
        let _ = remove_if_present(&progress_path_for(&final_path));
        Ok(final_path)
    }

    /// Gives up the transfer (for example because the leader changed) and removes the partial
    /// and progress files, so no garbage is left behind.
    pub fn abort(self) -> Result<()> {
        let SnapshotAssembler { final_path, partial_path, partial, progress, .. } = self;
        drop((partial, progress));
        remove_pair(&partial_path, &progress_path_for(&final_path))
    }
}

/// Re-reads one recorded region of the partial file, feeding `hasher`; returns whether its CRC
/// still matches. A file that ends early simply fails verification.
fn verify_region(
    partial: &File,
    path: &Path,
    record: &Record,
    hasher: &mut Sha256,
    buf: &mut Vec<u8>,
) -> Result<bool> {
    let mut crc = 0u32;
    let mut pos = record.offset;
    let end = record.offset + record.len;
    while pos < end {
        let n = (end - pos).min(IO_BLOCK as u64) as usize;
        buf.resize(n.max(buf.len()), 0);
        match pio::read_exact_at(partial, &mut buf[..n], pos) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(Error::io(path, e)),
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(crc == record.crc32c)
}

/// Removes the partial file first: a progress file without its partial is never resumed.
fn remove_pair(partial: &Path, progress: &Path) -> Result<()> {
    remove_if_present(partial)?;
    remove_if_present(progress)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}
