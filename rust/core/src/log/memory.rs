//! [`MemLogStore`]: the in-memory engine, for tests, simulation and `storage.engine = "memory"`.
//!
//! It shares the argument checks with the WAL engine (`bounds`), so both accept and reject
//! exactly the same calls; the conformance suite holds them to identical behaviour.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use super::bounds;
use super::{EncodedBatch, Entry, HardState, LogStore};
use crate::{Error, Result};

#[derive(Default)]
struct State {
    entries: VecDeque<Entry>,
    compact_index: u64,
    compact_term: u64,
    hard_state: HardState,
    closed: bool,
}

impl State {
    fn first_index(&self) -> u64 {
        self.compact_index + 1
    }

    fn last_index(&self) -> u64 {
        self.compact_index + self.entries.len() as u64
    }

    fn term(&self, index: u64) -> Result<u64> {
        bounds::check_term(index, self.first_index(), self.last_index())?;
        Ok(if index == self.compact_index {
            self.compact_term
        } else {
            self.entries[(index - self.first_index()) as usize].term
        })
    }
}

/// A log that lives only in memory. `sync` is immediate and reports everything durable.
#[derive(Default)]
pub struct MemLogStore {
    state: Mutex<State>,
}

impl MemLogStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn live(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return Err(Error::Closed);
        }
        Ok(st)
    }
}

impl LogStore for MemLogStore {
    fn first_index(&self) -> Result<u64> {
        Ok(self.live()?.first_index())
    }

    fn last_index(&self) -> Result<u64> {
        Ok(self.live()?.last_index())
    }

    fn term(&self, index: u64) -> Result<u64> {
        self.live()?.term(index)
    }

    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>> {
        let st = self.live()?;
        bounds::check_range(lo, hi, st.first_index(), st.last_index())?;
        let base = st.first_index();
        let mut out = Vec::new();
        let mut budget = max_bytes;
        for e in st.entries.range((lo - base) as usize..(hi - base) as usize) {
            let size = e.data.len() as u64;
            if size > budget && !out.is_empty() {
                break;
            }
            budget = budget.saturating_sub(size);
            out.push(e.clone());
        }
        Ok(out)
    }

    fn append_batch(&self, batch: &EncodedBatch) -> Result<()> {
        let mut st = self.live()?;
        let last_term = st.term(st.last_index())?;
        bounds::check_append(batch, st.last_index(), last_term, st.first_index())?;
        st.entries.extend(batch.iter().map(|(index, term, data)| Entry::new(index, term, data)));
        Ok(())
    }

    fn truncate_suffix(&self, index: u64) -> Result<()> {
        let mut st = self.live()?;
        bounds::check_truncate(index, st.first_index(), st.last_index())?;
        let keep = (index - st.first_index()) as usize;
        st.entries.truncate(keep);
        Ok(())
    }

    fn compact_prefix(&self, index: u64) -> Result<()> {
        let mut st = self.live()?;
        bounds::check_compact(index, st.first_index(), st.last_index())?;
        let term = st.term(index)?;
        let drop_n = (index - st.compact_index) as usize;
        st.entries.drain(..drop_n);
        st.compact_index = index;
        st.compact_term = term;
        Ok(())
    }

    fn reset(&self, index: u64, term: u64) -> Result<()> {
        bounds::check_value("index", index)?;
        bounds::check_value("term", term)?;
        let mut st = self.live()?;
        st.entries.clear();
        st.compact_index = index;
        st.compact_term = term;
        Ok(())
    }

    fn save_hard_state(&self, hs: HardState) -> Result<()> {
        self.live()?.hard_state = hs;
        Ok(())
    }

    fn hard_state(&self) -> Result<HardState> {
        Ok(self.live()?.hard_state)
    }

    fn sync(&self) -> Result<u64> {
        Ok(self.live()?.last_index())
    }

    fn durable_index(&self) -> Result<u64> {
        Ok(self.live()?.last_index())
    }

    fn close(&self) -> Result<()> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        Ok(())
    }
}
