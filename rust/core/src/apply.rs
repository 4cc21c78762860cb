//! Committed entries applied to the built-in KV store through the session table, with no Python
//! anywhere: the loop a node runs on a thread of its own, beside its event loop.
//!
//! Each entry's payload starts with its kind (`dengine.raft.payload.Kind`): a no-op changes
//! nothing, a plain command runs on the store, a session command runs once per
//! `(client, sequence)` (a retry gets the stored outcome, an acknowledged sequence is stale). Any
//! other kind (a membership change, an envelope this loop does not know) stops the loop, so the
//! caller can handle that entry its own way and go on after it.

use crate::kv::KvStore;
use crate::sessions::{Seen, SessionHeader, SessionTable, Stored, SESSION_HEADER_LEN, SESSION_KIND};

/// The first byte of a no-op entry (a new leader's first entry).
pub const NOOP_KIND: u8 = 0;
/// The first byte of a command proposed without a session.
pub const COMMAND_KIND: u8 = 1;

/// How a session command was answered. The values are `dengine.raft.sessions.Outcome`'s codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Run now, for the first time.
    Applied = 0,
    /// Run before: the stored outcome answers it.
    Duplicate = 1,
    /// Below what its client acknowledged: refused.
    Stale = 2,
}

/// The answer to one session command, for whoever waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The client that proposed it.
    pub client: u64,
    /// Its sequence in the client's session.
    pub sequence: u64,
    /// How it was answered.
    pub outcome: Outcome,
    /// Its result or error.
    pub stored: Stored,
    /// Its log index.
    pub index: u64,
}

/// Runs `command` at `index` on the store; a refused index becomes the command's error, in the
/// words `KvStore.apply`'s `ValueError` uses.
pub fn run_on_store(store: &mut KvStore, index: u64, command: &[u8]) -> Stored {
    match store.apply(index, command) {
        Ok(result) => Stored { result: Some(result), error: None },
        Err(refused) => Stored { result: None, error: Some(format!("ValueError: {refused}")) },
    }
}

/// Applies `(index, payload)` entries in order until one of a kind this loop leaves to its caller;
/// returns that entry's position, or `None` when every entry was applied.
///
/// `wants(client, sequence)` says whether someone waits for a session command's answer; those
/// answers go to `answered`, in log order.
pub fn apply_entries<'a>(
    table: &mut SessionTable,
    store: &mut KvStore,
    entries: impl IntoIterator<Item = (u64, &'a [u8])>,
    mut wants: impl FnMut(u64, u64) -> bool,
    answered: &mut Vec<Answer>,
) -> Option<usize> {
    for (position, (index, data)) in entries.into_iter().enumerate() {
        let applied = match data.first() {
            Some(&SESSION_KIND) => session_step(table, index, data, &mut wants, answered, |command| {
                Some(run_on_store(store, index, command))
            }),
            Some(&COMMAND_KIND) => {
                run_on_store(store, index, &data[1..]);
                true
            }
            Some(&NOOP_KIND) => true,
            _ => false,
        };
        if !applied {
            return Some(position);
        }
    }
    None
}

/// The first half of applying a batch whose leading commands' answers do not depend on the
/// store's keys (puts that do not ask for the key they replace, the usual write): answers and
/// records them in the session table from the store's revision alone, without walking the map,
/// so that the callers waiting for them can be answered while the map is updated.
///
/// Takes entries from the front of `entries` while it can (any other command, an entry of a kind
/// [`apply_entries`] leaves to its caller, or an index the store would refuse ends the run) and
/// returns how many it took. The commands among them that change the store go to `run`, in
/// order, for [`run_blind`]: until that is done the answers and the table are ahead of the
/// store, so the caller keeps everyone else from reading the store until then, and applies
/// nothing else in between. The remaining entries go through [`apply_entries`] as usual.
pub fn answer_blind_run<'a>(
    table: &mut SessionTable,
    store: &KvStore,
    entries: impl IntoIterator<Item = (u64, &'a [u8])>,
    mut wants: impl FnMut(u64, u64) -> bool,
    answered: &mut Vec<Answer>,
    run: &mut Vec<(u64, &'a [u8])>,
) -> usize {
    let (mut revision, mut last) = (store.revision(), store.last_applied());
    let mut taken = 0;
    for (index, data) in entries {
        // The store's next revision if `command` is blind and its index one the store takes.
        let mut predict = |command: &'a [u8]| {
            if index <= last {
                return None;
            }
            let (result, next) = KvStore::blind_result(revision, command)?;
            (revision, last) = (next, index);
            run.push((index, command));
            Some(result)
        };
        let taken_here = match data.first() {
            Some(&SESSION_KIND) => session_step(table, index, data, &mut wants, answered, |command| {
                predict(command).map(|result| Stored { result: Some(result), error: None })
            }),
            Some(&COMMAND_KIND) => predict(&data[1..]).is_some(),
            Some(&NOOP_KIND) => true,
            _ => false,
        };
        if !taken_here {
            break;
        }
        taken += 1;
    }
    taken
}

/// The second half of [`answer_blind_run`]: runs its commands on the store. Their results are
/// those already answered.
pub fn run_blind(store: &mut KvStore, run: &[(u64, &[u8])]) {
    for &(index, command) in run {
        let expected = cfg!(debug_assertions).then(|| KvStore::blind_result(store.revision(), command));
        let stored = run_on_store(store, index, command);
        if let Some(expected) = expected {
            assert_eq!(
                stored.result,
                expected.map(|(result, _)| result),
                "a blind result must not depend on the store"
            );
        }
    }
}

/// One session command at `index`: a new one is run by `run_new` (whose `None` declines it: the
/// entry is left as it was and this returns false), its answer recorded and, if wanted, kept; a
/// retry gets the stored outcome and an acknowledged sequence is stale, neither running again.
/// False also for a damaged envelope.
fn session_step<'d>(
    table: &mut SessionTable,
    index: u64,
    data: &'d [u8],
    wants: &mut impl FnMut(u64, u64) -> bool,
    answered: &mut Vec<Answer>,
    run_new: impl FnOnce(&'d [u8]) -> Option<Stored>,
) -> bool {
    let Some(h) = SessionHeader::parse(data) else { return false };
    let answer = |outcome, stored| Answer { client: h.client, sequence: h.sequence, outcome, stored, index };
    match table.lookup(h.client, h.sequence) {
        Seen::New => {
            let Some(stored) = run_new(&data[SESSION_HEADER_LEN..]) else { return false };
            if wants(h.client, h.sequence) {
                answered.push(answer(Outcome::Applied, stored.clone()));
            }
            table.record(h.client, h.sequence, index, stored, h.first_outstanding);
        }
        Seen::Duplicate(stored) => {
            if wants(h.client, h.sequence) {
                answered.push(answer(Outcome::Duplicate, stored.clone()));
            }
        }
        Seen::Stale => {
            if wants(h.client, h.sequence) {
                let error = stale_error(h.sequence);
                answered.push(answer(Outcome::Stale, Stored { result: None, error: Some(error) }));
            }
        }
    }
    true
}

/// The error a stale session command is answered with.
pub fn stale_error(sequence: u64) -> String {
    format!("sequence {sequence} was already acknowledged by its client")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::command::{encode, Command};

    fn session(client: u64, sequence: u64, first_outstanding: u64, command: &[u8]) -> Vec<u8> {
        let mut p = vec![SESSION_KIND];
        for v in [client, sequence, first_outstanding] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(command);
        p
    }

    fn put(key: &[u8]) -> Vec<u8> {
        encode(&Command::Put { key, value: b"v", prev: false }).unwrap()
    }

    fn fresh() -> (SessionTable, KvStore) {
        (SessionTable::new(100, 1_000_000, 1000).unwrap(), KvStore::new(100))
    }

    #[test]
    fn a_retried_session_command_runs_once_and_is_answered_with_its_first_result() {
        let (mut table, mut store) = fresh();
        let first = session(7, 1, 1, &put(b"a"));
        let entries = [(1, &first[..]), (2, &first[..])];
        let mut answered = Vec::new();
        assert_eq!(apply_entries(&mut table, &mut store, entries, |_, _| true, &mut answered), None);
        assert_eq!(store.revision(), 1, "the retry must not run again");
        assert_eq!(answered.len(), 2);
        assert_eq!((answered[0].outcome, answered[1].outcome), (Outcome::Applied, Outcome::Duplicate));
        assert_eq!(answered[0].stored, answered[1].stored);
        assert_eq!(store.last_applied(), 1);
    }

    #[test]
    fn an_acknowledged_sequence_is_stale_and_changes_nothing() {
        let (mut table, mut store) = fresh();
        let (one, two) = (session(7, 1, 1, &put(b"a")), session(7, 2, 2, &put(b"b")));
        let late = session(7, 1, 1, &put(b"a"));
        let mut answered = Vec::new();
        apply_entries(
            &mut table,
            &mut store,
            [(1, &one[..]), (2, &two[..]), (3, &late[..])],
            |_, _| true,
            &mut answered,
        );
        assert_eq!(answered[2].outcome, Outcome::Stale);
        assert_eq!(
            answered[2].stored.error.as_deref(),
            Some("sequence 1 was already acknowledged by its client")
        );
        assert_eq!(store.revision(), 2);
    }

    #[test]
    fn only_the_wanted_answers_are_kept_but_every_command_runs_and_is_recorded() {
        let (mut table, mut store) = fresh();
        let payloads: Vec<Vec<u8>> =
            (1..=4).map(|s| session(9, s, 1, &put(format!("k{s}").as_bytes()))).collect();
        let mut answered = Vec::new();
        let entries = payloads.iter().enumerate().map(|(i, p)| (i as u64 + 1, &p[..]));
        apply_entries(&mut table, &mut store, entries, |_, sequence| sequence % 2 == 0, &mut answered);
        assert_eq!(answered.iter().map(|a| (a.sequence, a.index)).collect::<Vec<_>>(), [(2, 2), (4, 4)]);
        assert_eq!(store.len(), 4);
        assert!(matches!(table.lookup(9, 1), Seen::Duplicate(_)), "an unwanted answer is still recorded");
    }

    #[test]
    fn no_ops_and_plain_commands_apply_and_other_kinds_stop_the_loop_where_they_are() {
        let (mut table, mut store) = fresh();
        let noop = [NOOP_KIND];
        let mut plain = vec![COMMAND_KIND];
        plain.extend_from_slice(&put(b"p"));
        let membership = [3u8, 1, 2, 3];
        let after = session(1, 1, 1, &put(b"q"));
        let entries = [(1, &noop[..]), (2, &plain[..]), (3, &membership[..]), (4, &after[..])];
        let mut answered = Vec::new();
        assert_eq!(apply_entries(&mut table, &mut store, entries, |_, _| true, &mut answered), Some(2));
        assert_eq!(store.get(b"p").map(|r| r.mod_revision), Some(1));
        assert!(store.get(b"q").is_none(), "nothing after the stop runs");
        assert!(answered.is_empty());
    }

    #[test]
    fn a_damaged_session_envelope_stops_the_loop_too() {
        let (mut table, mut store) = fresh();
        let short = [SESSION_KIND, 1, 2];
        assert_eq!(
            apply_entries(&mut table, &mut store, [(1, &short[..])], |_, _| true, &mut Vec::new()),
            Some(0)
        );
    }

    #[test]
    fn a_refused_index_is_the_commands_error_in_the_words_of_kv_store_apply() {
        let (mut table, mut store) = fresh();
        let one = session(7, 1, 1, &put(b"a"));
        let two = session(7, 2, 1, &put(b"b"));
        let mut answered = Vec::new();
        apply_entries(&mut table, &mut store, [(5, &one[..]), (5, &two[..])], |_, _| true, &mut answered);
        assert_eq!(
            answered[1].stored.error.as_deref(),
            Some(
                "ValueError: index 5 is not after last_applied 5: entries must be applied once each, \
                 in increasing index order"
            )
        );
    }

    /// Applies `entries` with [`answer_blind_run`] and [`run_blind`] first, then the rest as
    /// usual, the way the node's apply thread does; returns how many the blind run took.
    fn in_two_halves(
        table: &mut SessionTable,
        store: &mut KvStore,
        entries: &[(u64, &[u8])],
        answered: &mut Vec<Answer>,
    ) -> usize {
        let mut run = Vec::new();
        let taken = answer_blind_run(table, store, entries.iter().copied(), |_, _| true, answered, &mut run);
        run_blind(store, &run);
        apply_entries(table, store, entries[taken..].iter().copied(), |_, _| true, answered);
        taken
    }

    /// Everything a store holds that applying changes: revision, last index, keys and records.
    type Contents = (u64, u64, Vec<(crate::kv::Key, crate::kv::Record)>);

    fn contents(store: &KvStore) -> Contents {
        (store.revision(), store.last_applied(), store.range(b"", None))
    }

    #[test]
    fn answering_a_blind_run_first_gives_the_answers_and_the_store_of_applying_in_order() {
        let mut plain = vec![COMMAND_KIND];
        plain.extend_from_slice(&put(b"plain"));
        let with_prev = encode(&Command::Put { key: b"a", value: b"w", prev: true }).unwrap();
        let delete = encode(&Command::Delete { key: b"b" }).unwrap();
        let payloads = [
            session(7, 1, 1, &put(b"a")),
            session(7, 2, 1, &put(b"b")),
            session(7, 1, 1, &put(b"a")), // a retry: the stored outcome
            vec![NOOP_KIND],
            plain,
            session(8, 1, 1, b"\x01"), // bytes that do not parse: an error result
            session(7, 3, 3, &put(b"a")),
            session(7, 1, 1, &put(b"a")), // acknowledged by now: stale
            session(7, 4, 3, &with_prev), // needs the store: the blind run ends here
            session(7, 5, 3, &delete),
            session(7, 6, 3, &put(b"c")),
        ];
        let entries: Vec<(u64, &[u8])> =
            payloads.iter().enumerate().map(|(i, p)| (i as u64 + 1, &p[..])).collect();

        let (mut table, mut store) = fresh();
        let mut in_order = Vec::new();
        assert_eq!(
            apply_entries(&mut table, &mut store, entries.iter().copied(), |_, _| true, &mut in_order),
            None
        );
        let (mut table2, mut store2) = fresh();
        let mut halves = Vec::new();
        assert_eq!(in_two_halves(&mut table2, &mut store2, &entries, &mut halves), 8);
        assert_eq!(halves, in_order);
        assert_eq!(contents(&store2), contents(&store));
        for sequence in 1..=6 {
            assert_eq!(table2.lookup(7, sequence), table.lookup(7, sequence));
        }
    }

    #[test]
    fn a_blind_run_answers_and_records_before_the_store_changes() {
        let (mut table, store) = fresh();
        let (one, two) = (session(7, 1, 1, &put(b"a")), session(7, 2, 1, &put(b"a")));
        let (mut answered, mut run) = (Vec::new(), Vec::new());
        let entries = [(1, &one[..]), (2, &two[..])];
        assert_eq!(answer_blind_run(&mut table, &store, entries, |_, _| true, &mut answered, &mut run), 2);
        assert_eq!((store.revision(), store.len()), (0, 0), "the store is only changed by run_blind");
        assert!(matches!(table.lookup(7, 2), Seen::Duplicate(_)), "the outcome is recorded already");
        let results: Vec<_> = answered.iter().map(|a| a.stored.result.clone().unwrap()).collect();
        let expected: Vec<_> =
            [1, 2].map(|revision| crate::kv::command::encode_result(true, revision, None, 0)).into();
        assert_eq!(results, expected);
        assert_eq!(run, [(1, &put(b"a")[..]), (2, &put(b"a")[..])]);
    }

    #[test]
    fn an_index_the_store_would_refuse_ends_the_blind_run() {
        let (mut table, mut store) = fresh();
        let first = session(7, 1, 1, &put(b"a"));
        apply_entries(&mut table, &mut store, [(5, &first[..])], |_, _| true, &mut Vec::new());
        let again = session(7, 2, 1, &put(b"b"));
        let (mut answered, mut run) = (Vec::new(), Vec::new());
        let taken =
            answer_blind_run(&mut table, &store, [(5, &again[..])], |_, _| true, &mut answered, &mut run);
        assert_eq!(
            (taken, answered.len(), run.len()),
            (0, 0, 0),
            "left to apply_entries, which answers the error"
        );
        assert_eq!(table.lookup(7, 2), Seen::New);
    }
}
