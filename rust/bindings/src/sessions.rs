//! The session table for Python (`SessionTable`), with the apply loop that runs committed
//! entries through it (`SessionTable.apply_batch`).
//!
//! The rules live in `dengine_core::sessions`; `dengine.raft.sessions` wraps this class with its
//! public API. Entries for the built-in `KvStore` go through `dengine_core::apply`, with no Python
//! call at all (the same loop the node's apply thread runs, `NativeApplier`); for a Python state
//! machine the loop is here, beside the conversions: for each entry it reads the envelope, asks
//! the table, calls the state machine, records the outcome and answers the proposals someone
//! waits for.

use std::sync::{Arc, Mutex, MutexGuard};

use dengine_core::apply::{self, Answer, Outcome, COMMAND_KIND, NOOP_KIND};
use dengine_core::sessions::{Seen, SessionHeader, SessionTable, Stored, SESSION_KIND};
use pyo3::exceptions::{PyKeyError, PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::entry_batch::EntryBatch;
use crate::kv::{lock, PyKvStore};
use crate::log::Entry;

/// Adds the session table to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySessionTable>()?;
    Ok(())
}

// Results arrive as bytes objects: read as slices, since extracting a `Vec<u8>` would walk
// them as a sequence, one object per byte.
type Row<'py> = (u64, u64, u64, Vec<(u64, Option<Bound<'py, PyBytes>>, Option<String>)>);

/// Runs one command through a Python `apply(index, command)`; an exception (any but a
/// KeyboardInterrupt or a SystemExit, which may come from outside at any moment: recorded on one
/// replica only, they would fork the replicas) becomes the command's recorded error, as
/// `TypeName: message`, the same on every replica and in the same words as
/// `dengine.raft.sessions._describe`.
fn run_python(py: Python<'_>, run: &Bound<'_, PyAny>, index: u64, command: &[u8]) -> PyResult<Stored> {
    let failed = match run.call1((index, PyBytes::new(py, command))) {
        Ok(value) if value.is_none() => return Ok(Stored::default()),
        Ok(value) => match value.cast::<PyBytes>() {
            Ok(bytes) => return Ok(Stored { result: Some(bytes.as_bytes().to_vec()), error: None }),
            // The same words as dengine.raft.sessions._checked, which the Python path uses.
            Err(_) => format!("TypeError: apply must return bytes or None, not {}", value.get_type().name()?),
        },
        Err(err)
            if err.is_instance_of::<PyKeyboardInterrupt>(py) || err.is_instance_of::<PySystemExit>(py) =>
        {
            return Err(err)
        }
        Err(err) => {
            let text = match err.value(py).str() {
                Ok(text) => text.to_string(),
                Err(_) => "<str() failed>".to_owned(),
            };
            format!("{}: {}", err.get_type(py).name()?, text)
        }
    };
    Ok(Stored { result: None, error: Some(failed) })
}

/// `(key, outcome, result, error, index)`, what `apply_batch` hands Python; `key` is the
/// `(client, sequence)` tuple, built once to look the answer up in `wanted` and used again here.
fn answer_tuple<'py>(py: Python<'py>, key: Bound<'py, PyTuple>, a: &Answer) -> PyResult<Bound<'py, PyTuple>> {
    let result = a.stored.result.as_ref().map(|r| PyBytes::new(py, r));
    (key, a.outcome as u8, result, a.stored.error.as_deref(), a.index).into_pyobject(py)
}

/// Appends to the Python list `answered` the answers whose `(client, sequence)` is in the
/// Python collection `wanted` (those someone waits for), in order.
pub fn hand_over(
    py: Python<'_>,
    answers: &[Answer],
    wanted: &Bound<'_, PyAny>,
    answered: &Bound<'_, PyList>,
) -> PyResult<()> {
    for a in answers {
        let key = (a.client, a.sequence).into_pyobject(py)?;
        if wanted.contains(&key)? {
            answered.append(answer_tuple(py, key, a)?)?;
        }
    }
    Ok(())
}

/// The exactly-once session table. It sits behind a lock shared with the node's apply thread
/// (`NativeApplier`); see `KvStore`.
#[pyclass(frozen, name = "SessionTable", module = "dengine._core")]
pub struct PySessionTable {
    inner: Arc<Mutex<SessionTable>>,
}

impl PySessionTable {
    fn lock(&self) -> MutexGuard<'_, SessionTable> {
        lock(&self.inner)
    }

    /// The table, for a thread that applies through it.
    pub fn shared(&self) -> Arc<Mutex<SessionTable>> {
        Arc::clone(&self.inner)
    }
}

#[pymethods]
impl PySessionTable {
    #[new]
    #[pyo3(signature = (max_clients, expire_after, max_results))]
    fn new(max_clients: usize, expire_after: u64, max_results: usize) -> PyResult<Self> {
        let inner =
            SessionTable::new(max_clients, expire_after, max_results).map_err(crate::errors::to_py)?;
        Ok(Self { inner: Arc::new(Mutex::new(inner)) })
    }

    #[getter]
    fn max_clients(&self) -> usize {
        self.lock().max_clients()
    }

    #[getter]
    fn expire_after(&self) -> u64 {
        self.lock().expire_after()
    }

    #[getter]
    fn max_results(&self) -> usize {
        self.lock().max_results()
    }

    fn __len__(&self) -> usize {
        self.lock().len()
    }

    /// 0: never applied nor refused; 1: applied before (a duplicate); 2: stale.
    fn lookup(&self, client: u64, sequence: u64) -> u8 {
        match self.lock().lookup(client, sequence) {
            Seen::New => 0,
            Seen::Duplicate(_) => Outcome::Duplicate as u8,
            Seen::Stale => Outcome::Stale as u8,
        }
    }

    /// `(result, error)` stored for an applied sequence; `KeyError` if there is none.
    fn stored<'py>(
        &self,
        py: Python<'py>,
        client: u64,
        sequence: u64,
    ) -> PyResult<(Option<Bound<'py, PyBytes>>, Option<String>)> {
        match self.lock().lookup(client, sequence) {
            Seen::Duplicate(stored) => {
                Ok((stored.result.as_ref().map(|r| PyBytes::new(py, r)), stored.error.clone()))
            }
            _ => Err(PyKeyError::new_err((client, sequence))),
        }
    }

    /// Remembers the outcome of `sequence`, applied at log `index`, and applies the limits.
    #[pyo3(signature = (client, sequence, index, result, error, first_outstanding = 0))]
    fn record(
        &self,
        client: u64,
        sequence: u64,
        index: u64,
        result: Option<&[u8]>,
        error: Option<String>,
        first_outstanding: u64,
    ) {
        let result = result.map(<[u8]>::to_vec);
        self.lock().record(client, sequence, index, Stored { result, error }, first_outstanding);
    }

    /// `[(client, acked below, last index, [(sequence, result, error)])]`, most idle first.
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let rows = self.lock().rows();
        let rows = rows
            .into_iter()
            .map(|(client, acked_below, last_index, results)| {
                let results = results
                    .iter()
                    .map(|(q, o)| (*q, o.result.as_ref().map(|r| PyBytes::new(py, r)), o.error.as_deref()))
                    .collect::<Vec<_>>();
                (client, acked_below, last_index, PyList::new(py, results)?).into_pyobject(py)
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, rows)
    }

    /// Replaces the whole table with rows as `items` gives them.
    fn restore(&self, rows: Vec<Row<'_>>) {
        let rows = rows
            .into_iter()
            .map(|(client, acked_below, last_index, results)| {
                let results = results
                    .into_iter()
                    .map(|(q, result, error)| {
                        (q, Stored { result: result.map(|r| r.as_bytes().to_vec()), error })
                    })
                    .collect();
                (client, acked_below, last_index, results)
            })
            .collect();
        self.lock().restore(rows);
    }

    /// Applies `entries[start:]` (a list of `Entry`, or an `EntryBatch`) in order, up to the
    /// first one this loop leaves to Python (a membership change, or an envelope it does not
    /// know); returns that position, or `len(entries)`.
    ///
    /// `run` is the state machine's `apply(index, command)`, or a `KvStore` to apply to directly.
    /// For each session command whose `(client, sequence)` is in `wanted`, appends
    /// `((client, sequence), outcome, result, error, index)` to `answered` (outcome 0 applied,
    /// 1 duplicate, 2 stale).
    fn apply_batch(
        &self,
        py: Python<'_>,
        entries: &Bound<'_, PyAny>,
        start: usize,
        run: &Bound<'_, PyAny>,
        wanted: &Bound<'_, PyAny>,
        answered: &Bound<'_, PyList>,
    ) -> PyResult<usize> {
        let payloads = Payloads::of(py, entries)?;
        let count = payloads.len();
        let any_wanted = wanted.len()? > 0;
        if let Ok(store) = run.cast::<PyKvStore>() {
            // Every answer is kept while anyone waits, and the awaited ones picked afterwards:
            // no Python call inside the loop, which holds both locks.
            let mut answers = Vec::new();
            let stopped = {
                // Writes the apply thread was handed are waited for before the table is taken:
                // the thread needs the table to finish them.
                let store = store.get();
                store.wait_settled(py);
                let (mut table, mut store) = (self.lock(), store.lock(py));
                let entries = payloads.from(start);
                apply::apply_entries(&mut table, &mut store, entries, |_, _| any_wanted, &mut answers)
            };
            hand_over(py, &answers, wanted, answered)?;
            return Ok(stopped.map_or(count, |at| start + at));
        }
        for i in start..count {
            let (index, data) = payloads.get(i);
            // The table is locked per step, never across the Python call: a state machine that
            // reads the table would otherwise wait for itself.
            match data.first() {
                Some(&SESSION_KIND) => {
                    let Some(h) = SessionHeader::parse(data) else { return Ok(i) };
                    let key = (h.client, h.sequence).into_pyobject(py)?;
                    let waits = any_wanted && wanted.contains(&key)?;
                    let seen = match self.lock().lookup(h.client, h.sequence) {
                        Seen::New => None,
                        Seen::Duplicate(stored) => Some((Outcome::Duplicate, stored.clone())),
                        Seen::Stale => Some((
                            Outcome::Stale,
                            Stored { result: None, error: Some(apply::stale_error(h.sequence)) },
                        )),
                    };
                    let (outcome, stored) = match seen {
                        Some(seen) => seen,
                        None => {
                            let command = &data[dengine_core::sessions::SESSION_HEADER_LEN..];
                            (Outcome::Applied, run_python(py, run, index, command)?)
                        }
                    };
                    if waits {
                        let a = Answer { client: h.client, sequence: h.sequence, outcome, stored, index };
                        answered.append(answer_tuple(py, key, &a)?)?;
                        if outcome == Outcome::Applied {
                            self.lock().record(h.client, h.sequence, index, a.stored, h.first_outstanding);
                        }
                    } else if outcome == Outcome::Applied {
                        self.lock().record(h.client, h.sequence, index, stored, h.first_outstanding);
                    }
                }
                Some(&COMMAND_KIND) => {
                    run_python(py, run, index, &data[1..])?;
                }
                Some(&NOOP_KIND) => {}
                _ => return Ok(i),
            }
        }
        Ok(count)
    }
}

/// The payloads of a batch, read where they lie: in an `EntryBatch`'s framed records, or in a
/// list of `Entry` objects.
pub enum Payloads<'a, 'py> {
    /// An `EntryBatch`, framed as read from the log.
    Framed(&'a EntryBatch),
    /// A list of `Entry`, with each entry's payload borrowed once read.
    Listed(Vec<(u64, Bound<'py, PyBytes>)>),
}

impl<'a, 'py> Payloads<'a, 'py> {
    fn of(py: Python<'py>, entries: &'a Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(framed) = entries.cast::<EntryBatch>() {
            return Ok(Payloads::Framed(framed.get()));
        }
        let list = entries.cast::<PyList>()?;
        let mut listed = Vec::with_capacity(list.len());
        for item in list.iter() {
            let entry = item.cast::<Entry>()?.get();
            listed.push((entry.index, entry.data.bind(py).clone()));
        }
        Ok(Payloads::Listed(listed))
    }

    fn len(&self) -> usize {
        match self {
            Payloads::Framed(batch) => batch.batch.len(),
            Payloads::Listed(listed) => listed.len(),
        }
    }

    fn get(&self, position: usize) -> (u64, &[u8]) {
        match self {
            Payloads::Framed(batch) => {
                let (index, _, data) = batch.batch.get(position).expect("position below the length");
                (index, data)
            }
            Payloads::Listed(listed) => (listed[position].0, listed[position].1.as_bytes()),
        }
    }

    fn from(&self, start: usize) -> impl Iterator<Item = (u64, &[u8])> + use<'_, 'a, 'py> {
        (start..self.len()).map(move |i| self.get(i))
    }
}
