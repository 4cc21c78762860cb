//! The apply step of a follower in the embedded benchmark, alone and in Rust: session-wrapped
//! puts of 256-byte values into a store that grows by one key per put (`key-<w>-<i>` for 1,000
//! writers, as `benchmarks/bench_embedded.py` writes them), in committed batches of 500. Prints
//! the nanoseconds per entry for every 100,000 entries, so a change to the store or the session
//! table can be measured without a cluster's noise.
//!
//! Run: cargo run --release -p dengine-core --example apply_growing [-- ENTRIES [SNAPSHOT_EVERY [KEYS]]]
//!
//! With SNAPSHOT_EVERY, the store is frozen (cloned, as a snapshot freezes it) every that many
//! entries and the frozen view is kept for the next 25,000 entries, as a snapshot being written.
//! With KEYS, the puts go to keys spread over `key-000000` .. `key-<KEYS-1>` instead (the key
//! space of `bench_vs_etcd.py`), so that most of them replace a value.

use std::time::Instant;

use dengine_core::apply::apply_entries;
use dengine_core::kv::{command, Command, KvStore};
use dengine_core::sessions::{SessionTable, SESSION_KIND};

const WRITERS: u64 = 1000;
const BATCH: usize = 500;
const SNAPSHOT_HELD: u64 = 25_000;

fn payload(n: u64, keys: u64) -> Vec<u8> {
    let key = match keys {
        0 => format!("key-{}-{}", n % WRITERS, (n / WRITERS) % 1000),
        keys => format!("key-{:06}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys),
    };
    let put = command::encode(&Command::Put { key: key.as_bytes(), value: &[b'v'; 256], prev: false })
        .expect("a valid put");
    let mut out = vec![SESSION_KIND];
    for field in [7, n + 1, (n + 1).saturating_sub(WRITERS).max(1)] {
        out.extend_from_slice(&u64::to_le_bytes(field));
    }
    out.extend_from_slice(&put);
    out
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().expect("a number"));
    let entries = args.next().unwrap_or(1_000_000);
    let snapshot_every = args.next().unwrap_or(0);
    let keys = args.next().unwrap_or(0);
    let log: Vec<Vec<u8>> = (0..entries).map(|n| payload(n, keys)).collect();
    let mut table = SessionTable::new(100_000, 10_000_000, 100_000).expect("valid limits");
    let mut store = KvStore::new(10_000);
    let mut answered = Vec::new();
    let mut frozen: Option<(u64, KvStore)> = None;
    let mut chunk_start = Instant::now();
    let mut total = 0.0;
    for (b, batch) in log.chunks(BATCH).enumerate() {
        let first = (b * BATCH) as u64;
        if snapshot_every > 0 && first.is_multiple_of(snapshot_every) && first > 0 {
            frozen = Some((first, store.clone()));
        }
        if frozen.as_ref().is_some_and(|(at, _)| first >= at + SNAPSHOT_HELD) {
            frozen = None;
        }
        let entries = batch.iter().enumerate().map(|(i, p)| (first + i as u64 + 1, p.as_slice()));
        answered.clear();
        let stopped = apply_entries(&mut table, &mut store, entries, |_, _| true, &mut answered);
        assert!(stopped.is_none());
        let done = first + batch.len() as u64;
        if done.is_multiple_of(100_000) {
            let took = chunk_start.elapsed().as_secs_f64();
            total += took;
            println!("{done:>9} entries: {:6.0} ns/entry", took * 1e9 / 100_000.0);
            chunk_start = Instant::now();
        }
    }
    println!(
        "mean: {:.0} ns/entry over {entries} entries ({} keys)",
        total * 1e9 / entries as f64,
        store.len()
    );
}
