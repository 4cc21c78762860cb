//! [`WalLogStore`]: the durable log engine.
//!
//! Layout of a data directory:
//!
//! ```text
//! LOCK                        held (advisory lock) while a process has the store open
//! meta                        hard state + compaction point, two checksummed slots
//! 00000000000000000001.wal    segments, each named after its first index
//! 00000000000000052318.wal
//! ```
//!
//! Memory: per entry, only a 4-byte record offset stays in RAM (plus one run per term change);
//! payloads are read back from the files (the OS page cache keeps recent ones hot).
//!
//! Concurrency: one mutex guards the in-memory index and is held only for short, non-blocking
//! work and the `write(2)` of a batch. [`LogStore::sync`] collects the files to flush under the
//! lock, then fsyncs *without* it, so appends keep flowing while the disk flushes: many appends,
//! one fsync.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::bounds;
use super::meta::{Meta, MetaFile};
use super::prealloc::Preallocator;
use super::segment::Segment;
pub use super::segment::TornTail;
use super::terms::TermRuns;
use super::{EncodedBatch, Entry, HardState, LogStore};
use crate::pio;
use crate::{Error, Result};

/// Tunables of a [`WalLogStore`].
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A segment stops taking appends once it reaches this size; the next batch starts a new one.
    pub segment_bytes: u64,
    /// Prepare each next segment as a zero-filled file on a background thread, so appends
    /// overwrite existing blocks and each fsync flushes less metadata. Lower median latency,
    /// but twice the disk writes and a worse tail; off by default (see `prealloc`).
    pub preallocate: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes: 64 << 20, preallocate: false }
    }
}

/// What recovery found when the store was opened.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Set when a crash-torn partial record was cut from the end of the log.
    pub torn_tail: Option<TornTail>,
    pub segments: usize,
    /// Leftover segment files removed because a durable compaction already covered them.
    pub removed_segments: usize,
}

struct State {
    segments: Vec<Segment>,
    terms: TermRuns,
    compact_index: u64,
    compact_term: u64,
    /// Segment files written since the last sync.
    unsynced: Vec<Arc<File>>,
    dir_dirty: bool,
    durable: u64,
    /// Lowest `index - 1` of any truncation during the sync in flight, which caps what that sync
    /// may report durable (entries appended after the truncation were not flushed by it).
    truncated_floor: Option<u64>,
    prealloc: Option<Preallocator>,
    closed: bool,
    /// A failed fsync leaves the page cache in an unknown state; the store refuses further work.
    failed: Option<String>,
}

impl State {
    fn first_index(&self) -> u64 {
        self.compact_index + 1
    }

    fn last_index(&self) -> u64 {
        self.segments.last().map_or(self.compact_index, |s| s.next_index() - 1).max(self.compact_index)
    }

    fn last_term(&self) -> u64 {
        if self.last_index() == self.compact_index {
            self.compact_term
        } else {
            self.terms.last_term().unwrap_or(self.compact_term)
        }
    }

    fn term(&self, index: u64) -> Result<u64> {
        bounds::check_term(index, self.first_index(), self.last_index())?;
        Ok(if index == self.compact_index { self.compact_term } else { self.terms.term_at(index) })
    }

    fn mark_unsynced(&mut self, file: &Arc<File>) {
        if !self.unsynced.iter().any(|f| Arc::ptr_eq(f, file)) {
            self.unsynced.push(Arc::clone(file));
        }
    }

    fn segment_for(&self, index: u64) -> usize {
        self.segments.partition_point(|s| s.first_index <= index).saturating_sub(1)
    }

    /// Makes the store refuse further work after `err` (see `failed`); the first reason stands.
    fn fail(&mut self, err: Error) -> Error {
        if self.failed.is_none() {
            self.failed = Some(err.to_string());
        }
        err
    }
}

/// The durable, segmented write-ahead log. See the module docs for layout and guarantees.
pub struct WalLogStore {
    dir: PathBuf,
    opts: WalOptions,
    state: Mutex<State>,
    /// Separate from `state` so hard-state saves never wait behind a batch write; lock order is
    /// always `state` before `meta`.
    meta: Mutex<MetaFile>,
    /// One sync at a time: a second caller simply waits and then flushes what arrived meanwhile.
    sync_lock: Mutex<()>,
    /// One compaction at a time: each makes its point durable, then applies it.
    compact_lock: Mutex<()>,
    report: RecoveryReport,
    dir_lock: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the on-disk log inconsistent (every mutation
    // is checked before it is applied), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WalLogStore {
    /// Opens (or creates) the log in `dir`, recovering from any crash-torn tail.
    pub fn open(dir: impl AsRef<Path>, opts: WalOptions) -> Result<WalLogStore> {
        let dir = dir.as_ref().to_path_buf();
        if opts.segment_bytes < 4096 {
            return Err(Error::InvalidArgument(format!(
                "segment_bytes must be at least 4096, got {}",
                opts.segment_bytes
            )));
        }
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        lock_file.try_lock().map_err(|_| {
            Error::io(
                &lock_path,
                std::io::Error::other("the log directory is already open in another process or store"),
            )
        })?;

        let meta = MetaFile::open(&dir)?;
        let Meta { compact_index, compact_term, .. } = meta.get();
        let mut report = RecoveryReport::default();

        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for ent in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let ent = ent.map_err(|e| Error::io(&dir, e))?;
            if let Some(first) = ent.file_name().to_str().and_then(Segment::parse_name) {
                names.push((first, ent.path()));
            }
        }
        names.sort();
        // Segments wholly covered by the compaction point are leftovers of a compaction whose
        // unlinks did not reach the disk; the compaction itself was durable, so drop them.
        while names.len() > 1 && names[1].0 <= compact_index + 1 {
            let (_, path) = names.remove(0);
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            report.removed_segments += 1;
        }

        let mut terms = TermRuns::default();
        let mut segments = Vec::with_capacity(names.len());
        let count = names.len();
        for (i, (first, path)) in names.into_iter().enumerate() {
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                if prev.next_index() != first {
                    return Err(Error::corrupt(
                        &path,
                        0,
                        format!(
                            "segment starts at index {first} but the previous one ends at {}",
                            prev.next_index() - 1
                        ),
                    ));
                }
            }
            let (seg, torn) = Segment::recover(path, first, i + 1 == count, &mut terms)?;
            report.torn_tail = torn;
            segments.push(seg);
        }
        if let Some(first) = segments.first() {
            if first.first_index > compact_index + 1 {
                return Err(Error::corrupt(
                    &first.path,
                    0,
                    format!(
                        "log starts at index {} but only entries up to {compact_index} were compacted",
                        first.first_index
                    ),
                ));
            }
        }
        let last_on_disk = segments.last().map_or(0, |s| s.next_index() - 1);
        if segments.is_empty() || last_on_disk < compact_index {
            // Nothing usable beyond the compaction point (a reset interrupted by a crash, or a
            // brand-new store): start a fresh segment right after it.
            for s in segments.drain(..) {
                fs::remove_file(&s.path).map_err(|e| Error::io(&s.path, e))?;
                report.removed_segments += 1;
            }
            terms.clear();
            segments.push(Segment::create(&dir, compact_index + 1, None)?);
        } else {
            terms.compact(compact_index);
            if last_on_disk > compact_index && terms.term_at(compact_index + 1) < compact_term {
                return Err(Error::corrupt(
                    &segments[0].path,
                    0,
                    format!(
                        "entry {} has a term below the compaction term {compact_term}",
                        compact_index + 1
                    ),
                ));
            }
        }
        report.segments = segments.len();
        let active = Arc::clone(&segments.last().expect("at least one segment").file);
        // What recovery read may still sit only in the page cache (the previous process died, the
        // machine did not); flush it so that what we now call durable really is.
        active.sync_data().map_err(|e| Error::io(&dir, e))?;
        // The directory too, always: the previous process may have created the last segment
        // and died before any sync reached its directory entry, and its entries are now
        // counted durable.
        pio::sync_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut state = State {
            segments,
            terms,
            compact_index,
            compact_term,
            unsynced: Vec::new(),
            dir_dirty: false,
            durable: 0,
            truncated_floor: None,
            prealloc: if opts.preallocate {
                Some(Preallocator::start(&dir, opts.segment_bytes)?)
            } else {
                None
            },
            closed: false,
            failed: None,
        };
        state.durable = state.last_index();
        Ok(WalLogStore {
            dir,
            opts,
            state: Mutex::new(state),
            meta: Mutex::new(meta),
            sync_lock: Mutex::new(()),
            compact_lock: Mutex::new(()),
            report,
            dir_lock: lock_file,
        })
    }

    /// What recovery did when this store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `lo..hi` segment by segment through `read(segment, from, to, budget)`, until the
    /// range ends or `read` reports the `max_bytes` budget spent.
    fn read_range(
        &self,
        lo: u64,
        hi: u64,
        max_bytes: u64,
        mut read: impl FnMut(&Segment, u64, u64, &mut u64) -> Result<bool>,
    ) -> Result<()> {
        let st = self.live()?;
        bounds::check_range(lo, hi, st.first_index(), st.last_index())?;
        let mut budget = max_bytes;
        let mut at = lo;
        let mut seg = st.segment_for(lo);
        while at < hi {
            let s = &st.segments[seg];
            let stop = hi.min(s.next_index());
            if !read(s, at, stop, &mut budget)? {
                break;
            }
            at = stop;
            seg += 1;
        }
        Ok(())
    }

    fn live(&self) -> Result<MutexGuard<'_, State>> {
        let st = lock(&self.state);
        if st.closed {
            return Err(Error::Closed);
        }
        if let Some(why) = &st.failed {
            return Err(Error::io(
                &self.dir,
                std::io::Error::other(format!("store unusable after an earlier I/O failure: {why}")),
            ));
        }
        Ok(st)
    }

    fn remove_segment_file(&self, seg: &Segment) -> Result<()> {
        fs::remove_file(&seg.path).map_err(|e| Error::io(&seg.path, e))
    }

    fn append_checked(&self, st: &mut State, batch: &EncodedBatch) -> Result<()> {
        let active = st.segments.last().expect("active segment");
        let full = active.end >= self.opts.segment_bytes;
        // A segment made without preallocation (a fresh or reset log) is left as soon as a
        // zero-filled one is ready, so only the first few batches pay for appending.
        let upgrade = !active.preallocated && st.prealloc.as_ref().is_some_and(Preallocator::is_ready);
        let prepared = if full || upgrade { st.prealloc.as_mut().and_then(Preallocator::take) } else { None };
        if full || prepared.is_some() {
            // The old segment is flushed before the new one exists, so a crash can never leave
            // a torn record anywhere but in the last segment.
            let old = Arc::clone(&st.segments.last().expect("active segment").file);
            old.sync_data().map_err(|e| Error::io(&self.dir, e))?;
            st.unsynced.retain(|f| !Arc::ptr_eq(f, &old));
            if st.segments.last().is_some_and(|s| s.next_index() == s.first_index) {
                // Only an upgrade finds the active segment empty (a full one has records): the
                // prepared file takes its name, and the rename replaces it.
                st.segments.pop();
            }
            st.segments.push(Segment::create(&self.dir, batch.first_index(), prepared)?);
            st.dir_dirty = true;
        }
        let seg = st.segments.last_mut().expect("active segment");
        seg.append(&batch.buf, &batch.starts)?;
        let file = Arc::clone(&seg.file);
        st.mark_unsynced(&file);
        for &(index, term) in batch.term_runs() {
            st.terms.push(index, term);
        }
        Ok(())
    }

    fn truncate_checked(&self, st: &mut State, index: u64) -> Result<()> {
        let keep = st.segment_for(index);
        let removed: Vec<Segment> = st.segments.drain(keep + 1..).collect();
        // Newest first, and durable before the kept segment is cut: a crash at any step then
        // leaves a prefix of the old log (valid: nothing was acknowledged since), never a gap
        // between a cut segment and a later one still on disk.
        for seg in removed.iter().rev() {
            self.remove_segment_file(seg)?;
        }
        if !removed.is_empty() {
            pio::sync_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        }
        st.segments[keep].truncate(index)?;
        st.unsynced.retain(|f| !removed.iter().any(|s| Arc::ptr_eq(f, &s.file)));
        st.terms.truncate(index);
        st.durable = st.durable.min(index - 1);
        st.truncated_floor = Some(st.truncated_floor.map_or(index - 1, |f| f.min(index - 1)));
        Ok(())
    }

    fn reset_checked(&self, st: &mut State, index: u64, term: u64) -> Result<()> {
        // Remove the old log first, newest segment first: a crash between the steps then leaves
        // a prefix of the old log at the old compaction point (or nothing), which the snapshot
        // that triggered the reset still covers.
        for seg in st.segments.drain(..).rev() {
            fs::remove_file(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
        }
        st.unsynced.clear();
        pio::sync_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        {
            let mut meta = lock(&self.meta);
            let mut m = meta.get();
            m.compact_index = index;
            m.compact_term = term;
            meta.write(m).and_then(|()| meta.sync())?;
        }
        st.compact_index = index;
        st.compact_term = term;
        st.terms.clear();
        let seg = Segment::create(&self.dir, index + 1, None)?;
        seg.file.sync_data().map_err(|e| Error::io(&seg.path, e))?;
        st.segments.push(seg);
        pio::sync_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        st.durable = index;
        st.truncated_floor = Some(st.truncated_floor.map_or(index, |f| f.min(index)));
        Ok(())
    }

    /// Turns an I/O failure into a permanent failure of the store (see `failed`). Never called
    /// with the state or the meta lock held (the state lock is taken here, and is always taken
    /// before the meta lock); with the state held, call `State::fail`.
    fn fail(&self, err: Error) -> Error {
        lock(&self.state).fail(err)
    }
}

impl LogStore for WalLogStore {
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
        let mut out = Vec::new();
        self.read_range(lo, hi, max_bytes, |seg, at, stop, budget| seg.read(at, stop, budget, &mut out))?;
        Ok(out)
    }

    fn entry_batch(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<EncodedBatch> {
        let mut out = EncodedBatch::new();
        self.read_range(lo, hi, max_bytes, |seg, at, stop, budget| {
            seg.read_framed(at, stop, budget, &mut out)
        })?;
        Ok(out)
    }

    fn append_batch(&self, batch: &EncodedBatch) -> Result<()> {
        let mut guard = self.live()?;
        let st = &mut *guard;
        bounds::check_append(batch, st.last_index(), st.last_term(), st.first_index())?;
        if batch.is_empty() {
            return Ok(());
        }
        // From here on a failure can leave the files and what the store holds apart (a partial
        // write past the end, a segment half rolled over): the store stops, as after a failed
        // fsync, rather than write over what it no longer knows.
        self.append_checked(st, batch).map_err(|e| st.fail(e))
    }

    fn truncate_suffix(&self, index: u64) -> Result<()> {
        let mut guard = self.live()?;
        let st = &mut *guard;
        bounds::check_truncate(index, st.first_index(), st.last_index())?;
        if index == st.last_index() + 1 {
            return Ok(());
        }
        self.truncate_checked(st, index).map_err(|e| st.fail(e))
    }

    fn compact_prefix(&self, index: u64) -> Result<()> {
        // The fsync and the unlinks happen outside the state lock: the thread that appends (a
        // node's event loop) must not wait behind a compaction's disk work.
        let _one_at_a_time = lock(&self.compact_lock);
        let term = {
            let st = self.live()?;
            bounds::check_compact(index, st.first_index(), st.last_index())?;
            if index == st.compact_index {
                return Ok(());
            }
            st.term(index)?
        };
        let saved = {
            let mut meta = lock(&self.meta);
            let mut m = meta.get();
            // A reset (snapshot install) in the meantime may have moved the point further: the
            // durable compaction point never moves back.
            if m.compact_index < index {
                m.compact_index = index;
                m.compact_term = term;
                meta.write(m).and_then(|()| meta.sync())
            } else {
                Ok(())
            }
        };
        // Failed, the meta file holds a flush the next sync would wrongly report done.
        saved.map_err(|e| self.fail(e))?;
        let removed = {
            let mut guard = self.live()?;
            let st = &mut *guard;
            if index <= st.compact_index || st.term(index).ok() != Some(term) {
                return Ok(()); // reset meanwhile: that log is gone, and so is this compaction
            }
            st.compact_index = index;
            st.compact_term = term;
            st.terms.compact(index);
            let mut removed = Vec::new();
            while st.segments.len() > 1 && st.segments[1].first_index <= index + 1 {
                let seg = st.segments.remove(0);
                st.unsynced.retain(|f| !Arc::ptr_eq(f, &seg.file));
                removed.push(seg);
            }
            removed
        };
        for seg in &removed {
            self.remove_segment_file(seg)?;
        }
        if !removed.is_empty() {
            // Unlinks may be lost in a crash; that is harmless, since recovery drops segments
            // below the durable compaction point. The next sync makes them durable.
            self.live()?.dir_dirty = true;
        }
        Ok(())
    }

    fn reset(&self, index: u64, term: u64) -> Result<()> {
        bounds::check_value("index", index)?;
        bounds::check_value("term", term)?;
        let mut guard = self.live()?;
        let st = &mut *guard;
        self.reset_checked(st, index, term).map_err(|e| st.fail(e))
    }

    fn save_hard_state(&self, hs: HardState) -> Result<()> {
        drop(self.live()?);
        let mut meta = lock(&self.meta);
        let mut m = meta.get();
        // Term and vote must be durable before any message of the term leaves; the commit index
        // need not be (a restart clamps it to the log), and flushing it on every sync would
        // double the fsyncs on the write path.
        let commit_only = m.hard_state.term == hs.term && m.hard_state.vote == hs.vote;
        m.hard_state = hs;
        if commit_only {
            meta.write_lazy(m)
        } else {
            meta.write(m)
        }
    }

    fn hard_state(&self) -> Result<HardState> {
        drop(self.live()?);
        Ok(lock(&self.meta).get().hard_state)
    }

    fn sync(&self) -> Result<u64> {
        let _one_at_a_time = lock(&self.sync_lock);
        let (files, dir_dirty, target) = {
            let mut st = self.live()?;
            st.truncated_floor = None;
            let files = std::mem::take(&mut st.unsynced);
            (files, std::mem::take(&mut st.dir_dirty), st.last_index())
        };
        for f in &files {
            f.sync_data().map_err(|e| self.fail(Error::io(&self.dir, e)))?;
        }
        if dir_dirty {
            pio::sync_dir(&self.dir).map_err(|e| self.fail(Error::io(&self.dir, e)))?;
        }
        // The log is flushed before the hard state, so a durable commit index never points past
        // durable entries.
        let flushed = lock(&self.meta).sync(); // the meta lock is let go before `fail` takes the state's
        flushed.map_err(|e| self.fail(e))?;
        let mut st = lock(&self.state);
        let reached = st.truncated_floor.map_or(target, |f| target.min(f));
        st.durable = st.durable.max(reached).min(st.last_index());
        Ok(st.durable)
    }

    fn durable_index(&self) -> Result<u64> {
        Ok(self.live()?.durable)
    }

    fn close(&self) -> Result<()> {
        if lock(&self.state).closed {
            return Ok(());
        }
        let result = self.sync().and_then(|durable| {
            let flushed = lock(&self.meta).close_sync();
            flushed.map_err(|e| self.fail(e))?;
            Ok(durable)
        });
        let mut st = lock(&self.state);
        st.closed = true;
        // Release files and the directory lock now, not at drop: Python may keep the object
        // alive for a while, and a reopen in the same process must not be refused.
        st.segments.clear();
        st.unsynced.clear();
        st.prealloc = None;
        let _ = self.dir_lock.unlock();
        result.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_term_and_vote_changes_wait_for_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
        s.save_hard_state(HardState { term: 2, vote: Some(1), commit: 0 }).unwrap();
        assert!(lock(&s.meta).needs_sync());
        s.sync().unwrap();
        s.save_hard_state(HardState { term: 2, vote: Some(1), commit: 7 }).unwrap();
        assert!(!lock(&s.meta).needs_sync(), "a commit-only change must not cost an fsync");
        s.save_hard_state(HardState { term: 2, vote: None, commit: 7 }).unwrap();
        assert!(lock(&s.meta).needs_sync(), "a vote change must be flushed");
        s.sync().unwrap();
        s.save_hard_state(HardState { term: 3, vote: None, commit: 7 }).unwrap();
        assert!(lock(&s.meta).needs_sync(), "a term change must be flushed");
        s.close().unwrap();
        let reopened = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(reopened.hard_state().unwrap(), HardState { term: 3, vote: None, commit: 7 });
    }

    #[test]
    fn appends_do_not_wait_behind_a_compactions_disk_work() {
        use std::sync::mpsc;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions { segment_bytes: 4096, preallocate: false };
        let s = Arc::new(WalLogStore::open(dir.path(), opts.clone()).unwrap());
        let entry = |i: u64| Entry { index: i, term: 1, data: vec![7; 200] };
        s.append(&(1..=100).map(entry).collect::<Vec<_>>()).unwrap();
        s.sync().unwrap();
        // Holding the meta file stands for a compaction's fsync that takes its time.
        let slow_disk = lock(&s.meta);
        let compactor = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || s.compact_prefix(80))
        };
        std::thread::sleep(Duration::from_millis(50)); // the compaction is now at its fsync
        let (done, appended) = mpsc::channel();
        let appender = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || done.send(s.append(&[entry(101)])).unwrap())
        };
        let waited = appended.recv_timeout(Duration::from_secs(5));
        drop(slow_disk);
        compactor.join().unwrap().unwrap();
        appender.join().unwrap();
        waited.expect("the append waited for the compaction's fsync").unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (81, 101));
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        s.sync().unwrap();
        drop(s);
        let reopened = WalLogStore::open(dir.path(), opts).unwrap();
        assert_eq!((reopened.first_index().unwrap(), reopened.last_index().unwrap()), (81, 101));
        assert!(files < 20, "segments below the compaction point were removed ({files} files)");
    }
}
