//! Model check: random operation sequences give identical results on the WAL and the in-memory
//! engine, and the WAL gives them again after being closed and reopened at any point.

use dengine_core::log::{Entry, HardState, LogStore, MemLogStore, WalLogStore, WalOptions};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append { n: u8, term_bump: u8, len: u16 },
    Truncate { back: u8 },
    Compact { fwd: u8 },
    Reset { gap: u8 },
    HardState { term: u8, vote: Option<u8>, commit: u8 },
    Sync,
    Reopen,
    Read { from: u8, count: u8, budget: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..20, 0u8..2, 0u16..300).prop_map(|(n, term_bump, len)| Op::Append { n, term_bump, len }),
        2 => (0u8..10).prop_map(|back| Op::Truncate { back }),
        2 => (0u8..30).prop_map(|fwd| Op::Compact { fwd }),
        1 => (0u8..5).prop_map(|gap| Op::Reset { gap }),
        1 => (0u8..5, proptest::option::of(0u8..5), 0u8..50)
            .prop_map(|(term, vote, commit)| Op::HardState { term, vote, commit }),
        2 => Just(Op::Sync),
        2 => Just(Op::Reopen),
        3 => (0u8..60, 1u8..60, 0u16..2000).prop_map(|(from, count, budget)| Op::Read { from, count, budget }),
    ]
}

fn snapshot(s: &dyn LogStore) -> (u64, u64, Vec<Entry>, Vec<u64>, HardState) {
    let first = s.first_index().unwrap();
    let last = s.last_index().unwrap();
    let terms = (first - 1..=last).map(|i| s.term(i).unwrap()).collect();
    (first, last, s.entries(first, last + 1, u64::MAX).unwrap(), terms, s.hard_state().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_memory(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions { segment_bytes: 4096, preallocate: true };
        let mut wal = WalLogStore::open(dir.path(), opts.clone()).unwrap();
        let mem = MemLogStore::new();
        for op in ops {
            let last = mem.last_index().unwrap();
            let first = mem.first_index().unwrap();
            let last_term = mem.term(last).unwrap();
            match op {
                Op::Append { n, term_bump, len } => {
                    let batch: Vec<Entry> = (0..u64::from(n))
                        .map(|k| Entry::new(last + 1 + k, last_term.max(1) + u64::from(term_bump), vec![k as u8; usize::from(len)]))
                        .collect();
                    prop_assert_eq!(wal.append(&batch).is_ok(), mem.append(&batch).is_ok());
                }
                Op::Truncate { back } => {
                    let at = (last + 1).saturating_sub(u64::from(back)).max(first);
                    prop_assert_eq!(wal.truncate_suffix(at).is_ok(), mem.truncate_suffix(at).is_ok());
                }
                Op::Compact { fwd } => {
                    let at = (first - 1 + u64::from(fwd)).min(last);
                    prop_assert_eq!(wal.compact_prefix(at).is_ok(), mem.compact_prefix(at).is_ok());
                }
                Op::Reset { gap } => {
                    let at = last + u64::from(gap);
                    wal.reset(at, last_term + 1).unwrap();
                    mem.reset(at, last_term + 1).unwrap();
                }
                Op::HardState { term, vote, commit } => {
                    let hs = HardState { term: term.into(), vote: vote.map(u64::from), commit: commit.into() };
                    wal.save_hard_state(hs).unwrap();
                    mem.save_hard_state(hs).unwrap();
                }
                Op::Sync => {
                    prop_assert_eq!(wal.sync().unwrap(), mem.sync().unwrap());
                }
                Op::Reopen => {
                    wal.sync().unwrap();
                    drop(wal);
                    wal = WalLogStore::open(dir.path(), opts.clone()).unwrap();
                }
                Op::Read { from, count, budget } => {
                    // The WAL hands its records over as read (across segments, within the
                    // budget); the memory engine frames entries anew: the bytes must agree.
                    let lo = first + u64::from(from);
                    let hi = (lo + u64::from(count)).min(last + 1);
                    if lo < hi {
                        let budget = u64::from(budget);
                        let from_wal = wal.entry_batch(lo, hi, budget).unwrap();
                        let from_mem = mem.entry_batch(lo, hi, budget).unwrap();
                        prop_assert_eq!(from_wal.as_bytes(), from_mem.as_bytes());
                        prop_assert_eq!(from_wal.term_runs(), from_mem.term_runs());
                        let entries = wal.entries(lo, hi, budget).unwrap();
                        prop_assert!(!entries.is_empty());
                        prop_assert_eq!(from_wal.len(), entries.len());
                        prop_assert_eq!(from_wal.first_index(), lo);
                        let read: Vec<(u64, u64, Vec<u8>)> =
                            from_wal.iter().map(|(i, t, d)| (i, t, d.to_vec())).collect();
                        let want: Vec<(u64, u64, Vec<u8>)> =
                            entries.into_iter().map(|e| (e.index, e.term, e.data)).collect();
                        prop_assert_eq!(read, want);
                    }
                }
            }
            prop_assert_eq!(snapshot(&wal), snapshot(&mem));
        }
    }
}
