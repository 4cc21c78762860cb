//! Zero-filled segment files prepared ahead of need, on a background thread.
//!
//! Overwriting blocks that already exist lets `fdatasync` skip the file-size and block-allocation
//! metadata that appending past the end of a file drags into every flush. Measured on the
//! development machine: a 284-byte write + fdatasync takes 118 µs in a pre-zeroed file against
//! 158 µs appended, and an 18 KiB one 142 µs against 238 µs. `fallocate` does not help (unwritten
//! extents still need converting), so the file is really written with zeros, off the hot path.
//!
//! The price is writing every segment twice, and the background flush of a segment of zeros
//! delays the WAL's own fsyncs while it runs (p99 of a 1024-entry batch + fsync rose from about
//! 2 ms to 6-13 ms in `benchmarks/bench_logstore.py`). So it is off by default: a latency option
//! for logs that are not bandwidth-bound.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::{Error, Result};

const PREFIX: &str = "prealloc-";
const SUFFIX: &str = ".tmp";

/// Keeps one zero-filled, fsynced file of `size` bytes ready for the next segment.
pub struct Preallocator {
    dir: PathBuf,
    size: u64,
    seq: u64,
    pending: Option<JoinHandle<Result<PathBuf>>>,
    /// Set on close, so a store closed right after opening does not wait for a whole segment
    /// of zeros to be written.
    cancel: Arc<AtomicBool>,
}

impl Preallocator {
    /// Removes leftovers of an earlier process and starts preparing the first file.
    pub fn start(dir: &Path, size: u64) -> Result<Preallocator> {
        for ent in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = ent.map_err(|e| Error::io(dir, e))?.path();
            if Self::is_prealloc_file(&path) {
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        let mut p = Preallocator {
            dir: dir.to_path_buf(),
            size,
            seq: 0,
            pending: None,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        p.prepare_next();
        Ok(p)
    }

    fn is_prealloc_file(path: &Path) -> bool {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
    }

    fn prepare_next(&mut self) {
        self.seq += 1;
        let path = self.dir.join(format!("{PREFIX}{}{SUFFIX}", self.seq));
        let size = self.size;
        let cancel = Arc::clone(&self.cancel);
        self.pending = Some(std::thread::spawn(move || zero_fill(&path, size, &cancel).map(|()| path)));
    }

    /// Whether a prepared file can be taken without waiting.
    pub fn is_ready(&self) -> bool {
        self.pending.as_ref().is_some_and(JoinHandle::is_finished)
    }

    /// The prepared file (waiting for it if needed); preparation of the following one starts
    /// at once. `None` when preparation failed (for example a full disk): the caller then
    /// creates an ordinary file, and the failure surfaces on the appends themselves.
    pub fn take(&mut self) -> Option<PathBuf> {
        let ready = self.pending.take().and_then(|h| h.join().ok()).and_then(|r| r.ok());
        self.prepare_next();
        ready
    }

    /// Cancels and waits for the background thread, and removes its file.
    pub fn stop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(handle) = self.pending.take() {
            let _ = handle.join();
            let _ = fs::remove_file(self.dir.join(format!("{PREFIX}{}{SUFFIX}", self.seq)));
        }
    }
}

impl Drop for Preallocator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn zero_fill(path: &Path, size: u64, cancel: &AtomicBool) -> Result<()> {
    let file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let block = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let n = (size - at).min(block.len() as u64) as usize;
        crate::pio::write_all_at(&file, &block[..n], at).map_err(|e| Error::io(path, e))?;
        at += n as u64;
    }
    file.sync_all().map_err(|e| Error::io(path, e))
}
