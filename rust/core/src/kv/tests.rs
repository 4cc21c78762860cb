//! Scenario tests of the KV store: commands, revisions, history, and snapshots that survive
//! concurrent applies and refuse every damaged byte.

use super::command::{parse, Command};
use super::snapshot::{bytes_repr, SnapshotPieces, SnapshotReader};
use super::store::KvStore;
use super::Record;

fn field(data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

fn put(key: &[u8], value: &[u8]) -> Vec<u8> {
    [vec![1, 1], field(key), field(value)].concat()
}

fn put_prev(key: &[u8], value: &[u8]) -> Vec<u8> {
    [vec![1, 5], field(key), field(value)].concat()
}

fn delete(key: &[u8]) -> Vec<u8> {
    [vec![1, 2], field(key)].concat()
}

fn cas(key: &[u8], expected: Option<&[u8]>, value: &[u8]) -> Vec<u8> {
    let flag = match expected {
        None => vec![0],
        Some(e) => [vec![1], field(e)].concat(),
    };
    [vec![1, 3], field(key), flag, field(value)].concat()
}

fn delete_range(prefix: &[u8]) -> Vec<u8> {
    [vec![1, 4], field(prefix)].concat()
}

/// (flags, revision, deleted) of an encoded result.
fn head(result: &[u8]) -> (u8, u64, u64) {
    let rev = u64::from_le_bytes(result[2..10].try_into().unwrap());
    let deleted = u64::from_le_bytes(result[10..18].try_into().unwrap());
    (result[1], rev, deleted)
}

struct Log {
    store: KvStore,
    index: u64,
}

impl Log {
    fn new(history: usize) -> Self {
        Self { store: KvStore::new(history), index: 0 }
    }

    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        self.index += 1;
        self.store.apply(self.index, command).expect("index increases")
    }
}

fn snapshot(store: &KvStore, piece: usize) -> Vec<u8> {
    let mut pieces = SnapshotPieces::new(store);
    let mut out = Vec::new();
    while let Some(p) = pieces.next_piece(piece) {
        out.extend_from_slice(&p);
    }
    out
}

fn restore(data: &[u8], feed: usize) -> Result<KvStore, String> {
    let mut reader = SnapshotReader::new();
    for piece in data.chunks(feed.max(1)) {
        reader.feed(piece).map_err(|e| e.to_string())?;
    }
    let mut store = KvStore::new(10);
    drop(store.install(reader.finish().map_err(|e| e.to_string())?));
    Ok(store)
}

#[test]
fn commands_parse_and_malformed_ones_say_why() {
    assert_eq!(parse(&put(b"k", b"v")).unwrap(), Command::Put { key: b"k", value: b"v", prev: false });
    assert_eq!(parse(&put_prev(b"k", b"v")).unwrap(), Command::Put { key: b"k", value: b"v", prev: true });
    assert_eq!(
        parse(&cas(b"k", Some(b""), b"v")).unwrap(),
        Command::Cas { key: b"k", expected: Some(b""), value: b"v" }
    );
    assert_eq!(parse(&delete_range(b"")).unwrap(), Command::DeleteRange { prefix: b"" });
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "command truncated: 0 bytes"),
        (vec![2, 1], "unsupported command format version 2"),
        (vec![1, 9], "unknown command op 9"),
        ([put(b"k", b"v"), vec![0]].concat(), "PUT command has 1 trailing bytes after byte 12"),
        ([put_prev(b"k", b"v"), vec![0]].concat(), "PUT_PREV command has 1 trailing bytes after byte 12"),
        (vec![1, 6], "unknown command op 6; known ops are 1 to 5"),
        ([vec![1, 2], field(b"")].concat(), "DELETE command: key must not be empty"),
        ([vec![1, 2], (u32::MAX).to_le_bytes().to_vec()].concat(), "key is 4294967295 bytes"),
        ([vec![1, 3], field(b"k")].concat(), "has_expected flag is missing"),
        ([vec![1, 3], field(b"k"), vec![2]].concat(), "has_expected flag is 2"),
        ([vec![1, 4], vec![3, 0, 0, 0], b"p".to_vec()].concat(), "the prefix needs 3 bytes, 1 remain"),
    ];
    for (data, message) in cases {
        let err = parse(&data).unwrap_err();
        assert!(err.contains(message), "{err:?} should contain {message:?}");
    }
    let whole = put(b"key", b"value");
    for cut in 2..whole.len() {
        assert!(parse(&whole[..cut]).unwrap_err().contains("truncated"), "cut at {cut}");
    }
}

#[test]
fn encoding_checks_limits_and_parses_back() {
    use super::command::encode;
    let commands = [
        Command::Put { key: b"k", value: b"", prev: false },
        Command::Put { key: b"k", value: b"v", prev: true },
        Command::Delete { key: b"k" },
        Command::Cas { key: b"k", expected: None, value: b"v" },
        Command::Cas { key: b"k", expected: Some(b""), value: b"v" },
        Command::DeleteRange { prefix: b"" },
    ];
    for command in commands {
        assert_eq!(parse(&encode(&command).unwrap()).unwrap(), command);
    }
    assert_eq!(encode(&Command::Put { key: b"k", value: b"v", prev: false }).unwrap(), put(b"k", b"v"));
    assert_eq!(encode(&Command::Put { key: b"k", value: b"v", prev: true }).unwrap(), put_prev(b"k", b"v"));
    assert_eq!(encode(&Command::Delete { key: b"" }).unwrap_err(), "key must not be empty");
    let big = vec![0; super::MAX_KEY_SIZE + 1];
    assert_eq!(
        encode(&Command::DeleteRange { prefix: &big }).unwrap_err(),
        "prefix is 65537 bytes, over the 65536-byte limit"
    );
}

#[test]
fn revisions_versions_and_results_follow_etcd() {
    let mut log = Log::new(100);
    assert_eq!(head(&log.apply(&put(b"a", b"1"))), (0x01, 1, 0));
    let second = log.apply(&put_prev(b"a", b"2"));
    assert_eq!(head(&second), (0x03, 2, 0), "a put asking for it reports the previous key");
    let a = log.store.get(b"a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version, &*a.value), (1, 2, 2, &b"2"[..]));
    // A failed cas reports the current key and changes nothing.
    assert_eq!(head(&log.apply(&cas(b"a", Some(b"x"), b"3"))), (0x02, 2, 0));
    assert_eq!(head(&log.apply(&cas(b"a", Some(b"2"), b"3"))), (0x03, 3, 0));
    assert_eq!(head(&log.apply(&cas(b"b", None, b"new"))), (0x01, 4, 0));
    assert_eq!(head(&log.apply(&delete(b"missing"))), (0x00, 4, 0));
    assert_eq!(head(&log.apply(&delete(b"b"))), (0x03, 5, 1));
    // Delete and put again: the key starts afresh.
    log.apply(&put(b"b", b"again"));
    let b = log.store.get(b"b").unwrap();
    assert_eq!((b.create_revision, b.version), (6, 1));
    log.apply(&put(b"ab", b""));
    assert_eq!(head(&log.apply(&delete_range(b"a"))), (0x01, 8, 2), "one revision for the range");
    assert_eq!(head(&log.apply(&delete_range(b"zz"))), (0x01, 8, 0));
    assert_eq!(log.store.len(), 1);
    assert_eq!(head(&log.apply(&put(b"b", b"plain"))), (0x01, 9, 0), "a plain put leaves it out");
    assert_eq!(head(&log.apply(&put_prev(b"new", b""))), (0x01, 10, 0), "a new key has none");
    // Malformed commands advance last_applied only.
    let error = log.apply(&[1, 9]);
    assert_eq!(head(&error).0, 0x04);
    assert_eq!((log.store.revision(), log.store.last_applied()), (10, log.index));
    assert_eq!(log.store.latest_events().count(), 0);
    let err = log.store.apply(log.index, &put(b"z", b"")).unwrap_err();
    assert_eq!((err.index, err.last_applied), (log.index, log.index));
}

#[test]
fn inline_and_shared_keys_order_as_their_bytes() {
    use super::{Key, INLINE_KEY};
    assert_eq!(std::mem::size_of::<Key>(), 24);
    let long = vec![b'a'; INLINE_KEY + 1];
    let keys = [&b""[..], b"a", &long[..INLINE_KEY], &long, b"b", b"\xff"];
    for a in keys {
        for b in keys {
            assert_eq!(Key::from(a).cmp(&Key::from(b)), a.cmp(b), "{a:?} vs {b:?}");
        }
        assert_eq!(&*Key::from(a), a);
    }
    assert!(matches!(Key::from(&long[..INLINE_KEY]), Key::Inline { .. }));
    assert!(matches!(Key::from(&long[..]), Key::Shared(_)));
}

/// Key bytes up to past the inline limit, zero bytes as likely as all others together.
fn key_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..30)
}

proptest::proptest! {
    // Inline keys compare as zero-padded words and then by length: keys with zero bytes, keys
    // that are prefixes of others, and keys either side of the inline limit must still order
    // as their bytes, or the tree would misplace them.
    #[test]
    fn any_two_keys_order_as_their_bytes(a in key_bytes(), b in key_bytes()) {
        use super::Key;
        proptest::prop_assert_eq!(Key::from(&a[..]).cmp(&Key::from(&b[..])), a.cmp(&b));
        let c: Vec<u8> = a.iter().copied().chain([0]).collect();
        proptest::prop_assert_eq!(Key::from(&a[..]).cmp(&Key::from(&c[..])), std::cmp::Ordering::Less);
    }
}

#[test]
fn ranges_are_prefixed_ordered_and_limited() {
    let mut log = Log::new(0);
    for key in [&b"b"[..], b"a\xff", b"a", b"ab", b"\x00", b"a\x00"] {
        log.apply(&put(key, b"v"));
    }
    let keys = |prefix: &[u8], limit| -> Vec<Vec<u8>> {
        log.store.range(prefix, limit).into_iter().map(|(k, _)| k.to_vec()).collect()
    };
    assert_eq!(keys(b"a", None), vec![b"a".to_vec(), b"a\x00".to_vec(), b"ab".to_vec(), b"a\xff".to_vec()]);
    assert_eq!(keys(b"", Some(2)), vec![b"\x00".to_vec(), b"a".to_vec()]);
    assert_eq!(keys(b"c", None), Vec::<Vec<u8>>::new());
}

#[test]
fn the_history_is_bounded_and_reports_compaction() {
    let mut log = Log::new(3);
    for n in 0..5u8 {
        log.apply(&put(&[b'k', n], b"v"));
    }
    assert_eq!(log.store.compacted_revision(), 2);
    assert_eq!(log.store.events_since(1), Err(2));
    let events = log.store.events_since(2).unwrap();
    assert_eq!(events.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert!(log.store.events_since(5).unwrap().is_empty());
    log.apply(&delete_range(b"k"));
    // All five deletes share revision 6; dropping part of it compacts revision 6 itself.
    assert_eq!(log.store.compacted_revision(), 6);
    assert_eq!(log.store.latest_events().count(), 5);
    let deleted = log.store.latest_events().next().unwrap();
    assert!(deleted.kv.is_none() && deleted.prev.as_ref().unwrap().mod_revision == 1);
}

#[test]
fn snapshots_round_trip_in_any_pieces() {
    let mut log = Log::new(10);
    for n in 0..500u32 {
        // Every third key is longer than an inline key, so both kinds go through snapshots.
        let key = if n % 3 == 0 {
            format!("a-much-longer-key-than-fits-inline-{n:05}")
        } else {
            format!("key-{n:05}")
        };
        log.apply(&put(key.as_bytes(), &vec![b'x'; (n % 40) as usize]));
    }
    log.apply(&delete_range(b"key-001"));
    log.apply(&delete_range(b"a-much-longer-key-than-fits-inline-002"));
    let whole = snapshot(&log.store, 1 << 20);
    for piece in [1, 37, 4096] {
        assert_eq!(snapshot(&log.store, piece), whole, "piece size {piece}");
    }
    for feed in [1, 5, 33, 100_000] {
        let back = restore(&whole, feed).unwrap();
        assert_eq!(back.revision(), log.store.revision());
        assert_eq!(back.last_applied(), log.index);
        assert_eq!(back.compacted_revision(), log.store.revision());
        assert_eq!(back.range(b"", None), log.store.range(b"", None));
        assert_eq!(snapshot(&back, 1 << 20), whole);
    }
    let empty = snapshot(&KvStore::new(0), 10);
    assert_eq!(empty.len(), 40);
    assert!(restore(&empty, 3).unwrap().is_empty());
}

#[test]
fn a_frozen_view_ignores_later_applies() {
    let mut log = Log::new(10);
    for n in 0..2000u32 {
        log.apply(&put(format!("k{n}").as_bytes(), b"before"));
    }
    let expected = snapshot(&log.store, 1 << 20);
    let mut pieces = SnapshotPieces::new(&log.store);
    let mut written = pieces.next_piece(1000).unwrap();
    for n in 0..2000u32 {
        let key = format!("k{n}");
        log.apply(&if n % 3 == 0 { delete(key.as_bytes()) } else { put(key.as_bytes(), b"after") });
    }
    log.apply(&put(b"a-new-key", b"x"));
    while let Some(p) = pieces.next_piece(1000) {
        written.extend_from_slice(&p);
    }
    assert_eq!(written, expected);
    assert_eq!((pieces.revision(), pieces.last_applied()), (2000, 2000));
}

#[test]
fn every_truncation_and_bit_flip_is_refused() {
    let mut log = Log::new(0);
    log.apply(&put(b"alpha", b"1"));
    log.apply(&put(b"beta", b"two"));
    let data = snapshot(&log.store, 1 << 20);
    for cut in 0..data.len() {
        let err = restore(&data[..cut], 7).unwrap_err();
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
    for pos in 0..data.len() {
        let mut bad = data.clone();
        bad[pos] ^= 1 << (pos % 8);
        assert!(restore(&bad, 5).is_err(), "flip at {pos}");
    }
    let err = restore(&[data.clone(), vec![0]].concat(), 1000).unwrap_err();
    assert!(err.contains("trailing bytes after its CRC at byte"), "{err}");
}

#[test]
fn invalid_entries_are_named_with_their_offset() {
    fn entry(key: &[u8], create: u64, modr: u64, version: u64) -> Vec<u8> {
        let record =
            Record { value: b"".as_slice().into(), create_revision: create, mod_revision: modr, version };
        let mut out = Vec::new();
        super::command::encode_key_value(&mut out, key, &record);
        out
    }
    fn header(count: u64) -> Vec<u8> {
        [
            &b"DNGKVSN\x00"[..],
            &1u32.to_le_bytes(),
            &5u64.to_le_bytes(),
            &9u64.to_le_bytes(),
            &count.to_le_bytes(),
        ]
        .concat()
    }
    let cases = [
        (
            [header(2), entry(b"b", 1, 1, 1), entry(b"a", 2, 2, 1)].concat(),
            "entry 1 at byte 69: keys are not",
        ),
        ([header(1), entry(b"a", 1, 6, 1)].concat(), "entry 0 at byte 36: inconsistent revisions"),
        ([header(1), entry(b"a", 2, 3, 3)].concat(), "inconsistent revisions (create 2, mod 3, version 3"),
        ([header(1), entry(b"", 1, 1, 1)].concat(), "key length 0 out of range"),
    ];
    for (data, message) in cases {
        let err = restore(&data, 1000).unwrap_err();
        assert!(err.contains(message), "{err:?} should contain {message:?}");
    }
    let mut wrong = header(0);
    wrong[..8].copy_from_slice(b"NOTASNAP");
    assert_eq!(
        restore(&wrong, 100).unwrap_err(),
        "not a dengine KV snapshot: magic is b'NOTASNAP', expected b'DNGKVSN\\x00'"
    );
    assert_eq!(bytes_repr(b"it's\\"), "b\"it's\\\\\"");
}

#[test]
fn a_snapshot_lets_go_of_its_frozen_view_at_its_last_piece_or_when_released() {
    // The view pins every value the live store replaced since the freeze. Freeing them all can
    // take tens of milliseconds, so it falls to the thread writing the snapshot (the last piece,
    // or `release` when it stops early), not to whichever thread drops the pieces afterwards.
    let mut log = Log::new(0);
    log.apply(&put(b"k", b"first"));
    for release_early in [false, true] {
        let held = log.store.get(b"k").expect("k is stored").value.clone();
        let mut pieces = SnapshotPieces::new(&log.store);
        log.apply(&put(b"k", b"next"));
        log.apply(&put(b"other", b"value"));
        assert_eq!(std::sync::Arc::strong_count(&held), 2, "the view alone keeps the replaced value");
        if release_early {
            assert!(pieces.next_piece(1).is_some(), "the header and a first entry");
            pieces.release();
        } else {
            while pieces.next_piece(1).is_some() {}
        }
        assert_eq!(std::sync::Arc::strong_count(&held), 1, "let go before the pieces are dropped");
        assert!(pieces.next_piece(1).is_none(), "nothing comes after");
        drop(pieces);
    }
}
