//! Behaviour of the durable WAL engine: reopen, segment roll, truncation, compaction, locking.

use dengine_core::log::{Entry, HardState, LogStore, WalLogStore, WalOptions};
use dengine_core::Error;

fn entries(lo: u64, hi: u64, term: u64) -> Vec<Entry> {
    (lo..hi).map(|i| Entry::new(i, term, format!("entry-{i}").into_bytes())).collect()
}

fn small_segments() -> WalOptions {
    WalOptions { segment_bytes: 4096, preallocate: true }
}

fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    v.sort();
    v
}

#[test]
fn fresh_store_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
    assert_eq!(s.term(0).unwrap(), 0);
    assert_eq!(s.hard_state().unwrap(), HardState::default());
    assert!(s.entries(1, 1, u64::MAX).unwrap().is_empty());
}

#[test]
fn appends_survive_reopen_with_hard_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
        s.append(&entries(1, 101, 1)).unwrap();
        s.append(&entries(101, 151, 2)).unwrap();
        s.save_hard_state(HardState { term: 2, vote: Some(3), commit: 120 }).unwrap();
        assert_eq!(s.sync().unwrap(), 150);
    }
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(s.last_index().unwrap(), 150);
    assert_eq!(s.durable_index().unwrap(), 150);
    assert_eq!(s.term(100).unwrap(), 1);
    assert_eq!(s.term(101).unwrap(), 2);
    assert_eq!(s.entries(1, 151, u64::MAX).unwrap(), [entries(1, 101, 1), entries(101, 151, 2)].concat());
    assert_eq!(s.hard_state().unwrap(), HardState { term: 2, vote: Some(3), commit: 120 });
    assert!(s.recovery_report().torn_tail.is_none());
}

#[test]
fn durable_index_moves_only_on_sync() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    s.append(&entries(1, 11, 1)).unwrap();
    assert_eq!(s.durable_index().unwrap(), 0);
    assert_eq!(s.sync().unwrap(), 10);
    s.append(&entries(11, 12, 1)).unwrap();
    assert_eq!(s.durable_index().unwrap(), 10);
}

#[test]
fn segments_roll_and_reads_cross_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
    for i in 1..=500 {
        s.append(&entries(i, i + 1, 1 + i / 100)).unwrap();
    }
    s.sync().unwrap();
    let files = segment_files(dir.path());
    assert!(files.len() >= 4, "expected several segments, got {files:?}");
    let all = s.entries(1, 501, u64::MAX).unwrap();
    assert_eq!(all.len(), 500);
    assert!(all.iter().enumerate().all(|(i, e)| e.index == i as u64 + 1 && e.term == 1 + e.index / 100));
    drop(s);
    let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
    assert_eq!(s.entries(1, 501, u64::MAX).unwrap(), all);
    assert_eq!(s.recovery_report().segments, files.len());
}

#[test]
fn max_bytes_limits_reads_but_never_below_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
    let batch: Vec<Entry> = (1..=100).map(|i| Entry::new(i, 1, vec![7u8; 100])).collect();
    s.append(&batch).unwrap();
    assert_eq!(s.entries(1, 101, 0).unwrap().len(), 1);
    assert_eq!(s.entries(1, 101, 250).unwrap().len(), 2);
    assert_eq!(s.entries(1, 101, 300).unwrap().len(), 3);
    assert_eq!(s.entries(5, 101, 1000).unwrap().len(), 10);
    assert_eq!(s.entries(1, 101, u64::MAX).unwrap().len(), 100);
}

#[test]
fn truncate_suffix_across_segments_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
        for i in 1..=300 {
            s.append(&entries(i, i + 1, 1)).unwrap();
        }
        s.sync().unwrap();
        let before = segment_files(dir.path()).len();
        s.truncate_suffix(42).unwrap();
        assert_eq!(s.last_index().unwrap(), 41);
        assert!(segment_files(dir.path()).len() < before);
        assert_eq!(s.durable_index().unwrap(), 41);
        s.append(&entries(42, 50, 2)).unwrap();
        // No sync: truncation itself must already be durable.
    }
    let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
    assert!(s.last_index().unwrap() >= 41);
    assert_eq!(s.term(41).unwrap(), 1);
    for e in s.entries(42, s.last_index().unwrap() + 1, u64::MAX).unwrap() {
        assert_eq!(e.term, 2, "an entry removed by truncation came back: {e:?}");
    }
}

#[test]
fn truncate_then_sync_reports_only_new_entries() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    s.append(&entries(1, 11, 1)).unwrap();
    s.sync().unwrap();
    s.truncate_suffix(6).unwrap();
    s.append(&entries(6, 8, 2)).unwrap();
    assert_eq!(s.sync().unwrap(), 7);
    assert_eq!(s.term(7).unwrap(), 2);
}

#[test]
fn compaction_removes_segments_and_keeps_boundary_term() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
        for i in 1..=400 {
            s.append(&entries(i, i + 1, if i <= 250 { 1 } else { 2 })).unwrap();
        }
        s.sync().unwrap();
        let before = segment_files(dir.path()).len();
        s.compact_prefix(300).unwrap();
        assert!(segment_files(dir.path()).len() < before);
        assert_eq!(s.first_index().unwrap(), 301);
        assert_eq!(s.term(300).unwrap(), 2);
        assert!(matches!(s.term(299), Err(Error::Compacted { index: 299, first_index: 301 })));
        assert!(matches!(s.entries(300, 302, u64::MAX), Err(Error::Compacted { .. })));
        assert_eq!(s.entries(301, 401, u64::MAX).unwrap().len(), 100);
    }
    let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (301, 400));
    assert_eq!(s.term(300).unwrap(), 2);
    assert_eq!(s.entries(301, 302, u64::MAX).unwrap()[0], Entry::new(301, 2, b"entry-301".to_vec()));
}

#[test]
fn compact_everything_then_keep_appending() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    s.append(&entries(1, 11, 3)).unwrap();
    s.compact_prefix(10).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap(), s.term(10).unwrap()), (11, 10, 3));
    assert!(s.append(&entries(11, 12, 2)).is_err(), "term went backwards");
    s.append(&entries(11, 12, 3)).unwrap();
    drop(s);
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (11, 11));
}

#[test]
fn reset_starts_the_log_after_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
        for i in 1..=200 {
            s.append(&entries(i, i + 1, 1)).unwrap();
        }
        s.reset(1000, 7).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap(), s.term(1000).unwrap()),
            (1001, 1000, 7)
        );
        s.append(&entries(1001, 1003, 7)).unwrap();
        s.sync().unwrap();
    }
    assert_eq!(segment_files(dir.path()), vec!["00000000000000001001.wal".to_string()]);
    let s = WalLogStore::open(dir.path(), small_segments()).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap(), s.term(1000).unwrap()), (1001, 1002, 7));
}

#[test]
fn bad_calls_are_rejected_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    s.append(&entries(1, 6, 2)).unwrap();
    assert!(matches!(s.append(&entries(7, 8, 2)), Err(Error::IndexOutOfRange { .. })));
    assert!(matches!(s.append(&entries(5, 6, 2)), Err(Error::IndexOutOfRange { .. })));
    assert!(matches!(
        s.append(&[Entry::new(6, 2, vec![]), Entry::new(8, 2, vec![])]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(s.append(&entries(6, 7, 1)), Err(Error::InvalidArgument(_))));
    assert!(matches!(s.term(6), Err(Error::IndexOutOfRange { .. })));
    assert!(matches!(s.entries(1, 7, u64::MAX), Err(Error::IndexOutOfRange { .. })));
    assert!(matches!(s.entries(3, 2, u64::MAX), Err(Error::InvalidArgument(_))));
    assert!(matches!(s.truncate_suffix(7), Err(Error::IndexOutOfRange { .. })));
    assert!(matches!(s.compact_prefix(6), Err(Error::IndexOutOfRange { .. })));
    assert_eq!(s.entries(1, 6, u64::MAX).unwrap(), entries(1, 6, 2));
}

#[test]
fn second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    let err = WalLogStore::open(dir.path(), WalOptions::default()).err().expect("must refuse");
    assert!(err.to_string().contains("already open"), "{err}");
}

#[test]
fn closed_store_refuses_work() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    s.close().unwrap();
    assert!(matches!(s.last_index(), Err(Error::Closed)));
    assert!(matches!(s.append(&entries(1, 2, 1)), Err(Error::Closed)));
}

#[test]
fn appends_proceed_while_another_thread_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(WalLogStore::open(dir.path(), WalOptions::default()).unwrap());
    let syncer = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut last = 0;
            for _ in 0..200 {
                let d = s.sync().unwrap();
                assert!(d >= last, "durable index went backwards");
                last = d;
            }
        })
    };
    for i in 1..=2000 {
        s.append(&entries(i, i + 1, 1)).unwrap();
    }
    syncer.join().unwrap();
    assert_eq!(s.sync().unwrap(), 2000);
}

#[test]
fn close_releases_the_directory_for_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    s.append(&entries(1, 3, 1)).unwrap();
    s.close().unwrap();
    let again = WalLogStore::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(again.last_index().unwrap(), 2);
    drop(s);
}
