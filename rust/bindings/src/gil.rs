//! The one way a long Rust call releases the GIL.
//!
//! Every call that may touch the disk or hash many bytes goes through [`detach`], so other Python
//! threads (and an asyncio loop awaiting `run_in_executor`) keep running meanwhile.

use pyo3::prelude::*;

/// Runs `f` with the GIL released and maps a core error to its Python exception.
pub fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> dengine_core::Result<T> + Send,
{
    py.detach(f).map_err(crate::errors::to_py)
}
