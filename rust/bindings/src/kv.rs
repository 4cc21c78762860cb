//! The built-in KV store for Python: `KvStore`, `KvSnapshotPieces`, `KvSnapshotReader` and
//! `parse_kv_command`. `dengine.kv.KVStateMachine` wraps them with the public API.
//!
//! Conversion only; every rule lives in `dengine_core::kv`. Records cross as tuples
//! `(value, create_revision, mod_revision, version)` and events as
//! `(key, record after a put or None, record before or None, revision)`, which Python turns
//! into its frozen dataclasses. Building snapshot pieces and validating snapshot bytes run with
//! the GIL released.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};

use dengine_core::kv::{Command, Event, KvStore, Record, SnapshotPieces, SnapshotReader};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::errors::KVCommandError;
use crate::gil;
#[cfg(unix)]
use crate::sha256::PySha256;

/// Adds the KV classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyKvStore>()?;
    m.add_class::<PyKvSnapshotPieces>()?;
    m.add_class::<PyKvSnapshotReader>()?;
    m.add_function(wrap_pyfunction!(parse_kv_command, m)?)?;
    m.add_function(wrap_pyfunction!(encode_kv_command, m)?)?;
    m.add_function(wrap_pyfunction!(parse_kv_session_writes, m)?)?;
    m.add_function(wrap_pyfunction!(count_protobuf_field, m)?)?;
    m.add_function(wrap_pyfunction!(encode_kv_write_answers, m)?)?;
    m.add_function(wrap_pyfunction!(encode_kv_write_operation, m)?)?;
    m.add_function(wrap_pyfunction!(encode_kv_get_operation, m)?)?;
    m.add_function(wrap_pyfunction!(join_kv_operations, m)?)?;
    m.add_function(wrap_pyfunction!(decode_kv_batch_response, m)?)?;
    Ok(())
}

fn record<'py>(py: Python<'py>, r: &Record) -> PyResult<Bound<'py, PyTuple>> {
    (PyBytes::new(py, &r.value), r.create_revision, r.mod_revision, r.version).into_pyobject(py)
}

fn event<'py>(py: Python<'py>, e: &Event) -> PyResult<Bound<'py, PyTuple>> {
    let kv = e.kv.as_ref().map(|r| record(py, r)).transpose()?;
    let prev = e.prev.as_ref().map(|r| record(py, r)).transpose()?;
    (PyBytes::new(py, &e.key), kv, prev, e.revision).into_pyobject(py)
}

fn events<'a, 'py>(
    py: Python<'py>,
    list: impl IntoIterator<Item = &'a Event>,
) -> PyResult<Bound<'py, PyList>> {
    let items = list.into_iter().map(|e| event(py, e)).collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

/// Encodes a KV command (`op` 1 put, 2 delete, 3 cas, 4 delete-range, 5 put reporting the
/// key-value it replaced; `key` is the prefix for a delete-range); raises `KVCommandError` when
/// a field breaks a limit.
#[pyfunction]
#[pyo3(signature = (op, key, expected, value))]
fn encode_kv_command<'py>(
    py: Python<'py>,
    op: u8,
    key: &[u8],
    expected: Option<&[u8]>,
    value: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    use dengine_core::kv::command::{encode, OP_CAS, OP_DELETE, OP_DELETE_RANGE, OP_PUT, OP_PUT_PREV};
    let command = match op {
        OP_PUT | OP_PUT_PREV => Command::Put { key, value, prev: op == OP_PUT_PREV },
        OP_DELETE => Command::Delete { key },
        OP_CAS => Command::Cas { key, expected, value },
        OP_DELETE_RANGE => Command::DeleteRange { prefix: key },
        _ => return Err(PyValueError::new_err(format!("unknown KV op {op}"))),
    };
    let data = encode(&command).map_err(KVCommandError::new_err)?;
    Ok(PyBytes::new(py, &data))
}

/// Validates KV command bytes into `(op, key or prefix, expected or None, value)`; raises
/// `KVCommandError` saying what is wrong.
#[pyfunction]
fn parse_kv_command<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyTuple>> {
    let command = dengine_core::kv::command::parse(data).map_err(KVCommandError::new_err)?;
    let op = command.op();
    let (key, expected, value): (&[u8], Option<&[u8]>, &[u8]) = match command {
        Command::Put { key, value, .. } => (key, None, value),
        Command::Delete { key } => (key, None, b""),
        Command::Cas { key, expected, value } => (key, expected, value),
        Command::DeleteRange { prefix } => (prefix, None, b""),
    };
    (op, PyBytes::new(py, key), expected.map(|e| PyBytes::new(py, e)), PyBytes::new(py, value))
        .into_pyobject(py)
}

/// The replicated KV store: keys in byte order, etcd-style revisions, a bounded watch history.
/// One thread applies at a time; frozen snapshot views may be written on others.
///
/// The store sits behind a lock shared with the node's apply thread (`NativeApplier`), which
/// applies batches to it without the GIL. The lock is never held while building Python objects
/// (which can run a garbage collection, and Python code, and hand the GIL to another thread),
/// and a call from Python that must wait for it, or for a batch, waits with the GIL released:
/// so a call made during a batch waits for the batch, and nothing can deadlock.
///
/// The apply thread's `submit` may answer writes before the thread has run them on the store;
/// until it has, every call from Python waits (see [`Settling`]).
#[pyclass(frozen, name = "KvStore", module = "dengine._core")]
pub struct PyKvStore {
    inner: Arc<Mutex<KvStore>>,
    settling: Arc<Settling>,
}

impl PyKvStore {
    /// The store, locked, once it holds every write already answered. Any wait is made with
    /// the GIL released (see the type's docs). Nothing can begin settling between the check
    /// and the lock: only the loop's `submit` does, and it needs the GIL this thread holds.
    pub fn lock(&self, py: Python<'_>) -> MutexGuard<'_, KvStore> {
        loop {
            if !self.settling.pending() {
                match self.inner.try_lock() {
                    Ok(guard) => return guard,
                    Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
                    Err(TryLockError::WouldBlock) => {}
                }
            }
            py.detach(|| {
                self.settling.wait();
                drop(lock(&self.inner));
            });
        }
    }

    /// Returns once the store holds every write already answered (see [`Settling`]), waiting
    /// with the GIL released.
    pub fn wait_settled(&self, py: Python<'_>) {
        if self.settling.pending() {
            py.detach(|| self.settling.wait());
        }
    }

    /// The store, for a thread that applies to it.
    pub fn shared(&self) -> Arc<Mutex<KvStore>> {
        Arc::clone(&self.inner)
    }

    /// The flag that holds back this store's readers, for a thread that answers writes before
    /// it runs them on the store.
    pub fn settling(&self) -> Arc<Settling> {
        Arc::clone(&self.settling)
    }
}

/// Whether writes were answered that the store does not hold yet (the apply thread answers a
/// run of plain puts before it walks the map with them). Readers wait while it is set, so that
/// a write's answer is never seen before the write itself. The apply thread clears it once the
/// store has them, and never waits for the GIL meanwhile: a reader may wait here holding the
/// GIL. The thread takes the session table's lock to get there, so nobody holding that lock may
/// wait here.
#[derive(Default)]
pub struct Settling {
    pending: Mutex<bool>,
    settled: Condvar,
}

impl Settling {
    /// Writes were answered ahead of the store: readers wait from now on.
    pub fn begin(&self) {
        *lock(&self.pending) = true;
    }

    /// The store holds them: waiting readers go on.
    pub fn end(&self) {
        let mut pending = lock(&self.pending);
        if *pending {
            *pending = false;
            self.settled.notify_all();
        }
    }

    /// Whether readers must wait.
    pub fn pending(&self) -> bool {
        *lock(&self.pending)
    }

    /// Returns once no answered write is missing from the store.
    pub fn wait(&self) {
        let mut pending = lock(&self.pending);
        while *pending {
            pending = self.settled.wait(pending).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Locks a store or table shared with the apply thread. A panic there left it mid-batch, but
/// the thread then stops and the node with it (`NativeApplier.take` raises): what remains is
/// only read, for diagnosis.
pub fn lock<T>(shared: &Mutex<T>) -> MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

#[pymethods]
impl PyKvStore {
    #[new]
    #[pyo3(signature = (history), text_signature = "(history)")]
    fn new(history: usize) -> Self {
        Self { inner: Arc::new(Mutex::new(KvStore::new(history))), settling: Arc::default() }
    }

    /// The number of state-changing commands applied so far.
    #[getter]
    fn revision(&self, py: Python<'_>) -> u64 {
        self.lock(py).revision()
    }

    /// The log index of the last applied command (0 if none).
    #[getter]
    fn last_applied(&self, py: Python<'_>) -> u64 {
        self.lock(py).last_applied()
    }

    /// Events after this revision are retained; older ones were dropped.
    #[getter]
    fn compacted_revision(&self, py: Python<'_>) -> u64 {
        self.lock(py).compacted_revision()
    }

    /// How many times a snapshot replaced the state.
    #[getter]
    fn restores(&self, py: Python<'_>) -> u64 {
        self.lock(py).restores()
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        self.lock(py).len()
    }

    fn __contains__(&self, py: Python<'_>, key: &[u8]) -> bool {
        self.lock(py).get(key).is_some()
    }

    /// Applies the committed `command` at log `index`; returns the encoded result. Raises
    /// `ValueError`, changing nothing, if `index` is not above `last_applied`.
    fn apply<'py>(&self, py: Python<'py>, index: u64, command: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let applied = self.lock(py).apply(index, command);
        match applied {
            Ok(result) => Ok(PyBytes::new(py, &result)),
            Err(refused) => Err(PyValueError::new_err(refused.to_string())),
        }
    }

    /// `(value, create_revision, mod_revision, version)` of `key`, or None.
    fn get<'py>(&self, py: Python<'py>, key: &[u8]) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let found = self.lock(py).get(key).cloned(); // the lock goes before any Python object is made
        found.map(|r| record(py, &r)).transpose()
    }

    /// `[(key, value, create_revision, mod_revision, version)]` of the keys starting with
    /// `prefix`, in byte order, at most `limit` of them. Raises `ValueError` when their keys and
    /// values hold more than `max_bytes`.
    #[pyo3(signature = (prefix, limit = None, max_bytes = None))]
    fn range<'py>(
        &self,
        py: Python<'py>,
        prefix: &[u8],
        limit: Option<usize>,
        max_bytes: Option<usize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let found = self.lock(py).range(prefix, limit); // let go before building Python objects
        if let Some(max) = max_bytes {
            // Measured before a byte is copied out: a range too large to answer costs nothing.
            let size: usize = found.iter().map(|(k, r)| k.len() + r.value.len()).sum();
            if size > max {
                return Err(PyValueError::new_err(format!(
                    "the range holds {size} bytes of keys and values, more than the {max} one answer may carry; \
                     ask for fewer keys (a limit, a longer prefix)"
                )));
            }
        }
        let items = found
            .iter()
            .map(|(k, r)| {
                (
                    PyBytes::new(py, k),
                    PyBytes::new(py, &r.value),
                    r.create_revision,
                    r.mod_revision,
                    r.version,
                )
                    .into_pyobject(py)
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// The events of the latest `apply`, in order.
    fn latest_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let latest: Vec<Event> = self.lock(py).latest_events().cloned().collect();
        events(py, &latest)
    }

    /// The retained events with a revision above `revision`, oldest first. Raises `ValueError`
    /// if some were dropped (check `compacted_revision` first).
    fn events_since<'py>(&self, py: Python<'py>, revision: u64) -> PyResult<Bound<'py, PyList>> {
        let since = self.lock(py).events_since(revision);
        match since {
            Ok(list) => events(py, &list),
            Err(compacted) => Err(PyValueError::new_err(format!(
                "revision {revision} is compacted (history starts after {compacted})"
            ))),
        }
    }

    /// Freezes the store as it is now, for writing as a snapshot while applies go on. O(1).
    fn freeze(&self, py: Python<'_>) -> PyKvSnapshotPieces {
        PyKvSnapshotPieces { inner: SnapshotPieces::new(&self.lock(py)) }
    }

    /// Replaces the state with the snapshot `reader` validated. Raises `KVSnapshotError`,
    /// changing nothing, if the snapshot was not whole; the reader cannot be used again.
    fn install(&self, py: Python<'_>, reader: &mut PyKvSnapshotReader) -> PyResult<()> {
        let Some(inner) = reader.inner.take() else {
            return Err(PyValueError::new_err("this snapshot reader was already finished"));
        };
        let restored = inner.finish().map_err(crate::errors::to_py)?;
        let replaced = self.lock(py).install(restored);
        gil::detach(py, move || {
            drop(replaced);
            Ok(())
        })
    }
}

/// A frozen store written as snapshot bytes, a piece at a time, on any thread.
#[pyclass(name = "KvSnapshotPieces", module = "dengine._core")]
pub struct PyKvSnapshotPieces {
    inner: SnapshotPieces,
}

#[pymethods]
impl PyKvSnapshotPieces {
    /// The store revision at the freeze.
    #[getter]
    fn revision(&self) -> u64 {
        self.inner.revision()
    }

    /// The last applied log index at the freeze.
    #[getter]
    fn last_applied(&self) -> u64 {
        self.inner.last_applied()
    }

    /// The next piece of about `size` bytes, or None once the whole snapshot was returned.
    fn next_piece<'py>(&mut self, py: Python<'py>, size: usize) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let inner = &mut self.inner;
        let piece = gil::detach(py, || Ok(inner.next_piece(size)))?;
        Ok(piece.map(|p| PyBytes::new(py, &p)))
    }

    /// Lets go of the frozen view, with the GIL released: the view may hold a whole copy of the
    /// tree, which takes tens of milliseconds to free. The last piece lets go by itself; a
    /// writer that stops early calls this. Later calls do nothing.
    fn release(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        gil::detach(py, || {
            inner.release();
            Ok(())
        })
    }

    /// Writes every remaining piece (of about `size` bytes) to the open file descriptor `fd`, at
    /// its current offset, hashing each into `hasher` first; returns the bytes written. The GIL
    /// stays released for the whole write: a writer that took it back for every piece (to make
    /// it a `bytes`, hash it, write it) handed it over hundreds of times per snapshot, and each
    /// hand-over could stall the event loop for a scheduling delay on a busy machine. The bytes
    /// go to the disk as they are written (`dengine_core::write_behind`), not in one burst at the
    /// file's final sync, which would hold up the log syncs queued behind it. `fd` stays open.
    /// POSIX only.
    #[cfg(unix)]
    fn write_to(&mut self, py: Python<'_>, fd: i32, hasher: &PySha256, size: usize) -> PyResult<u64> {
        use std::io::{Seek, Write};
        use std::os::fd::FromRawFd;

        crate::write_behind::check_fd(fd)?;
        let inner = &mut self.inner;
        gil::detach(py, || {
            // SAFETY: the caller owns `fd` and keeps it open for this call; ManuallyDrop never
            // closes it.
            let mut file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
            let io_error = |e| dengine_core::Error::io(format!("fd {fd}"), e);
            let start = file.stream_position().map_err(io_error)?;
            let mut behind = dengine_core::write_behind::WriteBehind::new(start);
            let mut written = 0u64;
            while let Some(piece) = inner.next_piece(size) {
                hasher.feed(&piece);
                // A step at a time whatever the piece size, so that no more than two steps are
                // ever queued at the disk ahead of a log sync.
                for step in piece.chunks(dengine_core::write_behind::STEP as usize) {
                    file.write_all(step).map_err(io_error)?;
                    written += step.len() as u64;
                    behind.wrote(&file, start + written);
                }
            }
            Ok(written)
        })
    }
}

/// Validates snapshot bytes fed in any pieces; `KvStore.install` takes the result.
#[pyclass(name = "KvSnapshotReader", module = "dengine._core")]
pub struct PyKvSnapshotReader {
    inner: Option<SnapshotReader>,
}

#[pymethods]
impl PyKvSnapshotReader {
    #[new]
    fn new() -> Self {
        Self { inner: Some(SnapshotReader::new()) }
    }

    /// Takes the next bytes; raises `KVSnapshotError` at the first thing wrong with them.
    fn feed(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let Some(inner) = self.inner.as_mut() else {
            return Err(PyValueError::new_err("this snapshot reader was already finished"));
        };
        gil::detach(py, || inner.feed(data))
    }
}

/// The writes of a serialized `BatchRequest` as `(op codes, [(client id, sequence)], [payload])`
/// when it holds only session writes in canonical form, else None (see `dengine_core::kv::wire`).
/// How many times field `number` occurs at the top level of the serialized message `data`,
/// counted only as far as `limit + 1`; None for bytes that are not a well-formed message.
#[pyfunction]
fn count_protobuf_field(data: &[u8], number: u64, limit: usize) -> Option<usize> {
    dengine_core::kv::wire::count_field(data, number, limit)
}

#[pyfunction]
fn parse_kv_session_writes<'py>(py: Python<'py>, request: &[u8]) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let Some(writes) = dengine_core::kv::wire::parse_session_writes(request) else {
        return Ok(None);
    };
    let ops: Vec<u8> = writes.iter().map(|w| w.op).collect();
    let keys = PyList::new(py, writes.iter().map(|w| (w.client, w.sequence)))?;
    let payloads = PyList::new(py, writes.iter().map(|w| PyBytes::new(py, &w.payload)))?;
    Ok(Some((PyBytes::new(py, &ops), keys, payloads).into_pyobject(py)?))
}

/// A serialized `BatchResponse` answering write `i` (op code `ops[i]`) with `answers[i]`: result
/// bytes, or an error string `CODE: details`. None when a result is not a plain one.
#[pyfunction]
fn encode_kv_write_answers<'py>(
    py: Python<'py>,
    ops: &[u8],
    answers: Vec<Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    use dengine_core::kv::wire::{encode_write_answers, Answer};
    if ops.len() != answers.len() {
        return Err(PyValueError::new_err("one answer per write"));
    }
    let mut items = Vec::with_capacity(answers.len());
    for (op, a) in ops.iter().zip(&answers) {
        items.push(match a.cast::<PyString>() {
            Ok(text) => Answer::Error(text.to_str()?),
            Err(_) => Answer::Result(*op, a.cast::<PyBytes>()?.as_bytes()),
        });
    }
    Ok(encode_write_answers(&items).map(|out| PyBytes::new(py, &out)))
}

/// The `Operation` bytes of a write with its session `(client id, sequence, first outstanding)`;
/// `op` 5 is a put with `prev_kv` set.
#[pyfunction]
fn encode_kv_write_operation<'py>(
    py: Python<'py>,
    op: u8,
    key: &[u8],
    value: &[u8],
    expected: Option<&[u8]>,
    session: (u64, u64, u64),
) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &dengine_core::kv::wire::encode_write_operation(op, key, value, expected, session))
}

/// The `Operation` bytes of a get.
#[pyfunction]
fn encode_kv_get_operation<'py>(py: Python<'py>, key: &[u8], consistency: u64) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &dengine_core::kv::wire::encode_get_operation(key, consistency))
}

/// A `BatchRequest` carrying the given `Operation` bytes.
#[pyfunction]
fn join_kv_operations<'py>(py: Python<'py>, operations: Vec<Vec<u8>>) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &dengine_core::kv::wire::join_operations(operations.iter().map(Vec::as_slice)))
}

/// The results of a serialized `BatchResponse`: `(op code, flag, revision, key-value or None)`
/// or an error string each; None when it is not in canonical form.
#[pyfunction]
fn decode_kv_batch_response<'py>(py: Python<'py>, response: &[u8]) -> PyResult<Option<Bound<'py, PyList>>> {
    use dengine_core::kv::wire::{decode_batch_response, OperationResult};
    let Some(results) = decode_batch_response(response) else {
        return Ok(None);
    };
    let mut items = Vec::with_capacity(results.len());
    for r in results {
        items.push(match r {
            OperationResult::Error(text) => PyString::new(py, text).into_any(),
            OperationResult::Answer(op, flag, revision, kv) => {
                let kv = kv.map(|(k, v, c, m, ver)| (PyBytes::new(py, k), PyBytes::new(py, v), c, m, ver));
                (op, flag, revision, kv).into_pyobject(py)?.into_any()
            }
        });
    }
    Ok(Some(PyList::new(py, items)?))
}
