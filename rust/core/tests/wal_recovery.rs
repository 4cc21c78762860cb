//! Crash recovery of the WAL: torn tails are cut and reported, anything else is refused.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use dengine_core::log::record::HEADER_LEN;
use dengine_core::log::{Entry, LogStore, WalLogStore, WalOptions};
use dengine_core::Error;

fn opts() -> WalOptions {
    WalOptions { segment_bytes: 4096, preallocate: false }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// Writes entries 1..=n, each in its own batch, synced; returns the store's directory.
fn write_log(n: u64, payload_len: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    for i in 1..=n {
        s.append(&[Entry::new(i, 1, vec![(i % 251) as u8; payload_len])]).unwrap();
    }
    s.sync().unwrap();
    dir
}

fn set_len(path: &Path, len: u64) {
    OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x5A;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn every_cut_inside_the_last_record_is_a_torn_tail() {
    let payload = 40usize;
    let record = (HEADER_LEN + payload) as u64;
    let template = write_log(10, payload);
    let last_seg = segments(template.path()).pop().unwrap();
    let full_len = std::fs::metadata(&last_seg).unwrap().len();
    let record_start = full_len - record;
    for cut in record_start..full_len {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(template.path()).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
        }
        let seg = dir.path().join(last_seg.file_name().unwrap());
        set_len(&seg, cut);
        let s = WalLogStore::open(dir.path(), opts()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(s.last_index().unwrap(), 9, "cut at {cut}");
        let torn = s.recovery_report().torn_tail.clone();
        if cut == record_start {
            assert!(torn.is_none(), "a cut on a record boundary is a clean end");
        } else {
            let torn = torn.unwrap_or_else(|| panic!("cut at {cut} not reported"));
            assert_eq!((torn.offset, torn.bytes_cut), (record_start, cut - record_start));
        }
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            record_start,
            "the torn bytes are cut from the file"
        );
        assert_eq!(s.entries(1, 10, u64::MAX).unwrap().len(), 9);
        // The repaired log takes new appends where the torn one left off.
        s.append(&[Entry::new(10, 1, b"again".to_vec())]).unwrap();
        s.sync().unwrap();
        drop(s);
        let s = WalLogStore::open(dir.path(), opts()).unwrap();
        assert_eq!(s.entries(10, 11, u64::MAX).unwrap()[0].data, b"again");
        assert!(s.recovery_report().torn_tail.is_none());
    }
}

#[test]
fn a_zero_filled_tail_is_preallocated_space_not_damage() {
    let dir = write_log(5, 10);
    let seg = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    set_len(&seg, len + 4096);
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.last_index().unwrap(), 5);
    assert!(s.recovery_report().torn_tail.is_none());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len + 4096, "preallocated space is kept");
    s.append(&[Entry::new(6, 1, b"six".to_vec())]).unwrap();
    s.sync().unwrap();
    drop(s);
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.entries(6, 7, u64::MAX).unwrap()[0].data, b"six");
}

#[test]
fn a_torn_record_followed_by_zeros_is_cut() {
    let dir = write_log(5, 10);
    let seg = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let record = (HEADER_LEN + 10) as u64;
    // The last record's second half never reached the disk: zeros instead.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - record / 2).unwrap();
    f.set_len(len + 8192).unwrap();
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.last_index().unwrap(), 4);
    let torn = s.recovery_report().torn_tail.clone().expect("reported");
    assert_eq!(torn.offset, len - record);
}

#[test]
fn preallocated_segments_recover_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let prealloc = WalOptions { segment_bytes: 64 << 10, preallocate: true };
    {
        let s = WalLogStore::open(dir.path(), prealloc.clone()).unwrap();
        for i in 1..=2000u64 {
            s.append(&[Entry::new(i, 1 + i / 500, vec![(i % 256) as u8; 100])]).unwrap();
            if i % 100 == 0 {
                s.sync().unwrap();
            }
        }
        s.sync().unwrap();
        let segs = segments(dir.path());
        assert!(segs.len() >= 3);
        let last_len = std::fs::metadata(segs.last().unwrap()).unwrap().len();
        assert!(last_len >= 64 << 10, "the active segment is a preallocated file ({last_len} bytes)");
        // Dropped without close, as a crash would leave it.
    }
    let s = WalLogStore::open(dir.path(), prealloc).unwrap();
    assert!(s.recovery_report().torn_tail.is_none());
    let all = s.entries(1, 2001, u64::MAX).unwrap();
    assert_eq!(all.len(), 2000);
    assert!(all.iter().all(|e| e.data == vec![(e.index % 256) as u8; 100] && e.term == 1 + e.index / 500));
    s.close().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "close removes the spare preallocated file: {leftovers:?}");
}

#[test]
fn a_torn_segment_header_is_repaired() {
    let dir = write_log(3, 10);
    let name = dir.path().join("00000000000000000004.wal");
    std::fs::write(&name, b"DGW").unwrap();
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.last_index().unwrap(), 3);
    s.append(&[Entry::new(4, 1, b"x".to_vec())]).unwrap();
    s.sync().unwrap();
    drop(s);
    assert_eq!(WalLogStore::open(dir.path(), opts()).unwrap().last_index().unwrap(), 4);
}

#[test]
fn corruption_before_the_tail_names_file_and_offset() {
    let dir = write_log(10, 40);
    let seg = segments(dir.path()).pop().unwrap();
    // Damage the payload of the third record (offset: segment header 16 + 2 records).
    let third = 16 + 2 * (HEADER_LEN as u64 + 40);
    flip_byte(&seg, third + HEADER_LEN as u64 + 3);
    let err = WalLogStore::open(dir.path(), opts()).err().expect("must refuse to open");
    match err {
        Error::Corrupt { path, offset, .. } => {
            assert_eq!(path, seg);
            assert_eq!(offset, third);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 16 + 10 * (HEADER_LEN as u64 + 40), "nothing was cut");
}

#[test]
fn a_damaged_length_field_is_not_mistaken_for_a_torn_tail() {
    let dir = write_log(10, 40);
    let seg = segments(dir.path()).pop().unwrap();
    let fifth = 16 + 4 * (HEADER_LEN as u64 + 40);
    flip_byte(&seg, fifth + 5); // inside the length field
    assert!(
        matches!(WalLogStore::open(dir.path(), opts()), Err(Error::Corrupt { offset, .. }) if offset == fifth)
    );
}

#[test]
fn corruption_in_an_older_segment_is_a_hard_error_even_at_its_end() {
    let dir = write_log(400, 40);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    let first = &segs[0];
    let len = std::fs::metadata(first).unwrap().len();
    set_len(first, len - 3);
    assert!(
        matches!(WalLogStore::open(dir.path(), opts()), Err(Error::Corrupt { path, .. }) if &path == first)
    );
}

#[test]
fn a_missing_middle_segment_is_detected() {
    let dir = write_log(400, 40);
    let segs = segments(dir.path());
    std::fs::remove_file(&segs[1]).unwrap();
    assert!(matches!(WalLogStore::open(dir.path(), opts()), Err(Error::Corrupt { .. })));
}

#[test]
fn corrupt_entries_are_detected_on_read_too() {
    let dir = write_log(10, 40);
    let seg = segments(dir.path()).pop().unwrap();
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    flip_byte(&seg, 16 + HEADER_LEN as u64 + 1);
    assert!(matches!(s.entries(1, 2, u64::MAX), Err(Error::Corrupt { offset: 16, .. })));
}

#[test]
fn leftover_segments_below_a_durable_compaction_are_removed() {
    let dir = write_log(400, 40);
    let segs = segments(dir.path());
    let saved: Vec<(PathBuf, Vec<u8>)> =
        segs.iter().map(|p| (p.clone(), std::fs::read(p).unwrap())).collect();
    {
        let s = WalLogStore::open(dir.path(), opts()).unwrap();
        s.compact_prefix(350).unwrap();
    }
    // Simulate unlinks lost in a crash: put the deleted files back.
    for (p, bytes) in &saved {
        if !p.exists() {
            std::fs::write(p, bytes).unwrap();
        }
    }
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.first_index().unwrap(), 351);
    assert!(s.recovery_report().removed_segments > 0);
    assert_eq!(s.entries(351, 401, u64::MAX).unwrap().len(), 50);
}

/// Makes `path` impossible to remove for the store (a non-empty directory takes the file's
/// place), as a crash right before that unlink would; returns where the file went.
fn pin_in_place(path: &Path) -> PathBuf {
    let aside = path.with_extension("aside");
    std::fs::rename(path, &aside).unwrap();
    std::fs::create_dir(path).unwrap();
    std::fs::write(path.join("keep"), b"x").unwrap();
    aside
}

fn unpin(path: &Path, aside: &Path) {
    std::fs::remove_dir_all(path).unwrap();
    std::fs::rename(aside, path).unwrap();
}

#[test]
fn a_truncation_stopped_between_two_unlinks_leaves_a_log_that_opens() {
    // Segments are removed newest first: stopped before the newest went, nothing did, where
    // oldest-first would have left the newest after a gap, and a log that refuses to open.
    let dir = write_log(300, 40);
    let segs = segments(dir.path());
    assert!(segs.len() >= 4, "{segs:?}");
    let newest = segs.last().unwrap().clone();
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    let aside = pin_in_place(&newest);
    assert!(s.truncate_suffix(5).is_err());
    // What failed midway is not trusted any further.
    let refused = s.append(&[Entry::new(5, 2, b"new".to_vec())]).unwrap_err().to_string();
    assert!(refused.contains("unusable after an earlier I/O failure"), "{refused}");
    drop(s);
    unpin(&newest, &aside);
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.last_index().unwrap(), 300, "the old log, whole: the truncation never happened");
    assert_eq!(s.entries(1, 301, u64::MAX).unwrap().len(), 300);
}

#[test]
fn a_reset_stopped_between_two_unlinks_leaves_a_log_that_opens() {
    let dir = write_log(300, 40);
    let segs = segments(dir.path());
    let newest = segs.last().unwrap().clone();
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    let aside = pin_in_place(&newest);
    assert!(s.reset(1000, 3).is_err());
    drop(s);
    unpin(&newest, &aside);
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 300));
}

#[test]
fn a_failed_rollover_stops_the_store_and_loses_nothing_synced() {
    let dir = write_log(60, 40);
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    let mut i = s.last_index().unwrap();
    let next_segment = |i: u64| dir.path().join(format!("{:020}.wal", i + 1));
    // Fill the active segment, then make its successor's name taken: the rollover fails.
    let before = segments(dir.path()).len();
    while segments(dir.path()).len() == before {
        i += 1;
        s.append(&[Entry::new(i, 1, vec![7; 40])]).unwrap();
    }
    s.sync().unwrap();
    let synced = i;
    let mut blocked = None;
    for _ in 0..200 {
        std::fs::write(next_segment(i), b"in the way").unwrap();
        i += 1;
        match s.append(&[Entry::new(i, 1, vec![8; 40])]) {
            Ok(()) => {
                std::fs::remove_file(next_segment(i - 1)).unwrap();
            }
            Err(e) => {
                blocked = Some((e, next_segment(i - 1)));
                break;
            }
        }
    }
    let (err, in_the_way) = blocked.expect("a rollover was attempted");
    assert!(err.to_string().contains("exists"), "{err}");
    assert!(s.sync().is_err(), "nothing more after a failure that may have left files half changed");
    drop(s);
    std::fs::remove_file(in_the_way).unwrap();
    let s = WalLogStore::open(dir.path(), opts()).unwrap();
    assert!(s.last_index().unwrap() >= synced);
    let all = s.entries(1, s.last_index().unwrap() + 1, u64::MAX).unwrap();
    assert!(all.iter().enumerate().all(|(k, e)| e.index == k as u64 + 1));
}

#[test]
fn a_preallocated_segment_renamed_in_before_its_header_was_written_is_started_over() {
    let dir = tempfile::tempdir().unwrap();
    let prealloc = WalOptions { segment_bytes: 64 << 10, preallocate: true };
    {
        let s = WalLogStore::open(dir.path(), prealloc.clone()).unwrap();
        for i in 1..=1000u64 {
            s.append(&[Entry::new(i, 1, vec![(i % 256) as u8; 100])]).unwrap();
        }
        s.sync().unwrap();
    }
    // The process died right after renaming the next zero-filled file into place.
    let next = dir.path().join(format!("{:020}.wal", 1001));
    std::fs::write(&next, vec![0u8; 64 << 10]).unwrap();
    let s = WalLogStore::open(dir.path(), prealloc).unwrap();
    assert_eq!(s.last_index().unwrap(), 1000);
    let torn = s.recovery_report().torn_tail.clone().expect("reported as a torn tail");
    assert_eq!(torn.path, next);
    s.append(&[Entry::new(1001, 1, b"after".to_vec())]).unwrap();
    s.sync().unwrap();
    assert_eq!(s.entries(1001, 1002, u64::MAX).unwrap()[0].data, b"after");
}
