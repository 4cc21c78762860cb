//! A thread that works for an event loop: the loop hands it work through a state behind a mutex
//! (and a condvar to wake it), and hears back through a socket it watches, one byte per piece of
//! work done. The thread never takes the GIL. `BackgroundSync` (log syncs) and `NativeApplier`
//! (committed batches applied) are built on it.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use pyo3::prelude::*;

/// The state a loop and its thread share, and whether the thread was told to stop.
pub struct Slot<S> {
    /// Set once the thread must stop.
    pub closed: bool,
    /// What the loop and the thread exchange.
    pub state: S,
}

/// The shared state and the condvar the thread waits on.
pub struct Shared<S> {
    slot: Mutex<Slot<S>>,
    wake: Condvar,
}

impl<S> Shared<S> {
    /// The slot, locked. A panic while it was held leaves it as it was: the thread reports its
    /// own failures through the state.
    pub fn lock(&self) -> MutexGuard<'_, Slot<S>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `work` finds something to do in the state (and takes it), or until the
    /// thread is told to stop (None).
    pub fn wait_for<T>(&self, mut work: impl FnMut(&mut S) -> Option<T>) -> Option<T> {
        let mut slot = self.lock();
        loop {
            if slot.closed {
                return None;
            }
            if let Some(found) = work(&mut slot.state) {
                return Some(found);
            }
            slot = self.wake.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The thread's end of the socket.
pub struct Waker(UnixStream);

impl Waker {
    /// Tells the loop that work is done; false once the loop's end is gone (the owner is being
    /// dropped), when the thread should stop.
    pub fn wake(&self) -> bool {
        match (&self.0).write(&[1]) {
            Ok(written) => written == 1,
            // A full socket buffer means a wake-up byte is already waiting: nothing is lost.
            Err(e) => e.kind() == ErrorKind::WouldBlock,
        }
    }
}

/// The loop's side: the thread, the state shared with it and the socket to watch.
pub struct LoopThread<S> {
    shared: Arc<Shared<S>>,
    reader: UnixStream,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// How a loop thread competes for the CPU with the event loop it works for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// As the loop: work that a write waits for (a log sync).
    Normal,
    /// Below the loop ([`BACKGROUND_NICE_STEP`] nice levels, on Linux): work nobody waits for
    /// while it runs, such as applying writes already answered, or a follower's apply, which its
    /// acknowledgements do not wait for. On a busy machine the loop, and the log sync it waits
    /// for, then go first.
    Background,
}

/// How many nice levels a [`Priority::Background`] thread takes below the thread that starts it
/// (the loop's), on Linux: at 5, about a quarter of the loop's CPU share when both want the same
/// core, and all of what is idle. In `benchmarks/bench_embedded.py` at 400 writes in flight (3
/// nodes on 2 cores) it raised the rate by 4-5% and lowered the p99 by about half a millisecond
/// (benchmarks/RESULTS.md).
pub const BACKGROUND_NICE_STEP: i32 = 5;

/// Sets the calling thread, just started by the loop's thread, at `priority`. Linux only: there
/// the nice value belongs to a thread, while elsewhere `setpriority` would lower the whole
/// process.
fn take(priority: Priority) {
    #[cfg(target_os = "linux")]
    if priority == Priority::Background {
        // Relative to the loop's, which the thread inherited: a process already started nicer
        // than 0 keeps its apply thread below its loop. (19 is the lowest priority there is.)
        // SAFETY: neither call reads memory of ours; `who` 0 is the calling thread on Linux. A
        // failure (a seccomp filter, say) leaves the thread at the loop's priority: harmless.
        unsafe {
            let loops = libc::getpriority(libc::PRIO_PROCESS, 0);
            libc::setpriority(libc::PRIO_PROCESS, 0, (loops + BACKGROUND_NICE_STEP).min(19));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
}

impl<S: Default + Send + 'static> LoopThread<S> {
    /// Starts the thread `name` at `priority`, running `body` with the shared state and the
    /// waker.
    pub fn spawn(
        name: &str,
        priority: Priority,
        body: impl FnOnce(Arc<Shared<S>>, Waker) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot { closed: false, state: S::default() }),
            wake: Condvar::new(),
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            take(priority);
            body(for_thread, Waker(writer))
        })?;
        Ok(LoopThread { shared, reader, thread: Mutex::new(Some(thread)) })
    }
}

impl<S> LoopThread<S> {
    /// The file descriptor for the loop to watch for readability (`loop.add_reader`).
    pub fn fileno(&self) -> i32 {
        self.reader.as_raw_fd()
    }

    /// The shared slot, locked; call `notify` after giving the thread work.
    pub fn lock(&self) -> MutexGuard<'_, Slot<S>> {
        self.shared.lock()
    }

    /// Wakes the thread to look at the state again.
    pub fn notify(&self) {
        self.shared.wake.notify_one();
    }

    /// Reads the wake-up bytes waiting on the socket; true if the thread's end is gone (it
    /// stopped: the socket then stays readable, so the loop must stop watching it).
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match (&self.reader).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false, // WouldBlock: drained
            }
        }
    }

    /// Stops the thread after the work it may be doing, and waits for it with the GIL released.
    pub fn close(&self, py: Python<'_>) {
        self.lock().closed = true;
        self.notify();
        let handle = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            py.detach(move || {
                let _ = handle.join();
            });
        }
    }
}

impl<S> Drop for LoopThread<S> {
    fn drop(&mut self) {
        self.lock().closed = true;
        self.notify();
    }
}
