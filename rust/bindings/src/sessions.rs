//! The session table for Python (`SessionTable`), with the apply loop that runs committed
//! entries through it (`SessionTable.apply_batch`).
//!
//! The rules live in `dengine_core::sessions`; `dengine.raft.sessions` wraps this class with its
//! public API. The loop is here, beside the conversions, because it is where Python objects meet
//! the table: for each entry it reads the envelope, asks the table, calls the state machine (a
//! Python callable, or the built-in `KvStore` directly, with no Python call at all), records the
//! outcome and answers the proposals someone waits for.

use dengine_core::sessions::{Seen, SessionHeader, SessionTable, Stored, SESSION_KIND};
use pyo3::exceptions::{PyException, PyKeyError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::entry_batch::EntryBatch;
use crate::kv::PyKvStore;
use crate::log::Entry;

/// Adds the session table to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySessionTable>()?;
    Ok(())
}

/// Outcome codes of `apply_batch`'s answers, mirrored by `dengine.raft.sessions.Outcome`.
const APPLIED: u8 = 0;
const DUPLICATE: u8 = 1;
const STALE: u8 = 2;

const NOOP_KIND: u8 = 0;
const COMMAND_KIND: u8 = 1;

// Results arrive as bytes objects: read as slices, since extracting a `Vec<u8>` would walk
// them as a sequence, one object per byte.
type Row<'py> = (u64, u64, u64, Vec<(u64, Option<Bound<'py, PyBytes>>, Option<String>)>);

/// Runs one command; a Python exception (not a BaseException such as KeyboardInterrupt) becomes
/// the command's recorded error, as `TypeName: message`, the same on every replica.
fn run_command(py: Python<'_>, run: &Run<'_, '_>, index: u64, command: &[u8]) -> PyResult<Stored> {
    let outcome = match run {
        Run::Native(store) => match store.borrow_mut().apply_bytes(index, command) {
            Ok(result) => return Ok(Stored { result: Some(result), error: None }),
            Err(message) => {
                return Ok(Stored { result: None, error: Some(format!("ValueError: {message}")) })
            }
        },
        Run::Python(callable) => callable.call1((index, PyBytes::new(py, command))),
    };
    let failed = match outcome {
        Ok(value) if value.is_none() => return Ok(Stored::default()),
        Ok(value) => match value.cast::<PyBytes>() {
            Ok(bytes) => return Ok(Stored { result: Some(bytes.as_bytes().to_vec()), error: None }),
            // The same words as dengine.raft.sessions._checked, which the Python path uses.
            Err(_) => format!("TypeError: apply must return bytes or None, not {}", value.get_type().name()?),
        },
        Err(err) if err.is_instance_of::<PyException>(py) => {
            format!("{}: {}", err.get_type(py).name()?, err.value(py).str()?)
        }
        Err(err) => return Err(err),
    };
    Ok(Stored { result: None, error: Some(failed) })
}

enum Run<'a, 'py> {
    Native(&'a Bound<'py, PyKvStore>),
    Python(&'a Bound<'py, PyAny>),
}

/// `(key, outcome, result, error, index)`: the key is the `(client, sequence)` tuple already
/// built to look the entry up in `wanted`, so the caller can use it again as it is.
fn answer<'py>(
    py: Python<'py>,
    key: &Bound<'py, PyTuple>,
    outcome: u8,
    stored: &Stored,
    index: u64,
) -> PyResult<Bound<'py, PyTuple>> {
    let result = stored.result.as_ref().map(|r| PyBytes::new(py, r));
    (key, outcome, result, stored.error.as_deref(), index).into_pyobject(py)
}

/// Per-client results of recently applied sequences (see `dengine.raft.sessions.SessionTable`).
#[pyclass(name = "SessionTable", module = "dengine._core")]
pub struct PySessionTable {
    inner: SessionTable,
}

#[pymethods]
impl PySessionTable {
    #[new]
    #[pyo3(signature = (max_clients, expire_after, max_results))]
    fn new(max_clients: usize, expire_after: u64, max_results: usize) -> PyResult<Self> {
        let inner =
            SessionTable::new(max_clients, expire_after, max_results).map_err(crate::errors::to_py)?;
        Ok(Self { inner })
    }

    #[getter]
    fn max_clients(&self) -> usize {
        self.inner.max_clients()
    }

    #[getter]
    fn expire_after(&self) -> u64 {
        self.inner.expire_after()
    }

    #[getter]
    fn max_results(&self) -> usize {
        self.inner.max_results()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// 0: never applied nor refused; 1: applied before (a duplicate); 2: stale.
    fn lookup(&self, client: u64, sequence: u64) -> u8 {
        match self.inner.lookup(client, sequence) {
            Seen::New => 0,
            Seen::Duplicate(_) => DUPLICATE,
            Seen::Stale => STALE,
        }
    }

    /// `(result, error)` stored for an applied sequence; `KeyError` if there is none.
    fn stored<'py>(
        &self,
        py: Python<'py>,
        client: u64,
        sequence: u64,
    ) -> PyResult<(Option<Bound<'py, PyBytes>>, Option<String>)> {
        match self.inner.lookup(client, sequence) {
            Seen::Duplicate(stored) => {
                Ok((stored.result.as_ref().map(|r| PyBytes::new(py, r)), stored.error.clone()))
            }
            _ => Err(PyKeyError::new_err((client, sequence))),
        }
    }

    /// Remembers the outcome of `sequence`, applied at log `index`, and applies the limits.
    #[pyo3(signature = (client, sequence, index, result, error, first_outstanding = 0))]
    fn record(
        &mut self,
        client: u64,
        sequence: u64,
        index: u64,
        result: Option<&[u8]>,
        error: Option<String>,
        first_outstanding: u64,
    ) {
        let result = result.map(<[u8]>::to_vec);
        self.inner.record(client, sequence, index, Stored { result, error }, first_outstanding);
    }

    /// `[(client, acked below, last index, [(sequence, result, error)])]`, most idle first.
    fn items<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let rows = self
            .inner
            .rows()
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
    fn restore(&mut self, rows: Vec<Row<'_>>) {
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
        self.inner.restore(rows);
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
        &mut self,
        py: Python<'_>,
        entries: &Bound<'_, PyAny>,
        start: usize,
        run: &Bound<'_, PyAny>,
        wanted: &Bound<'_, PyAny>,
        answered: &Bound<'_, PyList>,
    ) -> PyResult<usize> {
        let native = run.cast::<PyKvStore>().ok();
        let run = match &native {
            Some(store) => Run::Native(store),
            None => Run::Python(run),
        };
        let mut batch = Batch { table: self, run, wanted, any_wanted: wanted.len()? > 0, answered };
        if let Ok(framed) = entries.cast::<EntryBatch>() {
            // Framed as read from the log: each payload is used where it lies, no object built.
            let records = &framed.get().batch;
            for i in start..records.len() {
                let (index, _, data) = records.get(i).expect("position below the length");
                if !batch.apply(py, index, data)? {
                    return Ok(i);
                }
            }
            return Ok(records.len());
        }
        let entries = entries.cast::<PyList>()?;
        let count = entries.len();
        for i in start..count {
            let item = entries.get_item(i)?;
            let entry = item.cast::<Entry>()?.get();
            if !batch.apply(py, entry.index, entry.data.bind(py).as_bytes())? {
                return Ok(i);
            }
        }
        Ok(count)
    }
}

/// One `apply_batch` call: the table, where commands go, and who waits for which answer.
struct Batch<'a, 'py> {
    table: &'a mut PySessionTable,
    run: Run<'a, 'py>,
    wanted: &'a Bound<'py, PyAny>,
    any_wanted: bool,
    answered: &'a Bound<'py, PyList>,
}

impl Batch<'_, '_> {
    /// Applies the entry `index` with payload `data`; false for one left to Python (a
    /// membership change, or an envelope this loop does not know).
    fn apply(&mut self, py: Python<'_>, index: u64, data: &[u8]) -> PyResult<bool> {
        match data.first() {
            Some(&SESSION_KIND) => {
                let Some(h) = SessionHeader::parse(data) else { return Ok(false) };
                let key = (h.client, h.sequence).into_pyobject(py)?;
                let waited = self.any_wanted && self.wanted.contains(&key)?;
                let inner = &mut self.table.inner;
                match inner.lookup(h.client, h.sequence) {
                    Seen::New => {
                        let command = &data[dengine_core::sessions::SESSION_HEADER_LEN..];
                        let stored = run_command(py, &self.run, index, command)?;
                        if waited {
                            self.answered.append(answer(py, &key, APPLIED, &stored, index)?)?;
                        }
                        inner.record(h.client, h.sequence, index, stored, h.first_outstanding);
                    }
                    Seen::Duplicate(stored) => {
                        if waited {
                            self.answered.append(answer(py, &key, DUPLICATE, stored, index)?)?;
                        }
                    }
                    Seen::Stale => {
                        if waited {
                            let error =
                                format!("sequence {} was already acknowledged by its client", h.sequence);
                            let stale = Stored { result: None, error: Some(error) };
                            self.answered.append(answer(py, &key, STALE, &stale, index)?)?;
                        }
                    }
                }
            }
            Some(&COMMAND_KIND) => {
                run_command(py, &self.run, index, &data[1..])?;
            }
            Some(&NOOP_KIND) => {}
            _ => return Ok(false),
        }
        Ok(true)
    }
}
