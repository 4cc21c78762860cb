//! `Sha256`: the SHA-256 of a snapshot file being written, shared by Python and Rust writers.
//!
//! A snapshot's trailer holds the SHA-256 of everything before it. The file's head is written from
//! Python, and the built-in store's state, the bulk of it, from Rust with the GIL released for the
//! whole write (`KvSnapshotPieces.write_to`): both hash into this one object. Inputs of 64 KiB and
//! more are hashed with the GIL released.

use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use sha2::{Digest, Sha256};

use crate::gil;

/// Inputs at least this long are hashed without the GIL.
const DETACH_AT: usize = 64 * 1024;

#[pyclass(frozen, name = "Sha256", module = "dengine._core")]
pub struct PySha256 {
    state: Mutex<Sha256>,
}

impl PySha256 {
    fn lock(&self) -> MutexGuard<'_, Sha256> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hashes `data`, for a Rust writer (which holds no GIL).
    pub fn feed(&self, data: &[u8]) {
        self.lock().update(data);
    }
}

#[pymethods]
impl PySha256 {
    #[new]
    fn new() -> Self {
        PySha256 { state: Mutex::new(Sha256::new()) }
    }

    /// Hashes `data` (a `bytes`).
    fn update(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        if data.len() < DETACH_AT {
            self.feed(data);
            return Ok(());
        }
        gil::detach(py, || {
            self.feed(data);
            Ok(())
        })
    }

    /// An independent copy of the hash so far.
    fn copy(&self) -> Self {
        PySha256 { state: Mutex::new(self.lock().clone()) }
    }

    /// The digest of everything hashed so far (the hash itself goes on).
    fn digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.lock().clone().finalize())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySha256>()
}
