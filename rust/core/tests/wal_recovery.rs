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
