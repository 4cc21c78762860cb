//! [`WriteBehind`]: a large file's bytes go to the disk while it is written, a step at a time,
//! instead of all at once when it is synced.
//!
//! A snapshot of a large state is written in a fraction of a second and then fsync'd. Left to the
//! final fsync, its hundreds of megabytes reach the disk's queue in one burst, and every small
//! write-ahead-log sync issued meanwhile (this node's, or another node's on the same disk) waits
//! behind the burst: 50-60 ms latency spikes in `benchmarks/bench_embedded.py` at the end of each
//! snapshot of 85 MB. Starting the writeback of each step as soon as it is written, and waiting
//! for the step before it, keeps at most two steps queued ahead of a log sync. The snapshot takes
//! no longer while the disk keeps up with the writer (it is faster than the writer here).
//!
//! Advisory: Linux only (`sync_file_range`), and its errors are ignored, since the fsync that
//! ends every snapshot file is what reports a failed write. Elsewhere it does nothing.

use std::fs::File;

/// Bytes written between two writebacks: a few milliseconds of this disk's time, so that a log
/// sync queued behind two steps is not held up for long, and large enough that the calls cost
/// nothing next to the writing.
pub const STEP: u64 = 1 << 20;

/// Where a file written front to back stands: writeback started up to `started`, and waited for
/// up to `waited`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBehind {
    waited: u64,
    started: u64,
    step: u64,
}

/// The two things [`WriteBehind`] asks of the disk, apart so that tests can watch them.
pub trait Writeback {
    /// Starts writing back the dirty pages of `len` bytes at `offset`, without waiting.
    fn start(&mut self, offset: u64, len: u64);
    /// Writes back the pages of `len` bytes at `offset` and waits until they are written.
    fn wait(&mut self, offset: u64, len: u64);
}

impl WriteBehind {
    /// For a file whose bytes before `offset` are left to the final sync, with steps of [`STEP`].
    pub fn new(offset: u64) -> Self {
        Self::with_step(offset, STEP)
    }

    /// As [`new`](Self::new), with steps of `step` bytes (at least one).
    pub fn with_step(offset: u64, step: u64) -> Self {
        Self { waited: offset, started: offset, step: step.max(1) }
    }

    /// The file has been written up to `end`: once a step has accumulated since the last
    /// writeback, starts the next one and waits for the ones before.
    pub fn wrote(&mut self, file: &File, end: u64) {
        self.wrote_to(&mut FileWriteback(file), end, true);
    }

    /// As [`wrote`](Self::wrote), but never waits for the disk: for a writer on a thread that
    /// must not block (an event loop's). Writeback still starts a step at a time, so the final
    /// sync has little left; only the bound on what is queued at the disk is lost.
    pub fn wrote_without_waiting(&mut self, file: &File, end: u64) {
        self.wrote_to(&mut FileWriteback(file), end, false);
    }

    /// [`wrote`](Self::wrote) (or, without `wait`, [`wrote_without_waiting`](Self::wrote_without_waiting))
    /// against any [`Writeback`].
    pub fn wrote_to(&mut self, disk: &mut impl Writeback, end: u64, wait: bool) {
        if end < self.started.saturating_add(self.step) {
            return;
        }
        disk.start(self.started, end - self.started);
        if wait && self.started > self.waited {
            disk.wait(self.waited, self.started - self.waited);
            self.waited = self.started;
        }
        self.started = end;
    }
}

/// [`Writeback`] on a real file.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))] // the file is only used on Linux
struct FileWriteback<'a>(&'a File);

#[cfg(target_os = "linux")]
impl FileWriteback<'_> {
    fn sync_range(&self, offset: u64, len: u64, flags: libc::c_uint) {
        use std::os::fd::AsRawFd;
        // The offset type is `off64_t` on glibc and `off_t` on musl: let the call decide.
        let (Ok(offset), Ok(len)) = (offset.try_into(), len.try_into()) else {
            return;
        };
        // SAFETY: the descriptor belongs to a `File` borrowed for this call; the kernel only
        // reads the arguments. The result is ignored on purpose (see the module docs).
        unsafe {
            libc::sync_file_range(self.0.as_raw_fd(), offset, len, flags);
        }
    }
}

#[cfg(target_os = "linux")]
impl Writeback for FileWriteback<'_> {
    fn start(&mut self, offset: u64, len: u64) {
        self.sync_range(offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }

    fn wait(&mut self, offset: u64, len: u64) {
        self.sync_range(
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
    }
}

#[cfg(not(target_os = "linux"))]
impl Writeback for FileWriteback<'_> {
    fn start(&mut self, _offset: u64, _len: u64) {}

    fn wait(&mut self, _offset: u64, _len: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Default)]
    struct Recorded {
        calls: Vec<(&'static str, u64, u64)>,
    }

    impl Writeback for Recorded {
        fn start(&mut self, offset: u64, len: u64) {
            self.calls.push(("start", offset, len));
        }

        fn wait(&mut self, offset: u64, len: u64) {
            self.calls.push(("wait", offset, len));
        }
    }

    #[test]
    fn nothing_happens_until_a_step_has_been_written() {
        let (mut wb, mut disk) = (WriteBehind::with_step(100, 10), Recorded::default());
        wb.wrote_to(&mut disk, 105, true);
        wb.wrote_to(&mut disk, 109, true);
        assert!(disk.calls.is_empty());
    }

    #[test]
    fn each_step_starts_its_writeback_and_waits_for_the_one_before() {
        let (mut wb, mut disk) = (WriteBehind::with_step(100, 10), Recorded::default());
        for end in [110, 115, 123, 140, 141] {
            wb.wrote_to(&mut disk, end, true);
        }
        assert_eq!(
            disk.calls,
            vec![
                ("start", 100, 10),
                ("start", 110, 13),
                ("wait", 100, 10),
                ("start", 123, 17),
                ("wait", 110, 13)
            ]
        );
    }

    #[test]
    fn at_most_two_steps_are_ever_unwaited_for() {
        let (mut wb, mut disk) = (WriteBehind::with_step(0, 4), Recorded::default());
        let mut end = 0;
        for size in [1, 7, 3, 4, 9, 2, 2, 5, 11, 1] {
            end += size;
            wb.wrote_to(&mut disk, end, true);
            // Everything before the last two steps started has been waited for, in order.
            let waited: u64 = disk.calls.iter().filter(|c| c.0 == "wait").map(|c| c.2).sum();
            let started: u64 = disk.calls.iter().filter(|c| c.0 == "start").map(|c| c.2).sum();
            assert_eq!(waited, wb.waited);
            assert_eq!(started, wb.started);
            assert!(end - wb.waited <= 2 * (4 + 11), "{end} {wb:?}");
        }
    }

    #[test]
    fn without_waiting_only_starts_and_a_later_wait_covers_everything_before() {
        let (mut wb, mut disk) = (WriteBehind::with_step(0, 10), Recorded::default());
        for end in [10, 20, 30] {
            wb.wrote_to(&mut disk, end, false);
        }
        assert_eq!(disk.calls, vec![("start", 0, 10), ("start", 10, 10), ("start", 20, 10)]);
        wb.wrote_to(&mut disk, 40, true);
        assert_eq!(disk.calls[3..], [("start", 30, 10), ("wait", 0, 30)]);
    }

    #[test]
    fn a_real_file_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = File::create(&path).unwrap();
        let mut wb = WriteBehind::with_step(0, 4096);
        let mut expected = Vec::new();
        for i in 0..100u32 {
            let piece = vec![(i % 251) as u8; 1000 + i as usize];
            file.write_all(&piece).unwrap();
            expected.extend_from_slice(&piece);
            wb.wrote(&file, expected.len() as u64);
        }
        file.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        assert!(wb.waited > 0);
    }
}
