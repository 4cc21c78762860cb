//! The sender side: cutting an immutable snapshot file into CRC-tagged chunks.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::IO_BLOCK;
use crate::pio;
use crate::{Error, Result};

/// One piece of a snapshot file as it travels from leader to follower.
///
/// The CRC-32C lets the receiver reject a chunk damaged in transit before writing it; the
/// whole-file SHA-256 (sent once, with the snapshot metadata) catches everything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Byte position of `data[0]` in the snapshot file.
    pub offset: u64,
    /// The chunk's bytes; `chunk_size` long except for the last chunk.
    pub data: Vec<u8>,
    /// CRC-32C (Castagnoli) of `data`.
    pub crc32c: u32,
    /// True for the chunk that ends the file, so the receiver knows to call `finish`.
    pub is_last: bool,
}

impl Chunk {
    /// Offset just past this chunk: where the next chunk starts.
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// Reads chunks of one snapshot file at any chunk boundary.
///
/// Snapshot files are immutable once published, so the size and SHA-256 are taken once at open.
/// Reads are positional (`&self`), so one chunker can serve several concurrent readers.
#[derive(Debug)]
pub struct SnapshotChunker {
    path: PathBuf,
    file: File,
    size: u64,
    chunk_size: u64,
    sha256: [u8; 32],
}

impl SnapshotChunker {
    /// Opens `path` and computes its SHA-256 in one streaming pass.
    ///
    /// Use [`SnapshotChunker::open_with_sha256`] when the digest is already known (for example
    /// stored in the snapshot's metadata), to skip reading the whole file.
    pub fn open(path: impl Into<PathBuf>, chunk_size: u64) -> Result<Self> {
        let mut chunker = Self::open_unhashed(path.into(), chunk_size)?;
        chunker.sha256 = chunker.hash_file()?;
        Ok(chunker)
    }

    /// Opens `path` trusting `sha256` as the digest of its content. A wrong digest is not noticed
    /// here; the receiver will reject the assembled file.
    pub fn open_with_sha256(path: impl Into<PathBuf>, chunk_size: u64, sha256: [u8; 32]) -> Result<Self> {
        let mut chunker = Self::open_unhashed(path.into(), chunk_size)?;
        chunker.sha256 = sha256;
        Ok(chunker)
    }

    fn open_unhashed(path: PathBuf, chunk_size: u64) -> Result<Self> {
        if chunk_size == 0 {
            return Err(Error::InvalidArgument("chunk_size must be greater than 0".into()));
        }
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!("{} is not a regular file", path.display())));
        }
        Ok(SnapshotChunker { path, file, size: meta.len(), chunk_size, sha256: [0; 32] })
    }

    fn hash_file(&self) -> Result<[u8; 32]> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; usize::try_from(self.size).map_or(IO_BLOCK, |s| s.min(IO_BLOCK))];
        let mut pos = 0u64;
        while pos < self.size {
            let n = (self.size - pos).min(buf.len() as u64) as usize;
            self.read_at(&mut buf[..n], pos)?;
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(hasher.finalize().into())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        pio::read_exact_at(&self.file, buf, offset).map_err(|e| {
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    e.kind(),
                    format!(
                        "file is shorter than the {} bytes it had when opened \
                         (snapshot files must not change while being sent)",
                        self.size
                    ),
                )
            } else {
                e
            };
            Error::io(&self.path, e)
        })
    }

    /// The snapshot file being sent.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes, as seen at open.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per chunk (the last chunk may be shorter).
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// SHA-256 of the whole file, for the receiver's final check.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// Number of chunks; an empty file still has one (empty) chunk, so the receiver always gets
    /// a last chunk to act on.
    pub fn chunk_count(&self) -> u64 {
        if self.size == 0 {
            1
        } else {
            self.size.div_ceil(self.chunk_size)
        }
    }

    /// Length of the chunk starting at `offset`, after checking that `offset` is a chunk boundary
    /// inside the file.
    pub fn chunk_len(&self, offset: u64) -> Result<u64> {
        if self.size == 0 && offset == 0 {
            return Ok(0);
        }
        if offset >= self.size {
            return Err(Error::InvalidArgument(format!(
                "offset {offset} is at or past the end of the snapshot ({} bytes)",
                self.size
            )));
        }
        // Not `is_multiple_of`: that needs Rust 1.87 and the workspace supports 1.85.
        let misalignment = offset % self.chunk_size;
        if misalignment != 0 {
            return Err(Error::InvalidArgument(format!(
                "offset {offset} is not a multiple of the chunk size {}",
                self.chunk_size
            )));
        }
        Ok(self.chunk_size.min(self.size - offset))
    }

    /// Reads the chunk that starts at `offset` into `buf`, which must be exactly
    /// [`chunk_len`](Self::chunk_len) bytes, and returns its CRC-32C: for a caller that owns the
    /// buffer the bytes must end up in (the Python bindings fill a `bytes` object directly).
    pub fn read_chunk_into(&self, offset: u64, buf: &mut [u8]) -> Result<u32> {
        let len = self.chunk_len(offset)?;
        if buf.len() as u64 != len {
            return Err(Error::InvalidArgument(format!(
                "the chunk at offset {offset} has {len} bytes, the buffer {}",
                buf.len()
            )));
        }
        self.read_at(buf, offset)?;
        Ok(crc32c::crc32c(buf))
    }

    /// Reads the chunk that starts at `offset` (a multiple of the chunk size below the file size,
    /// or 0 for an empty file).
    pub fn chunk_at(&self, offset: u64) -> Result<Chunk> {
        let len = self.chunk_len(offset)?;
        let len_usize = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("chunk of {len} bytes does not fit in memory")))?;
        let mut data = vec![0u8; len_usize];
        self.read_at(&mut data, offset)?;
        Ok(Chunk { offset, crc32c: crc32c::crc32c(&data), is_last: offset + len == self.size, data })
    }

    /// A cursor positioned at `start_offset`, which must be a chunk boundary or exactly the file
    /// size (a receiver that already has everything then gets no chunks).
    pub fn cursor(&self, start_offset: u64) -> Result<ChunkCursor> {
        if start_offset == self.size && self.size > 0 {
            return Ok(ChunkCursor { next: None });
        }
        self.chunk_len(start_offset)?;
        Ok(ChunkCursor { next: Some(start_offset) })
    }

    /// Iterates over the chunks from `start_offset` to the end of the file.
    pub fn chunks(&self, start_offset: u64) -> Result<Chunks<'_>> {
        Ok(Chunks { chunker: self, cursor: self.cursor(start_offset)? })
    }
}

/// Where a sequential reader is in a snapshot file, kept apart from the chunker so that an owner
/// of a shared chunker (such as a Python iterator holding an `Arc`) can walk it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkCursor {
    next: Option<u64>,
}

impl ChunkCursor {
    /// Offset of the chunk the next call returns, or `None` when the file is exhausted.
    pub fn position(&self) -> Option<u64> {
        self.next
    }

    /// Reads the next chunk and advances. On error the cursor stays put, so the call can be
    /// retried.
    pub fn next_chunk(&mut self, chunker: &SnapshotChunker) -> Result<Option<Chunk>> {
        let Some(offset) = self.next else {
            return Ok(None);
        };
        let chunk = chunker.chunk_at(offset)?;
        self.next = if chunk.is_last { None } else { Some(chunk.end()) };
        Ok(Some(chunk))
    }
}

/// Iterator over a chunker's chunks; it stops after the first error.
pub struct Chunks<'a> {
    chunker: &'a SnapshotChunker,
    cursor: ChunkCursor,
}

impl Iterator for Chunks<'_> {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Result<Chunk>> {
        match self.cursor.next_chunk(self.chunker) {
            Ok(chunk) => chunk.map(Ok),
            Err(e) => {
                self.cursor.next = None;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.bin");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn zero_chunk_size_is_invalid() {
        let (_d, path) = file_with(b"abc");
        assert!(matches!(SnapshotChunker::open(&path, 0), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn missing_file_is_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.bin");
        let err = SnapshotChunker::open(&path, 4).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("nope.bin"), "{err}");
    }

    #[test]
    fn sha256_matches_known_digest() {
        let (_d, path) = file_with(b"abc");
        let c = SnapshotChunker::open(&path, 2).unwrap();
        assert_eq!(
            super::super::hex(c.sha256()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let c = SnapshotChunker::open_with_sha256(&path, 2, [9; 32]).unwrap();
        assert_eq!(c.sha256(), &[9; 32]);
    }

    #[test]
    fn chunks_cover_the_file_with_crcs_and_one_last_flag() {
        let data: Vec<u8> = (0..10u8).collect();
        let (_d, path) = file_with(&data);
        let c = SnapshotChunker::open(&path, 4).unwrap();
        assert_eq!(c.chunk_count(), 3);
        let chunks: Vec<Chunk> = c.chunks(0).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(chunks.iter().map(|c| c.offset).collect::<Vec<_>>(), vec![0, 4, 8]);
        assert_eq!(chunks[2].data, vec![8, 9]);
        assert_eq!(chunks.iter().map(|c| c.is_last).collect::<Vec<_>>(), vec![false, false, true]);
        for ch in &chunks {
            assert_eq!(ch.crc32c, crc32c::crc32c(&ch.data));
        }
        // Resuming at a boundary yields the tail only.
        let tail: Vec<u64> = c.chunks(4).unwrap().map(|r| r.unwrap().offset).collect();
        assert_eq!(tail, vec![4, 8]);
        // Starting at the end yields nothing.
        assert_eq!(c.chunks(10).unwrap().count(), 0);
    }

    #[test]
    fn exact_multiple_has_no_trailing_empty_chunk() {
        let (_d, path) = file_with(&[1; 8]);
        let c = SnapshotChunker::open(&path, 4).unwrap();
        assert_eq!(c.chunk_count(), 2);
        assert!(c.chunk_at(4).unwrap().is_last);
        assert!(!c.chunk_at(0).unwrap().is_last);
        assert!(matches!(c.chunk_at(8), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn empty_file_has_one_empty_last_chunk() {
        let (_d, path) = file_with(b"");
        let c = SnapshotChunker::open(&path, 4).unwrap();
        assert_eq!(c.chunk_count(), 1);
        let ch = c.chunk_at(0).unwrap();
        assert_eq!((ch.offset, ch.data.len(), ch.is_last), (0, 0, true));
        assert_eq!(ch.crc32c, 0);
        assert_eq!(c.chunks(0).unwrap().count(), 1);
        assert!(c.chunk_at(4).is_err());
    }

    #[test]
    fn misaligned_or_past_end_offsets_are_rejected() {
        let (_d, path) = file_with(&[0; 10]);
        let c = SnapshotChunker::open(&path, 4).unwrap();
        let err = c.chunk_at(3).unwrap_err();
        assert!(err.to_string().contains("offset 3"), "{err}");
        assert!(matches!(c.chunk_at(12), Err(Error::InvalidArgument(_))));
        assert!(matches!(c.chunks(2), Err(Error::InvalidArgument(_))));
        assert!(matches!(c.chunks(11), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn file_shrunk_after_open_is_an_io_error() {
        let (_d, path) = file_with(&[5; 10]);
        let c = SnapshotChunker::open(&path, 4).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(6).unwrap();
        let err = c.chunk_at(4).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("shorter"), "{err}");
        // The cursor does not advance past a failed read.
        let mut cur = c.cursor(4).unwrap();
        assert!(cur.next_chunk(&c).is_err());
        assert_eq!(cur.position(), Some(4));
    }
}
