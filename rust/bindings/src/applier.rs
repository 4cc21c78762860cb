//! `NativeApplier`: committed batches applied to the built-in KV store through the session table
//! on a thread of their own, without the GIL, each completion signalled to the event loop through
//! a socket it watches (see `loop_thread`).
//!
//! Applying is the largest single cost of a write on a busy node (walking a large ordered map
//! misses the caches at every level); done on the event loop's thread it delays everything else
//! the loop does. Here the loop hands over a batch and goes on with proposals, replication and
//! answers. The answers of the batch's leading run of plain puts are handed back (a first
//! wake-up) before the map is walked with them, the rest when the thread is done; the loop turns
//! them into Python objects as it takes them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use dengine_core::apply::{answer_blind_run, apply_entries, run_blind, Answer};
use dengine_core::kv::KvStore;
use dengine_core::sessions::SessionTable;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::entry_batch::EntryBatch;
use crate::kv::{lock, PyKvStore};
use crate::loop_thread::{LoopThread, Shared, Waker};
use crate::sessions::{hand_over, PySessionTable};

struct Job {
    /// The caller's batch itself, read in place: a frozen class, readable without the GIL.
    batch: Py<EntryBatch>,
    /// The position to start at.
    start: usize,
    collect: bool,
}

struct Done {
    answers: Vec<Answer>,
    /// The position of the first entry not applied: the end, or an entry left to Python.
    position: usize,
}

#[derive(Default)]
struct State {
    job: Option<Job>,
    busy: bool,
    /// Answers of the batch's blind run, given out before the store has its changes (see
    /// `apply_job`).
    early: Vec<Answer>,
    done: Option<Done>,
    failed: Option<String>,
    /// The batch of the last job, handed back to be released where the GIL is held.
    finished: Option<Py<EntryBatch>>,
}

/// Applies committed `EntryBatch`es to a `KvStore` through a `SessionTable`, one batch at a time,
/// on a thread of its own. `submit()` hands a batch over; when it is applied a byte arrives on
/// `fileno()` and `take()` gives the answers and where the thread stopped.
#[pyclass(frozen, module = "dengine._core")]
pub struct NativeApplier {
    thread: LoopThread<State>,
}

fn apply_job(
    job: &Job,
    table: &Mutex<SessionTable>,
    store: &Mutex<KvStore>,
    answer_early: impl FnOnce(Vec<Answer>),
) -> Done {
    let records = &job.batch.get().batch;
    let (start, count) = (job.start.min(records.len()), records.len());
    let entries = (start..count).map(|i| {
        let (index, _, data) = records.get(i).expect("position below the length");
        (index, data)
    });
    let mut answers = Vec::with_capacity(if job.collect { count - start } else { 0 });
    // The usual write's answer is known from the store's revision alone: it goes out before
    // the map is walked, and the loop answers its callers while this thread updates the map.
    // The store stays locked from before the answers are made until the map has the changes,
    // so nothing reads the store in between; the session table is let go once they are made.
    let mut run = Vec::new();
    let mut held_table = lock(table);
    let mut held_store = lock(store);
    let taken = answer_blind_run(
        &mut held_table,
        &held_store,
        entries.clone(),
        |_, _| job.collect,
        &mut answers,
        &mut run,
    );
    drop(held_table);
    if !answers.is_empty() {
        answer_early(std::mem::take(&mut answers));
    }
    run_blind(&mut held_store, &run);
    drop(held_store);
    if start + taken == count {
        return Done { answers, position: count };
    }
    // Both locks for the rest of the batch: Python calls made meanwhile wait for it, and see
    // the state between two runs, never inside one.
    let stopped = apply_entries(
        &mut lock(table),
        &mut lock(store),
        entries.skip(taken),
        |_, _| job.collect,
        &mut answers,
    );
    Done { answers, position: stopped.map_or(count, |at| start + taken + at) }
}

fn run(
    shared: Arc<Shared<State>>,
    table: Arc<Mutex<SessionTable>>,
    store: Arc<Mutex<KvStore>>,
    waker: Waker,
) {
    while let Some(job) = shared.wait_for(|s| s.job.take()) {
        let answer_early = |early: Vec<Answer>| {
            shared.lock().state.early.extend(early);
            waker.wake();
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| apply_job(&job, &table, &store, answer_early)));
        let failed = {
            let mut slot = shared.lock();
            let state = &mut slot.state;
            state.busy = false;
            state.finished = Some(job.batch);
            match outcome {
                Ok(done) => state.done = Some(done),
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    state.failed = Some(why);
                }
            }
            state.failed.is_some()
        };
        if !waker.wake() || failed {
            return; // the applier is being dropped, or the batch broke the state: no more
        }
    }
}

#[pymethods]
impl NativeApplier {
    #[new]
    fn new(store: &Bound<'_, PyKvStore>, table: &Bound<'_, PySessionTable>) -> PyResult<Self> {
        let (table, store) = (table.get().shared(), store.get().shared());
        let thread =
            LoopThread::spawn("dengine-apply", move |shared, waker| run(shared, table, store, waker))?;
        Ok(NativeApplier { thread })
    }

    /// The file descriptor to watch for readability (`loop.add_reader`).
    fn fileno(&self) -> i32 {
        self.thread.fileno()
    }

    /// Hands `entries[start:]` to the thread. `collect`: keep the answers of session commands
    /// (for `take` to pick the awaited ones from). Raises RuntimeError while a batch is under way
    /// or not yet taken, and once closed or failed.
    fn submit(&self, entries: &Bound<'_, EntryBatch>, start: usize, collect: bool) -> PyResult<()> {
        let mut slot = self.thread.lock();
        if slot.closed || slot.state.failed.is_some() {
            return Err(PyRuntimeError::new_err("the native applier is closed"));
        }
        let state = &mut slot.state;
        if state.busy || state.done.is_some() {
            return Err(PyRuntimeError::new_err("a batch is already being applied"));
        }
        state.job = Some(Job { batch: entries.clone().unbind(), start, collect });
        state.busy = true;
        drop(slot);
        self.thread.notify();
        Ok(())
    }

    /// The position after the last applied entry of the submitted batch (in the submitted
    /// sequence), or None while it is still being applied. Appends the answers of session
    /// commands whose `(client, sequence)` is in `wanted` to `answered`, as
    /// `SessionTable.apply_batch` does: while the batch is under way, those of its leading
    /// writes whose answers were known before the store had their changes (any later read of
    /// the store waits for them). Raises RuntimeError if the thread failed. Also drains the
    /// wake-up bytes.
    fn take(
        &self,
        py: Python<'_>,
        wanted: &Bound<'_, PyAny>,
        answered: &Bound<'_, PyList>,
    ) -> PyResult<Option<usize>> {
        self.thread.drain();
        let (early, done, failed, finished) = {
            let state = &mut self.thread.lock().state;
            (std::mem::take(&mut state.early), state.done.take(), state.failed.clone(), state.finished.take())
        };
        drop(finished); // here, with the GIL
        if let Some(why) = failed {
            return Err(PyRuntimeError::new_err(format!("the apply thread failed: {why}")));
        }
        let collect = |answers: &[Answer]| -> PyResult<()> {
            if !answers.is_empty() && wanted.len()? > 0 {
                hand_over(py, answers, wanted, answered)?;
            }
            Ok(())
        };
        collect(&early)?;
        let Some(done) = done else { return Ok(None) };
        collect(&done.answers)?;
        Ok(Some(done.position))
    }

    /// Stops the thread after the batch it may be applying (waited for with the GIL released).
    fn close(&self, py: Python<'_>) {
        self.thread.close(py);
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeApplier>()
}
