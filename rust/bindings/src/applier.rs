//! `NativeApplier`: committed batches applied to the built-in KV store through the session table
//! on a thread of their own, without the GIL, each completion signalled to the event loop through
//! a socket it watches (see `loop_thread`).
//!
//! Applying is the largest single cost of a write on a busy node (walking a large ordered map
//! misses the caches at every level); done on the event loop's thread it delays everything else
//! the loop does. Here the loop hands over a batch and goes on with proposals, replication and
//! answers. The batch's leading run of plain puts is answered by `submit` itself, on the loop's
//! thread, before the map is walked with them: their answers need only the store's revision
//! (`dengine_core::apply::answer_blind_run`). The thread then runs them on the store, and applies
//! the rest of the batch as usual; the loop takes those answers when it is done. Until the store
//! has the run, Python's reads of it wait (`kv::Settling`), so whoever heard a write answered
//! reads it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use dengine_core::apply::{answer_blind_run, apply_entries, run_blind, Answer};
use dengine_core::kv::KvStore;
use dengine_core::log::EncodedBatch;
use dengine_core::sessions::SessionTable;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::entry_batch::EntryBatch;
use crate::kv::{lock, PyKvStore, Settling};
use crate::loop_thread::{LoopThread, Priority, Shared, Waker};
use crate::sessions::{hand_over, PySessionTable};

struct Job {
    /// The caller's batch itself, read in place: a frozen class, readable without the GIL.
    batch: Py<EntryBatch>,
    /// The position of the first entry `submit` did not answer.
    start: usize,
    /// The commands `submit` answered that are still to run on the store: each one's position
    /// in the batch and the length of the envelope before the command.
    run: Vec<(usize, usize)>,
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
    done: Option<Done>,
    failed: Option<String>,
    /// The batch of the last job, handed back to be released where the GIL is held.
    finished: Option<Py<EntryBatch>>,
}

/// Applies committed `EntryBatch`es to a `KvStore` through a `SessionTable`, one batch at a time,
/// on a thread of its own. `submit()` answers what it can at once and hands the batch over; when
/// it is applied a byte arrives on `fileno()` and `take()` gives the other answers and where the
/// thread stopped.
#[pyclass(frozen, module = "dengine._core")]
pub struct NativeApplier {
    thread: LoopThread<State>,
    table: Arc<Mutex<SessionTable>>,
    store: Arc<Mutex<KvStore>>,
    settling: Arc<Settling>,
}

/// Entry `i` of a batch as the apply functions take it: its index and payload.
fn entry_at(records: &EncodedBatch, i: usize) -> (u64, &[u8]) {
    let (index, _, data) = records.get(i).expect("position below the length");
    (index, data)
}

fn apply_job(job: &Job, table: &Mutex<SessionTable>, store: &Mutex<KvStore>, settling: &Settling) -> Done {
    let records = &job.batch.get().batch;
    let (start, count) = (job.start.min(records.len()), records.len());
    let entry = |i: usize| entry_at(records, i);
    let run: Vec<(u64, &[u8])> = job
        .run
        .iter()
        .map(|&(at, envelope)| {
            let (index, data) = entry(at);
            (index, &data[envelope..])
        })
        .collect();
    // Both locks from here to the end of the batch, in the order everyone takes them: Python
    // calls made since the batch was submitted wait for it (`settling`, then the locks), and
    // see the state between two batches, never inside or before one. (A watch that subscribes
    // meanwhile reads its backlog after the whole batch: the thread publishes nothing to
    // subscribers, and the next batch is applied by Python.)
    let (mut table, mut store) = (lock(table), lock(store));
    run_blind(&mut store, &run);
    // Readers waiting for the answered writes now wait on the lock, for the rest of the batch.
    settling.end();
    let mut answers = Vec::new();
    if start == count {
        return Done { answers, position: count };
    }
    let stopped =
        apply_entries(&mut table, &mut store, (start..count).map(entry), |_, _| job.collect, &mut answers);
    Done { answers, position: stopped.map_or(count, |at| start + at) }
}

fn run(
    shared: Arc<Shared<State>>,
    table: Arc<Mutex<SessionTable>>,
    store: Arc<Mutex<KvStore>>,
    settling: Arc<Settling>,
    waker: Waker,
) {
    while let Some(job) = shared.wait_for(|s| s.job.take()) {
        let outcome = catch_unwind(AssertUnwindSafe(|| apply_job(&job, &table, &store, &settling)));
        // Readers waiting for the run must not wait forever if it broke: the node stops anyway.
        settling.end();
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
        let (table, settling, store) = (table.get().shared(), store.get().settling(), store.get().shared());
        let (t, s, w) = (Arc::clone(&table), Arc::clone(&store), Arc::clone(&settling));
        let thread = LoopThread::spawn("dengine-apply", Priority::Background, move |shared, waker| {
            run(shared, t, s, w, waker)
        })?;
        Ok(NativeApplier { thread, table, store, settling })
    }

    /// The file descriptor to watch for readability (`loop.add_reader`).
    fn fileno(&self) -> i32 {
        self.thread.fileno()
    }

    /// Hands `entries` to the thread. If `wanted` is not empty, first answers at once
    /// the leading run of commands whose answers need only the store's revision (plain puts,
    /// retries, no-ops): the answers of session commands whose `(client, sequence)` is in
    /// `wanted` are appended to `answered` before this returns, the others are `take`n once the
    /// batch is applied. Until the thread has run the answered commands on the store, every
    /// read of the store from Python waits for it. Raises RuntimeError while a batch is under
    /// way or not yet taken, and once closed or failed.
    fn submit(
        &self,
        py: Python<'_>,
        entries: &Bound<'_, EntryBatch>,
        wanted: &Bound<'_, PyAny>,
        answered: &Bound<'_, PyList>,
    ) -> PyResult<()> {
        {
            let slot = self.thread.lock();
            if slot.closed || slot.state.failed.is_some() {
                return Err(PyRuntimeError::new_err("the native applier is closed"));
            }
            if slot.state.busy || slot.state.done.is_some() {
                return Err(PyRuntimeError::new_err("a batch is already being applied"));
            }
        }
        // Only the loop submits, and the thread is idle: the store is the one every earlier
        // batch left, which the answers below are computed from.
        let collect = wanted.len()? > 0;
        let records = &entries.get().batch;
        let count = records.len();
        let (mut answers, mut run) = (Vec::new(), Vec::new());
        // Answering early is for callers waiting: with nobody waiting (a follower), the whole
        // batch goes to the thread, and the loop does no part of the apply.
        let taken = if collect {
            let (mut table, store) = (lock(&self.table), lock(&self.store));
            let entries = (0..count).map(|i| entry_at(records, i));
            answer_blind_run(&mut table, &store, entries, |_, _| collect, &mut answers, &mut run)
        } else {
            0
        };
        // Where each command to run sits in the batch: a batch's indexes are consecutive.
        let run: Vec<(usize, usize)> = run
            .iter()
            .map(|&(index, command)| {
                let at = (index - records.first_index()) as usize;
                let (_, _, data) = records.get(at).expect("a command of the run is in the batch");
                (at, data.len() - command.len())
            })
            .collect();
        // From here until the thread holds the store, nobody may read it: answers are about to
        // be given for the run, and a reader that got in ahead of the thread would see the
        // state before the batch, then after it on its next call (a watch would take its
        // backlog from the one and its floor from the other, and miss the batch's events).
        self.settling.begin();
        let job = Job { batch: entries.clone().unbind(), start: taken, run, collect };
        {
            let mut slot = self.thread.lock();
            slot.state.job = Some(job);
            slot.state.busy = true;
        }
        // Woken before the answers are handed over: building them can run a garbage collection
        // (Python code) that hands the GIL to a thread reading the store, which then waits for
        // the thread to run the writes; and woken whatever the hand-over does.
        self.thread.notify();
        if answers.is_empty() {
            Ok(())
        } else {
            hand_over(py, &answers, wanted, answered)
        }
    }

    /// The position after the last applied entry of the submitted batch (in the submitted
    /// sequence), or None while it is still being applied. Appends the answers of session
    /// commands whose `(client, sequence)` is in `wanted` to `answered` (those `submit` did not
    /// give), as `SessionTable.apply_batch` does. Raises RuntimeError if the thread failed. Also
    /// drains the wake-up bytes.
    fn take(
        &self,
        py: Python<'_>,
        wanted: &Bound<'_, PyAny>,
        answered: &Bound<'_, PyList>,
    ) -> PyResult<Option<usize>> {
        let gone = self.thread.drain();
        let (done, failed, finished) = {
            let state = &mut self.thread.lock().state;
            if gone && state.failed.is_none() {
                // It could not wake the loop any more, and stopped: the next batch would wait
                // for it for ever. This one (if done) is still given out.
                state.failed = Some("the thread stopped: it could not wake the event loop".into());
            }
            (state.done.take(), state.failed.clone(), state.finished.take())
        };
        drop(finished); // here, with the GIL
        if done.is_none() {
            if let Some(why) = failed {
                return Err(PyRuntimeError::new_err(format!("the apply thread failed: {why}")));
            }
        }
        let Some(done) = done else { return Ok(None) };
        if !done.answers.is_empty() && wanted.len()? > 0 {
            hand_over(py, &done.answers, wanted, answered)?;
        }
        Ok(Some(done.position))
    }

    /// Stops the thread after the batch it may be applying (waited for with the GIL released).
    /// A batch handed over that the thread had not taken up yet is applied here first: writes
    /// `submit` answered must reach the store.
    fn close(&self, py: Python<'_>) {
        self.thread.close(py);
        let left = self.thread.lock().state.job.take();
        if let Some(job) = left {
            py.detach(|| {
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    apply_job(&job, &self.table, &self.store, &self.settling)
                }));
            });
        }
        self.settling.end();
    }
}

impl Drop for NativeApplier {
    fn drop(&mut self) {
        // Dropped without `close` (a bug, or the interpreter exiting): readers must not wait for
        // a thread that may never run what they wait for.
        self.settling.end();
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeApplier>()
}
