//! `EntryBatch`: consecutive log entries kept as the framed records they travel and are stored
//! as, so that a batch goes from the leader's log to the wire, and from the wire into a
//! follower's log, without a Python object per entry.
//!
//! It reads like a sequence of `Entry` (length, indexing, slicing, iteration): code that needs
//! single entries (a conflict check, a membership change) builds just those.

use std::sync::OnceLock;

use dengine_core::log::EncodedBatch;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PySlice};

use crate::gil::detach;
use crate::log::Entry;

/// Consecutive entries as framed records (see the module docs); a `Sequence[Entry]`.
#[pyclass(frozen, sequence, module = "dengine._core")]
pub struct EntryBatch {
    pub(crate) batch: EncodedBatch,
    /// The records as one `bytes`, made once: a leader sends the same batch to every follower.
    wire: OnceLock<Py<PyBytes>>,
}

impl EntryBatch {
    pub(crate) fn new(batch: EncodedBatch) -> Self {
        EntryBatch { batch, wire: OnceLock::new() }
    }

    /// The framed records as a `bytes` object, shared by every caller.
    pub(crate) fn wire_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        self.wire.get_or_init(|| PyBytes::new(py, self.batch.as_bytes()).unbind()).bind(py).clone()
    }

    fn entry(&self, py: Python<'_>, position: usize) -> Entry {
        let (index, term, data) = self.batch.get(position).expect("position checked by the caller");
        Entry { index, term, data: PyBytes::new(py, data).unbind() }
    }
}

#[pymethods]
impl EntryBatch {
    /// Verifies and frames what `to_bytes` (or the leader's `encode_entries`) produced; raises
    /// ValueError on any damage.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let owned = data.to_vec();
        let batch = detach(py, move || EncodedBatch::from_bytes(owned))?;
        Ok(EntryBatch::new(batch))
    }

    /// `Entry(first + i, term, payloads[i])` for each payload, framed at once: what a leader
    /// appends for a batch of proposals and then sends to its followers as it is.
    #[staticmethod]
    fn from_payloads(first: u64, term: u64, payloads: Vec<Bound<'_, PyBytes>>) -> PyResult<Self> {
        let size = payloads.iter().map(|p| p.as_bytes().len()).sum();
        let mut batch = EncodedBatch::with_capacity(payloads.len(), size);
        for (index, data) in (first..).zip(&payloads) {
            batch.push(index, term, data.as_bytes()).map_err(crate::errors::to_py)?;
        }
        Ok(EntryBatch::new(batch))
    }

    /// The framed records, as they travel in `RaftMessage.entries`.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        self.wire_bytes(py)
    }

    /// Size of the framed records in bytes (payloads and their headers).
    #[getter]
    fn framed_bytes(&self) -> usize {
        self.batch.as_bytes().len()
    }

    /// Index of the first entry (0 for an empty batch).
    #[getter]
    fn first_index(&self) -> u64 {
        if self.batch.is_empty() {
            0
        } else {
            self.batch.first_index()
        }
    }

    /// Index of the last entry (0 for an empty batch).
    #[getter]
    fn last_index(&self) -> u64 {
        if self.batch.is_empty() {
            0
        } else {
            self.batch.first_index() + self.batch.len() as u64 - 1
        }
    }

    /// Log indexes of the entries whose payload starts with `first_byte` (say, membership
    /// changes), found without building the others.
    fn indexes_with_first_byte(&self, first_byte: u8) -> Vec<u64> {
        self.batch
            .iter()
            .filter(|(_, _, data)| data.first() == Some(&first_byte))
            .map(|(i, _, _)| i)
            .collect()
    }

    fn __len__(&self) -> usize {
        self.batch.len()
    }

    fn __getitem__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let len = self.batch.len();
        if let Ok(slice) = key.cast::<PySlice>() {
            let s = slice.indices(len as isize)?;
            if s.step != 1 {
                return Err(PyValueError::new_err("an EntryBatch slices with step 1 only"));
            }
            let (start, stop) = (s.start as usize, (s.stop.max(s.start)) as usize);
            let part = EntryBatch::new(self.batch.range(start, stop));
            return Ok(Py::new(py, part)?.into_any());
        }
        let i: isize = key.extract()?;
        let position = if i < 0 { i + len as isize } else { i };
        if position < 0 || position as usize >= len {
            return Err(PyIndexError::new_err("EntryBatch index out of range"));
        }
        Ok(Py::new(py, self.entry(py, position as usize))?.into_any())
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let entries: Vec<Entry> = (0..slf.batch.len()).map(|p| slf.entry(py, p)).collect();
        Ok(entries.into_pyobject(py)?.try_iter()?.into_any().unbind())
    }

    fn __repr__(&self) -> String {
        format!("EntryBatch({} entries from {})", self.batch.len(), self.first_index())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<EntryBatch>()
}
