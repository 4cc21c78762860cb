//! Python classes for the log store: `Entry`, `HardState`, `LogStoreBase` and its two engines.
//!
//! Both engines share one base class holding an `Arc<dyn LogStore>`, so every method is written
//! once and the engines differ only in how they are constructed.

use std::path::PathBuf;
use std::sync::Arc;

use dengine_core::log::{
    self as core_log, EncodedBatch, LogStore, MemLogStore, WalLogStore as CoreWal, WalOptions,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple, PyType};

use crate::entry_batch::EntryBatch;
use crate::gil::detach;

/// One Raft log entry: index, term and an opaque payload.
#[pyclass(frozen, eq, module = "dengine._core")]
pub struct Entry {
    #[pyo3(get)]
    pub(crate) index: u64,
    #[pyo3(get)]
    pub(crate) term: u64,
    #[pyo3(get)]
    pub(crate) data: Py<PyBytes>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
            && self.term == other.term
            && Python::attach(|py| self.data.as_bytes(py) == other.data.as_bytes(py))
    }
}

#[pymethods]
impl Entry {
    #[new]
    fn new(index: u64, term: u64, data: Py<PyBytes>) -> Self {
        Entry { index, term, data }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Entry(index={}, term={}, data=<{} bytes>)",
            self.index,
            self.term,
            self.data.as_bytes(py).len()
        )
    }

    fn __getnewargs__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(
            py,
            [
                self.index.into_pyobject(py)?.into_any(),
                self.term.into_pyobject(py)?.into_any(),
                self.data.bind(py).clone().into_any(),
            ],
        )
    }
}

impl Entry {
    fn from_core(py: Python<'_>, e: core_log::Entry) -> Entry {
        Entry { index: e.index, term: e.term, data: PyBytes::new(py, &e.data).unbind() }
    }
}

/// The Raft state that must survive restarts besides the log: current term, vote, commit index.
#[pyclass(frozen, eq, module = "dengine._core")]
#[derive(PartialEq, Clone, Copy)]
pub struct HardState {
    #[pyo3(get)]
    term: u64,
    #[pyo3(get)]
    vote: Option<u64>,
    #[pyo3(get)]
    commit: u64,
}

#[pymethods]
impl HardState {
    #[new]
    #[pyo3(signature = (term = 0, vote = None, commit = 0))]
    fn new(term: u64, vote: Option<u64>, commit: u64) -> Self {
        HardState { term, vote, commit }
    }

    fn __repr__(&self) -> String {
        let vote = self.vote.map_or("None".to_string(), |v| v.to_string());
        format!("HardState(term={}, vote={vote}, commit={})", self.term, self.commit)
    }
}

/// Shared implementation of the built-in engines; see `dengine.storage.LogStore` for the contract.
#[pyclass(frozen, subclass, module = "dengine._core")]
pub struct LogStoreBase {
    inner: Arc<dyn LogStore>,
}

impl LogStoreBase {
    /// The engine itself, for Rust code that works on it off the GIL.
    pub(crate) fn store(&self) -> Arc<dyn LogStore> {
        Arc::clone(&self.inner)
    }
}

#[pymethods]
impl LogStoreBase {
    fn first_index(&self) -> PyResult<u64> {
        self.inner.first_index().map_err(crate::errors::to_py)
    }

    fn last_index(&self) -> PyResult<u64> {
        self.inner.last_index().map_err(crate::errors::to_py)
    }

    fn term(&self, index: u64) -> PyResult<u64> {
        self.inner.term(index).map_err(crate::errors::to_py)
    }

    #[pyo3(signature = (lo, hi, max_bytes = None))]
    fn entries(&self, py: Python<'_>, lo: u64, hi: u64, max_bytes: Option<u64>) -> PyResult<Vec<Entry>> {
        let inner = Arc::clone(&self.inner);
        let got = detach(py, move || inner.entries(lo, hi, max_bytes.unwrap_or(u64::MAX)))?;
        Ok(got.into_iter().map(|e| Entry::from_core(py, e)).collect())
    }

    /// Indexes in `[lo, hi)` whose payload starts with `first_byte`, found without building
    /// a Python object per entry (a restart scans the whole log for membership changes).
    fn indexes_with_first_byte(
        &self,
        py: Python<'_>,
        lo: u64,
        hi: u64,
        first_byte: u8,
    ) -> PyResult<Vec<u64>> {
        let inner = Arc::clone(&self.inner);
        detach(py, move || {
            let mut found = Vec::new();
            let mut next = lo;
            while next < hi {
                let batch = inner.entries(next, hi, 8 << 20)?;
                let Some(last) = batch.last() else { break };
                next = last.index + 1;
                found.extend(batch.iter().filter(|e| e.data.first() == Some(&first_byte)).map(|e| e.index));
            }
            Ok(found)
        })
    }

    fn append(&self, py: Python<'_>, entries: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = Arc::clone(&self.inner);
        if let Ok(framed) = entries.cast::<EntryBatch>() {
            // Already framed (say, as a leader sent it): written as it is.
            let batch = &framed.get().batch;
            return detach(py, move || inner.append_batch(batch));
        }
        // Framing happens here, with the GIL held, straight from each payload's bytes: one copy
        // per entry into the buffer that is written to disk. Only the write releases the GIL.
        let batch = batch_from_entries(py, entries)?;
        detach(py, move || inner.append_batch(&batch))
    }

    /// `entries(lo, hi, max_bytes)` as an `EntryBatch`: what a leader sends a follower, read
    /// and framed without a Python object per entry.
    #[pyo3(signature = (lo, hi, max_bytes = None))]
    fn entry_batch(&self, py: Python<'_>, lo: u64, hi: u64, max_bytes: Option<u64>) -> PyResult<EntryBatch> {
        let inner = Arc::clone(&self.inner);
        let batch = detach(py, move || inner.entry_batch(lo, hi, max_bytes.unwrap_or(u64::MAX)))?;
        Ok(EntryBatch::new(batch))
    }

    fn truncate_suffix(&self, py: Python<'_>, index: u64) -> PyResult<()> {
        let inner = Arc::clone(&self.inner);
        detach(py, move || inner.truncate_suffix(index))
    }

    fn compact_prefix(&self, py: Python<'_>, index: u64) -> PyResult<()> {
        let inner = Arc::clone(&self.inner);
        detach(py, move || inner.compact_prefix(index))
    }

    fn reset(&self, py: Python<'_>, index: u64, term: u64) -> PyResult<()> {
        let inner = Arc::clone(&self.inner);
        detach(py, move || inner.reset(index, term))
    }

    fn save_hard_state(&self, py: Python<'_>, hard_state: &HardState) -> PyResult<()> {
        let hs =
            core_log::HardState { term: hard_state.term, vote: hard_state.vote, commit: hard_state.commit };
        let inner = Arc::clone(&self.inner);
        detach(py, move || inner.save_hard_state(hs))
    }

    fn hard_state(&self) -> PyResult<HardState> {
        let hs = self.inner.hard_state().map_err(crate::errors::to_py)?;
        Ok(HardState { term: hs.term, vote: hs.vote, commit: hs.commit })
    }

    fn sync(&self, py: Python<'_>) -> PyResult<u64> {
        let inner = Arc::clone(&self.inner);
        detach(py, move || inner.sync())
    }

    fn durable_index(&self) -> PyResult<u64> {
        self.inner.durable_index().map_err(crate::errors::to_py)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = Arc::clone(&self.inner);
        detach(py, move || inner.close())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<Bound<'_, PyType>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.close(py)
    }
}

/// The durable engine: a segmented, checksummed write-ahead log in a directory.
#[pyclass(frozen, extends = LogStoreBase, module = "dengine._core")]
pub struct WalLogStore {
    #[pyo3(get)]
    path: PathBuf,
    /// `(segment path, offset, bytes cut)` when recovery cut a crash-torn tail.
    #[pyo3(get)]
    torn_tail: Option<(PathBuf, u64, u64)>,
    #[pyo3(get)]
    removed_segments: usize,
}

#[pymethods]
impl WalLogStore {
    #[new]
    #[pyo3(signature = (path, *, segment_bytes = 67_108_864, preallocate = false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        segment_bytes: u64,
        preallocate: bool,
    ) -> PyResult<PyClassInitializer<Self>> {
        let dir = path.clone();
        let store = detach(py, move || CoreWal::open(&dir, WalOptions { segment_bytes, preallocate }))?;
        let report = store.recovery_report().clone();
        let torn_tail = report.torn_tail.map(|t| (t.path, t.offset, t.bytes_cut));
        if let Some((file, offset, cut)) = &torn_tail {
            let msg = format!(
                "cut a torn tail of {cut} bytes at offset {offset} of {} (a partial write from a crash)",
                file.display()
            );
            py.import("logging")?
                .call_method1("getLogger", ("dengine.storage",))?
                .call_method1("warning", (msg,))?;
        }
        let base = LogStoreBase { inner: Arc::new(store) };
        Ok(PyClassInitializer::from(base).add_subclass(WalLogStore {
            path,
            torn_tail,
            removed_segments: report.removed_segments,
        }))
    }

    fn __repr__(&self) -> String {
        format!("WalLogStore({:?})", self.path)
    }
}

/// The in-memory engine: the same contract, nothing on disk. For tests and simulation.
#[pyclass(frozen, extends = LogStoreBase, module = "dengine._core")]
pub struct MemoryLogStore {}

#[pymethods]
impl MemoryLogStore {
    #[new]
    fn new() -> PyClassInitializer<Self> {
        PyClassInitializer::from(LogStoreBase { inner: Arc::new(MemLogStore::new()) })
            .add_subclass(MemoryLogStore {})
    }

    fn __repr__(&self) -> String {
        "MemoryLogStore()".to_string()
    }
}

fn batch_from_entries(py: Python<'_>, entries: &Bound<'_, PyAny>) -> PyResult<EncodedBatch> {
    let mut batch = EncodedBatch::with_capacity(entries.len().unwrap_or(0), 0);
    for item in entries.try_iter()? {
        let item = item?;
        let e = item.cast::<Entry>()?.get();
        batch.push(e.index, e.term, e.data.as_bytes(py)).map_err(crate::errors::to_py)?;
    }
    Ok(batch)
}

/// Frames entries as one bytes value (the WAL record format) for the wire; `EntryBatch.from_bytes`
/// reads it back.
#[pyfunction]
fn encode_entries<'py>(py: Python<'py>, entries: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    if let Ok(framed) = entries.cast::<EntryBatch>() {
        return Ok(framed.get().wire_bytes(py));
    }
    let batch = batch_from_entries(py, entries)?;
    Ok(PyBytes::new(py, batch.as_bytes()))
}

/// `Entry(first + i, term, payloads[i])` for each payload, sharing the payload objects: what a
/// leader appends for a batch of proposals, built without a Python call per entry.
#[pyfunction]
fn entries_from_payloads(first: u64, term: u64, payloads: Vec<Bound<'_, PyBytes>>) -> Vec<Entry> {
    (first..).zip(payloads).map(|(index, data)| Entry { index, term, data: data.unbind() }).collect()
}

/// CRC32C (Castagnoli) of `data`, the checksum used by the WAL and snapshot chunks.
#[pyfunction(name = "crc32c")]
fn crc32c_of(data: &[u8]) -> u32 {
    ::crc32c::crc32c(data)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Entry>()?;
    m.add_class::<HardState>()?;
    m.add_class::<LogStoreBase>()?;
    m.add_class::<WalLogStore>()?;
    m.add_class::<MemoryLogStore>()?;
    m.add_function(wrap_pyfunction!(crc32c_of, m)?)?;
    m.add_function(wrap_pyfunction!(encode_entries, m)?)?;
    m.add_function(wrap_pyfunction!(entries_from_payloads, m)?)?;
    Ok(())
}
