//! Snapshot transfer for Python: `SnapshotChunk`, `SnapshotChunker` (with its iterator) and
//! `SnapshotAssembler`.
//!
//! Conversion only; every rule lives in `dengine_core::snapshot`. Everything that reads, writes
//! or hashes file data runs through [`gil::detach`], so a multi-megabyte chunk or a whole-file
//! SHA-256 never holds up the event loop's thread. Mutable state sits behind a `std::sync::Mutex`
//! that is only ever locked with the GIL released, so a thread waiting for it never blocks the
//! thread holding it from getting the GIL back.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use dengine_core::snapshot::{Chunk, ChunkCursor, SnapshotAssembler, SnapshotChunker};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::gil;

/// Adds the snapshot classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySnapshotChunk>()?;
    m.add_class::<PySnapshotChunker>()?;
    m.add_class::<PySnapshotChunkIterator>()?;
    m.add_class::<PySnapshotAssembler>()?;
    m.add_function(wrap_pyfunction!(split_snapshot_chunk, m)?)?;
    Ok(())
}

/// Locks a mutex, ignoring poisoning: every core call leaves its state consistent on error, so a
/// panic elsewhere does not make the value unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Checks a digest passed from Python and turns it into the fixed-size array the core wants.
fn digest(sha256: &[u8]) -> PyResult<[u8; 32]> {
    sha256.try_into().map_err(|_| {
        PyValueError::new_err(format!("sha256 must be 32 bytes (a raw SHA-256 digest), got {}", sha256.len()))
    })
}

/// Paths go back to Python as `str` (lossless: non-UTF-8 bytes use the file system's
/// surrogateescape), matching what `os.fspath` would give.
fn path_to_str<'py>(py: Python<'py>, path: &Path) -> Bound<'py, PyString> {
    match path.as_os_str().into_pyobject(py) {
        Ok(s) => s,
        Err(never) => match never {},
    }
}

/// One piece of a snapshot file on its way from leader to follower: immutable, comparable and
/// hashable, so a transport can queue, retry and deduplicate it freely.
#[pyclass(name = "SnapshotChunk", module = "dengine._core", frozen)]
pub struct PySnapshotChunk {
    /// Byte position of the chunk's first byte in the snapshot file.
    #[pyo3(get)]
    offset: u64,
    /// The chunk's bytes.
    #[pyo3(get)]
    data: Py<PyBytes>,
    /// CRC-32C (Castagnoli) of `data`, checked by the receiver before writing.
    #[pyo3(get)]
    crc32c: u32,
    /// True for the chunk that ends the file.
    #[pyo3(get)]
    is_last: bool,
}

impl PySnapshotChunk {
    fn from_core(py: Python<'_>, chunk: Chunk) -> Self {
        Self {
            offset: chunk.offset,
            data: PyBytes::new(py, &chunk.data).unbind(),
            crc32c: chunk.crc32c,
            is_last: chunk.is_last,
        }
    }
}

#[pymethods]
impl PySnapshotChunk {
    /// Builds a chunk from parts received over the network. The CRC is not checked here; the
    /// assembler checks it when the chunk is accepted.
    #[new]
    fn new(offset: u64, data: Py<PyBytes>, crc32c: u32, is_last: bool) -> Self {
        Self { offset, data, crc32c, is_last }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "SnapshotChunk(offset={}, len={}, crc32c=0x{:08x}, is_last={})",
            self.offset,
            self.data.bind(py).as_bytes().len(),
            self.crc32c,
            if self.is_last { "True" } else { "False" }
        )
    }

    fn __eq__(&self, py: Python<'_>, other: PyRef<'_, Self>) -> bool {
        self.offset == other.offset
            && self.crc32c == other.crc32c
            && self.is_last == other.is_last
            && self.data.bind(py).as_bytes() == other.data.bind(py).as_bytes()
    }

    fn __hash__(&self, py: Python<'_>) -> u64 {
        // The CRC stands in for the bytes: equal chunks have equal CRCs, and hashing is O(1).
        let mut h = DefaultHasher::new();
        (self.offset, self.data.bind(py).as_bytes().len(), self.crc32c, self.is_last).hash(&mut h);
        h.finish()
    }
}

/// Reads an immutable snapshot file as CRC-tagged chunks, from any chunk boundary.
///
/// The file's SHA-256 is computed once when the chunker is created (GIL released), unless the
/// caller already knows it and passes `sha256`.
#[pyclass(name = "SnapshotChunker", module = "dengine._core", frozen)]
pub struct PySnapshotChunker {
    inner: Arc<SnapshotChunker>,
}

#[pymethods]
impl PySnapshotChunker {
    #[new]
    #[pyo3(
        signature = (path, chunk_size = 1 << 20, sha256 = None),
        text_signature = "(path, chunk_size=1048576, sha256=None)"
    )]
    fn new(py: Python<'_>, path: PathBuf, chunk_size: u64, sha256: Option<&[u8]>) -> PyResult<Self> {
        let known = sha256.map(digest).transpose()?;
        let chunker = gil::detach(py, || match known {
            Some(sha) => SnapshotChunker::open_with_sha256(path, chunk_size, sha),
            None => SnapshotChunker::open(path, chunk_size),
        })?;
        Ok(Self { inner: Arc::new(chunker) })
    }

    /// The snapshot file being sent.
    #[getter]
    fn path<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        path_to_str(py, self.inner.path())
    }

    /// Size of the file in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    /// SHA-256 of the whole file (32 raw bytes), to send with the snapshot metadata.
    #[getter]
    fn sha256<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.sha256())
    }

    /// Bytes per chunk; the last chunk may be shorter.
    #[getter]
    fn chunk_size(&self) -> u64 {
        self.inner.chunk_size()
    }

    /// Number of chunks (an empty file has one empty chunk).
    #[getter]
    fn chunk_count(&self) -> u64 {
        self.inner.chunk_count()
    }

    /// Reads the chunk starting at `offset`, a multiple of `chunk_size` below `size`.
    fn chunk_at(&self, py: Python<'_>, offset: u64) -> PyResult<PySnapshotChunk> {
        let len = self.inner.chunk_len(offset).map_err(crate::errors::to_py)?;
        let len = usize::try_from(len)
            .map_err(|_| PyValueError::new_err(format!("a chunk of {len} bytes does not fit in memory")))?;
        // Read straight into the new bytes object (not yet visible to Python, so the GIL can be
        // released while it fills): one copy of each chunk fewer on a snapshot's hot path.
        let mut crc32c = 0;
        let data = PyBytes::new_with(py, len, |buf| {
            crc32c = gil::detach(py, || self.inner.read_chunk_into(offset, buf))?;
            Ok(())
        })?;
        let is_last = offset + len as u64 == self.inner.size();
        Ok(PySnapshotChunk { offset, data: data.unbind(), crc32c, is_last })
    }

    /// Iterates over the chunks from `start_offset` (a chunk boundary, or `size` for nothing).
    #[pyo3(signature = (start_offset = 0))]
    fn chunks(&self, start_offset: u64) -> PyResult<PySnapshotChunkIterator> {
        let cursor = self.inner.cursor(start_offset).map_err(crate::errors::to_py)?;
        Ok(PySnapshotChunkIterator { chunker: Arc::clone(&self.inner), cursor: Mutex::new(cursor) })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "SnapshotChunker(path={}, size={}, chunk_size={})",
            self.path(py).repr()?,
            self.inner.size(),
            self.inner.chunk_size()
        ))
    }
}

/// The iterator returned by `SnapshotChunker.chunks`; each step reads one chunk with the GIL
/// released.
#[pyclass(name = "SnapshotChunkIterator", module = "dengine._core", frozen)]
pub struct PySnapshotChunkIterator {
    chunker: Arc<SnapshotChunker>,
    cursor: Mutex<ChunkCursor>,
}

#[pymethods]
impl PySnapshotChunkIterator {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PySnapshotChunk>> {
        let chunk = gil::detach(py, || lock(&self.cursor).next_chunk(&self.chunker))?;
        Ok(chunk.map(|c| PySnapshotChunk::from_core(py, c)))
    }
}

/// Receives one snapshot file chunk by chunk, resuming an interrupted transfer of the same
/// snapshot, and publishes it at `final_path` only after its SHA-256 checks out.
///
/// After `finish()` (successful or not, except for an incomplete transfer) or `abort()`, the
/// assembler is closed: `accept`, `accept_raw`, `finish`, `next_offset` and `is_complete` raise
/// `ValueError`, like a closed file; `abort()` becomes a no-op.
#[pyclass(name = "SnapshotAssembler", module = "dengine._core", frozen)]
pub struct PySnapshotAssembler {
    final_path: PathBuf,
    total_size: u64,
    /// `None` once finished or aborted.
    inner: Mutex<Option<SnapshotAssembler>>,
}

impl PySnapshotAssembler {
    /// Runs `f` on the open assembler with the GIL released, or raises `ValueError` if closed.
    fn with_open<T, F>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        T: Send,
        F: FnOnce(&mut SnapshotAssembler) -> dengine_core::Result<T> + Send,
    {
        gil::detach(py, || lock(&self.inner).as_mut().map(f).transpose())?.ok_or_else(|| self.closed())
    }

    fn closed(&self) -> PyErr {
        PyValueError::new_err(format!(
            "the snapshot assembler for {} is closed (finish() or abort() already ran)",
            self.final_path.display()
        ))
    }
}

#[pymethods]
impl PySnapshotAssembler {
    #[new]
    fn new(py: Python<'_>, final_path: PathBuf, total_size: u64, sha256: &[u8]) -> PyResult<Self> {
        let sha256 = digest(sha256)?;
        let path = final_path.clone();
        let inner = gil::detach(py, || SnapshotAssembler::create(path, total_size, sha256))?;
        Ok(Self { final_path, total_size, inner: Mutex::new(Some(inner)) })
    }

    /// Offset of the next byte wanted: where the sender should (re)start.
    #[getter]
    fn next_offset(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_open(py, |a| Ok(a.next_offset()))
    }

    /// Declared size of the whole snapshot.
    #[getter]
    fn total_size(&self) -> u64 {
        self.total_size
    }

    /// Where the snapshot is published by `finish()`.
    #[getter]
    fn final_path<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        path_to_str(py, &self.final_path)
    }

    /// True once every byte has arrived (the SHA-256 is checked by `finish()`).
    #[getter]
    fn is_complete(&self, py: Python<'_>) -> PyResult<bool> {
        self.with_open(py, |a| Ok(a.is_complete()))
    }

    /// Accepts a chunk; raises `SnapshotChunkError` (and changes nothing) if it is corrupt, out
    /// of order, past the end, or conflicts with bytes already received.
    fn accept(&self, py: Python<'_>, chunk: PyRef<'_, PySnapshotChunk>) -> PyResult<()> {
        let (offset, crc) = (chunk.offset, chunk.crc32c);
        let data = chunk.data.bind(py).as_bytes();
        self.with_open(py, |a| a.accept(offset, data, crc))
    }

    /// Like `accept`, from the parts of a chunk as they arrived over the network.
    fn accept_raw(&self, py: Python<'_>, offset: u64, data: &[u8], crc32c: u32) -> PyResult<()> {
        self.with_open(py, |a| a.accept(offset, data, crc32c))
    }

    /// Like `accept_raw`, for a chunk whose bytes are `buffer[start:start + length]` (the
    /// serialized message it arrived in, see `split_snapshot_chunk`): nothing is copied out.
    fn accept_slice(
        &self,
        py: Python<'_>,
        buffer: &[u8],
        start: usize,
        length: usize,
        offset: u64,
        crc32c: u32,
    ) -> PyResult<()> {
        let data = start.checked_add(length).and_then(|end| buffer.get(start..end)).ok_or_else(|| {
            PyValueError::new_err(format!(
                "bytes {start}..+{length} lie outside a buffer of {} bytes",
                buffer.len()
            ))
        })?;
        self.with_open(py, |a| a.accept(offset, data, crc32c))
    }

    /// Verifies the SHA-256 and atomically publishes the file; returns the final path.
    ///
    /// An incomplete transfer raises `SnapshotIntegrityError` and leaves the assembler open. A
    /// digest mismatch raises `SnapshotIntegrityError`, removes the received bytes and closes it.
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyString>> {
        let published = gil::detach(py, || {
            let mut guard = lock(&self.inner);
            let Some(open) = guard.take() else {
                return Ok(false);
            };
            if let Err(incomplete) = open.check_complete() {
                *guard = Some(open);
                return Err(incomplete);
            }
            open.finish().map(|_| true)
        })?;
        if !published {
            return Err(self.closed());
        }
        Ok(self.final_path(py))
    }

    /// Flushes the bytes received so far to disk (fdatasync), from any thread, without holding
    /// up `accept`: called now and then during a transfer, it leaves `finish()` little to flush.
    fn flush_received(&self, py: Python<'_>) -> PyResult<()> {
        let file = self.with_open(py, |a| a.data_file())?;
        let path = self.final_path.clone();
        gil::detach(py, || file.sync_data().map_err(|e| dengine_core::Error::io(&path, e)))?;
        Ok(())
    }

    /// Gives up the transfer and removes the partial and progress files. A no-op once closed.
    fn abort(&self, py: Python<'_>) -> PyResult<()> {
        gil::detach(py, || match lock(&self.inner).take() {
            Some(open) => open.abort(),
            None => Ok(()),
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "SnapshotAssembler(final_path={}, total_size={})",
            self.final_path(py).repr()?,
            self.total_size
        ))
    }
}

/// Finds the parts of a serialized `dengine.v1.SnapshotChunk` message without copying its data:
/// returns `(header bytes, offset, crc32c, data start, data length)`. Raises
/// `SnapshotChunkError` for a malformed message.
#[pyfunction]
pub fn split_snapshot_chunk<'py>(
    py: Python<'py>,
    message: &[u8],
) -> PyResult<(Bound<'py, PyBytes>, u64, u32, usize, usize)> {
    let fields = dengine_core::snapshot::parse_chunk_message(message).map_err(crate::errors::to_py)?;
    let header = PyBytes::new(py, &message[fields.header]);
    Ok((header, fields.offset, fields.crc32c, fields.data.start, fields.data.len()))
}
