//! `WriteBehind`: a snapshot file written from Python goes to the disk a step at a time while it
//! is written (see `dengine_core::write_behind`), as the built-in store's Rust writer does.

use dengine_core::write_behind::{WriteBehind, STEP};
use pyo3::prelude::*;

#[cfg(unix)]
use crate::gil;

#[pyclass(name = "WriteBehind", module = "dengine._core")]
pub struct PyWriteBehind {
    inner: WriteBehind,
    fd: i32,
}

#[pymethods]
impl PyWriteBehind {
    /// Bytes between two writebacks.
    #[classattr]
    const STEP: u64 = STEP;

    /// For the open file descriptor `fd`, whose bytes before `offset` are left to its final sync.
    /// The caller keeps `fd` open while it uses this object.
    #[new]
    fn new(fd: i32, offset: u64) -> PyResult<Self> {
        check_fd(fd)?;
        Ok(Self { inner: WriteBehind::new(offset), fd })
    }

    /// The file has been written (and flushed from any user-space buffer) up to `end`: starts the
    /// writeback of the latest step once there is one and, with `wait`, waits for the steps
    /// before it. A writer on an event loop's thread passes `wait=False`: the loop must not
    /// block on the disk.
    #[pyo3(signature = (end, *, wait = true))]
    fn wrote(&mut self, py: Python<'_>, end: u64, wait: bool) -> PyResult<()> {
        #[cfg(unix)]
        {
            use std::os::fd::FromRawFd;
            let (fd, inner) = (self.fd, &mut self.inner);
            gil::detach(py, || {
                // SAFETY: the caller keeps `fd` open (see `new`); ManuallyDrop never closes it.
                let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
                if wait {
                    inner.wrote(&file, end);
                } else {
                    inner.wrote_without_waiting(&file, end);
                }
                Ok(())
            })
        }
        #[cfg(not(unix))]
        {
            let _ = (py, end, wait, self.fd, &mut self.inner);
            Ok(())
        }
    }
}

/// Refuses a negative file descriptor from Python before it reaches a `File`, which must
/// never hold one (undefined behaviour).
pub fn check_fd(fd: i32) -> PyResult<()> {
    if fd < 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "fd must be an open file descriptor, got {fd}"
        )));
    }
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyWriteBehind>()
}
