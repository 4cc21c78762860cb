//! `BackgroundSync`: a log store's `sync` on a thread of its own, signalled to an event loop
//! through a socket it watches.
//!
//! A sync through `run_in_executor` costs a Python worker thread two GIL hand-offs and a
//! thread-safe callback before the loop hears of it: on a busy two-core machine, a few hundred
//! microseconds on the path of every write. Here the loop only flips a flag and wakes the
//! thread; the thread syncs without ever taking the GIL and writes one byte that wakes the loop.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use dengine_core::log::LogStore;
use dengine_core::Error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::StorageError;
use crate::log::LogStoreBase;

#[derive(Default)]
struct State {
    requested: bool,
    closed: bool,
    /// The outcome of the last sync nobody has taken yet. A failure is kept over any later
    /// success: after a failed fsync nothing written before it may be called durable.
    outcome: Option<Result<u64, Error>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Syncs a built-in log store on a dedicated thread. `request()` asks for a sync of everything
/// appended so far; when one completes, a byte arrives on `fileno()` and `take()` returns the
/// durable index (or raises the store's error).
#[pyclass(frozen, module = "dengine._core")]
pub struct BackgroundSync {
    shared: Arc<Shared>,
    reader: UnixStream,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn run(store: Arc<dyn LogStore>, shared: Arc<Shared>, writer: UnixStream) {
    loop {
        let mut state = shared.lock();
        while !state.requested && !state.closed {
            state = shared.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return;
        }
        state.requested = false;
        drop(state);
        let outcome = store.sync();
        let mut state = shared.lock();
        if !matches!(state.outcome, Some(Err(_))) {
            state.outcome = Some(outcome);
        }
        drop(state);
        // A full socket buffer means a wake-up byte is already waiting: nothing is lost.
        match (&writer).write(&[1]) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return, // the loop's end is gone: the store is being closed
        }
    }
}

#[pymethods]
impl BackgroundSync {
    #[new]
    fn new(store: &Bound<'_, LogStoreBase>) -> PyResult<Self> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new() });
        let inner = store.get().store();
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("dengine-sync".into())
            .spawn(move || run(inner, for_thread, writer))?;
        Ok(BackgroundSync { shared, reader, thread: Mutex::new(Some(thread)) })
    }

    /// The file descriptor to watch for readability (`loop.add_reader`).
    fn fileno(&self) -> i32 {
        self.reader.as_raw_fd()
    }

    /// Asks for a sync of everything appended before this call; cheap, never blocks on the disk.
    fn request(&self) -> PyResult<()> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(PyRuntimeError::new_err("the background sync is closed"));
        }
        state.requested = true;
        drop(state);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The durable index from the last completed sync, or None if none completed since the last
    /// call; raises the store's error if a sync failed, and StorageError once the thread is gone
    /// (the socket then stays readable: the caller must stop watching it). Also drains the
    /// wake-up bytes.
    fn take(&self) -> PyResult<Option<u64>> {
        let mut buf = [0u8; 64];
        let mut gone = false;
        loop {
            match (&self.reader).read(&mut buf) {
                Ok(0) => {
                    gone = true;
                    break;
                }
                Ok(_) => {}
                Err(_) => break, // WouldBlock: drained
            }
        }
        match self.shared.lock().outcome.take() {
            Some(Ok(durable)) => Ok(Some(durable)),
            Some(Err(e)) => Err(crate::errors::to_py(e)),
            None if gone => Err(StorageError::new_err("the log's sync thread stopped")),
            None => Ok(None),
        }
    }

    /// Stops the thread after the sync it may be running; later requests raise.
    fn close(&self, py: Python<'_>) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        let handle = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            // Joining waits for an fsync at worst: the GIL is released meanwhile.
            py.detach(move || {
                let _ = handle.join();
            });
        }
    }
}

impl Drop for BackgroundSync {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BackgroundSync>()
}
