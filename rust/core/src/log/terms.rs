//! Run-length index of entry terms.
//!
//! Terms change only at elections, so a million entries usually span a handful of runs. Keeping
//! runs instead of one term per entry is what keeps the in-memory index at ~4 bytes per entry
//! (the record offsets) rather than 12.

/// `(first index of the run, term)`, ascending by index.
#[derive(Debug, Default, Clone)]
pub struct TermRuns {
    runs: Vec<(u64, u64)>,
}

impl TermRuns {
    /// Term of `index`, assuming the caller checked it lies inside the stored log.
    pub fn term_at(&self, index: u64) -> u64 {
        let pos = self.runs.partition_point(|&(start, _)| start <= index);
        debug_assert!(pos > 0, "index {index} precedes every run");
        self.runs[pos.saturating_sub(1)].1
    }

    /// Term of the last entry, if any.
    pub fn last_term(&self) -> Option<u64> {
        self.runs.last().map(|&(_, t)| t)
    }

    /// Records that entry `index` (the new last entry) has `term`.
    pub fn push(&mut self, index: u64, term: u64) {
        if self.last_term() != Some(term) {
            self.runs.push((index, term));
        }
    }

    /// Forgets entries `>= index`.
    pub fn truncate(&mut self, index: u64) {
        let keep = self.runs.partition_point(|&(start, _)| start < index);
        self.runs.truncate(keep);
    }

    /// Forgets entries `<= index`, keeping the run that covers `index + 1`.
    pub fn compact(&mut self, index: u64) {
        let first_kept = self.runs.partition_point(|&(start, _)| start <= index + 1);
        if first_kept > 1 {
            self.runs.drain(..first_kept - 1);
        }
        if let Some(first) = self.runs.first_mut() {
            first.0 = first.0.max(index + 1);
        }
    }

    pub fn clear(&mut self) {
        self.runs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_across_runs() {
        let mut t = TermRuns::default();
        for (i, term) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 5)] {
            t.push(i, term);
        }
        assert_eq!((t.term_at(1), t.term_at(2), t.term_at(3), t.term_at(4), t.term_at(5)), (1, 1, 2, 2, 5));
        t.truncate(4);
        assert_eq!(t.last_term(), Some(2));
        t.push(4, 7);
        assert_eq!(t.term_at(4), 7);
        t.compact(3);
        assert_eq!(t.term_at(4), 7);
        t.compact(1);
        assert_eq!(t.term_at(4), 7);
    }

    #[test]
    fn compact_inside_a_run_keeps_it() {
        let mut t = TermRuns::default();
        for i in 1..=10 {
            t.push(i, if i < 6 { 1 } else { 2 });
        }
        t.compact(3);
        assert_eq!(t.term_at(4), 1);
        assert_eq!(t.term_at(6), 2);
        t.compact(7);
        assert_eq!(t.term_at(8), 2);
        assert_eq!(t.runs.len(), 1);
    }
}
