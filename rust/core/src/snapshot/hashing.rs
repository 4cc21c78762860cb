//! SHA-256 of a byte stream on a thread of its own, so that hashing one received chunk overlaps
//! checking and writing the next: on a busy machine a snapshot transfer is bounded by the
//! receiver's per-chunk work, and the digest is the largest part of it.

use std::io;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::{self, JoinHandle};

use sha2::{Digest, Sha256};

/// Chunks that may wait for the hashing thread before `update` blocks: bounds the memory held.
const QUEUE: usize = 4;

/// Feeds bytes, in order, to a SHA-256 running on another thread.
pub struct BackgroundHasher {
    tx: Option<SyncSender<Vec<u8>>>,
    worker: Option<JoinHandle<Sha256>>,
}

impl BackgroundHasher {
    /// Continues `state` (the digest of the bytes already received) on a new thread.
    pub fn start(state: Sha256) -> io::Result<Self> {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let worker = thread::Builder::new().name("dengine-snapshot-sha256".into()).spawn(move || {
            let mut state = state;
            for bytes in rx {
                state.update(&bytes);
            }
            state
        })?;
        Ok(BackgroundHasher { tx: Some(tx), worker: Some(worker) })
    }

    /// A hasher with no thread, to leave behind when the real one has been finalized.
    pub fn idle() -> Self {
        BackgroundHasher { tx: None, worker: None }
    }

    /// Hashes `bytes` after everything given before.
    pub fn update(&mut self, bytes: &[u8]) {
        if let Some(tx) = &self.tx {
            // Fails only if the thread is gone; `finalize` then reports no digest and the
            // snapshot is refused rather than published unverified.
            let _ = tx.send(bytes.to_vec());
        }
    }

    /// The digest of every byte given so far (`None` if the hashing thread failed).
    pub fn finalize(mut self) -> Option<[u8; 32]> {
        drop(self.tx.take());
        let state = self.worker.take()?.join().ok()?;
        Some(state.finalize().into())
    }
}

impl Drop for BackgroundHasher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
