//! `BackgroundSync`: a log store's `sync` on a thread of its own, signalled to an event loop
//! through a socket it watches (see `loop_thread`).
//!
//! A sync through `run_in_executor` costs a Python worker thread two GIL hand-offs and a
//! thread-safe callback before the loop hears of it: on a busy two-core machine, a few hundred
//! microseconds on the path of every write. Here the loop only flips a flag and wakes the
//! thread; the thread syncs without ever taking the GIL and writes one byte that wakes the loop.

use std::sync::Arc;

use dengine_core::log::LogStore;
use dengine_core::Error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::StorageError;
use crate::log::LogStoreBase;
use crate::loop_thread::{LoopThread, Priority, Shared, Waker};

#[derive(Default)]
struct State {
    requested: bool,
    /// The outcome of the last sync nobody has taken yet. A failure is kept over any later
    /// success: after a failed fsync nothing written before it may be called durable.
    outcome: Option<Result<u64, Error>>,
}

/// Syncs a built-in log store on a dedicated thread. `request()` asks for a sync of everything
/// appended so far; when one completes, a byte arrives on `fileno()` and `take()` returns the
/// durable index (or raises the store's error).
#[pyclass(frozen, module = "dengine._core")]
pub struct BackgroundSync {
    thread: LoopThread<State>,
}

fn run(store: Arc<dyn LogStore>, shared: Arc<Shared<State>>, waker: Waker) {
    while shared.wait_for(|s| std::mem::take(&mut s.requested).then_some(())).is_some() {
        let outcome = store.sync();
        let mut slot = shared.lock();
        if !matches!(slot.state.outcome, Some(Err(_))) {
            slot.state.outcome = Some(outcome);
        }
        drop(slot);
        if !waker.wake() {
            return; // the loop's end is gone: the store is being closed
        }
    }
}

#[pymethods]
impl BackgroundSync {
    #[new]
    fn new(store: &Bound<'_, LogStoreBase>) -> PyResult<Self> {
        let inner = store.get().store();
        let thread = LoopThread::spawn("dengine-sync", Priority::Normal, move |shared, waker| {
            run(inner, shared, waker)
        })?;
        Ok(BackgroundSync { thread })
    }

    /// The file descriptor to watch for readability (`loop.add_reader`).
    fn fileno(&self) -> i32 {
        self.thread.fileno()
    }

    /// Asks for a sync of everything appended before this call; cheap, never blocks on the disk.
    fn request(&self) -> PyResult<()> {
        let mut slot = self.thread.lock();
        if slot.closed {
            return Err(PyRuntimeError::new_err("the background sync is closed"));
        }
        slot.state.requested = true;
        drop(slot);
        self.thread.notify();
        Ok(())
    }

    /// The durable index from the last completed sync, or None if none completed since the last
    /// call; raises the store's error if a sync failed, and StorageError once the thread is gone
    /// (the socket then stays readable: the caller must stop watching it). Also drains the
    /// wake-up bytes.
    fn take(&self) -> PyResult<Option<u64>> {
        let gone = self.thread.drain();
        let outcome = self.thread.lock().state.outcome.take();
        match outcome {
            Some(Ok(durable)) => Ok(Some(durable)),
            Some(Err(e)) => Err(crate::errors::to_py(e)),
            None if gone => Err(StorageError::new_err("the log's sync thread stopped")),
            None => Ok(None),
        }
    }

    /// Stops the thread after the sync it may be running (an fsync at worst, waited for with the
    /// GIL released); later requests raise.
    fn close(&self, py: Python<'_>) {
        self.thread.close(py);
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BackgroundSync>()
}
