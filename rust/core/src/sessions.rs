//! Exactly-once application of client writes (Raft thesis §6.3): the session table.
//!
//! A client that retries a write after a timeout cannot know whether the first attempt
//! committed, so every write carries `(client id, sequence)`. Each replica keeps, per client, the
//! results of the sequences the client may still retry: a retry gets the stored result without
//! the command running again, and a sequence the client already acknowledged is refused as
//! stale. The table is part of the replicated state (snapshots carry it), and every eviction
//! depends only on log indexes, so it is identical on every replica.
//!
//! `dengine.raft.sessions` documents the rules for Python users; this module is their one
//! implementation.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// The first byte of a session command's envelope.
pub const SESSION_KIND: u8 = 2;
/// Envelope head of a session command: kind u8, client id u64, sequence u64, first outstanding u64.
pub const SESSION_HEADER_LEN: usize = 25;

/// A session command's envelope, read from the head of an entry's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionHeader {
    /// The client's id.
    pub client: u64,
    /// The write's sequence number within the client's session.
    pub sequence: u64,
    /// The client's lowest sequence still awaiting an answer (0: unknown).
    pub first_outstanding: u64,
}

impl SessionHeader {
    /// Reads the header of `payload` if it is a session command, else `None`.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        if payload.len() < SESSION_HEADER_LEN || payload[0] != SESSION_KIND {
            return None;
        }
        let u64_at = |pos: usize| u64::from_le_bytes(payload[pos..pos + 8].try_into().expect("eight bytes"));
        Some(Self { client: u64_at(1), sequence: u64_at(9), first_outstanding: u64_at(17) })
    }
}

/// What a command produced: its result, or the error it raised (a failed command is remembered
/// too, so a retry gets the same error).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    /// What the state machine returned, if it returned something.
    pub result: Option<Vec<u8>>,
    /// Why the command failed, if it did.
    pub error: Option<String>,
}

/// How a sequence stands in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen<'a> {
    /// Never applied, not refused: run it.
    New,
    /// Applied before: answer with its stored outcome.
    Duplicate(&'a Stored),
    /// Below what the client acknowledged: refuse it.
    Stale,
}

#[derive(Debug, Clone)]
struct Session {
    // By increasing sequence. A client's sequences mostly reach the log in order, so a new one
    // goes at the back and the lowest leave from the front, with no hashing or heap on the path
    // every write takes; a retried or reordered one is placed by binary search, and moves the
    // shorter side of the deque (a client that reorders a window of n sequences pays O(n) per
    // write; a BTreeMap, O(log n), cost 10-20% more on the ordered path, measured with
    // `examples/apply_growing.rs`).
    results: VecDeque<(u64, Stored)>,
    // Sequences below this were acknowledged by the client: a late copy of one is stale.
    acked_below: u64,
    last_index: u64,
    // Position in the activity order (see `SessionTable::by_activity`).
    stamp: u64,
}

impl Session {
    fn find(&self, sequence: u64) -> Result<usize, usize> {
        match self.results.back() {
            Some((last, _)) if *last < sequence => Err(self.results.len()),
            _ => self.results.binary_search_by_key(&sequence, |(q, _)| *q),
        }
    }

    fn store(&mut self, sequence: u64, outcome: Stored) {
        match self.find(sequence) {
            Ok(at) => self.results[at].1 = outcome,
            Err(at) => self.results.insert(at, (sequence, outcome)),
        }
    }
}

/// One client's row as a snapshot stores it: client, acked below, last index, and the stored
/// outcomes by increasing sequence.
pub type SessionRow = (u64, u64, u64, Vec<(u64, Stored)>);

/// Per-client results of recently applied sequences, bounded and expired deterministically.
///
/// `max_results` caps what one client can pin: its lowest sequences go first, and are refused as
/// stale from then on, like acknowledged ones (their outcome is unknown to a late copy, which
/// must not run again). When more than
/// `max_clients` clients are known, the most idle one is forgotten, and so is any client idle for
/// more than `expire_after` log entries. A forgotten client's late retry would run again, so the
/// limits should comfortably exceed any client's retry window.
#[derive(Debug, Clone)]
pub struct SessionTable {
    max_clients: usize,
    expire_after: u64,
    max_results: usize,
    sessions: HashMap<u64, Session>,
    // Clients by last activity, most idle first.
    by_activity: BTreeMap<u64, u64>,
    next_stamp: u64,
}

impl SessionTable {
    /// An empty table; every limit must be positive.
    pub fn new(max_clients: usize, expire_after: u64, max_results: usize) -> crate::Result<Self> {
        if max_clients == 0 || expire_after == 0 || max_results == 0 {
            return Err(crate::Error::InvalidArgument(
                "max_clients, expire_after and max_results must be positive".into(),
            ));
        }
        Ok(Self {
            max_clients,
            expire_after,
            max_results,
            sessions: HashMap::new(),
            by_activity: BTreeMap::new(),
            next_stamp: 0,
        })
    }

    /// Most clients kept.
    pub fn max_clients(&self) -> usize {
        self.max_clients
    }

    /// Log entries after which an idle client is forgotten.
    pub fn expire_after(&self) -> u64 {
        self.expire_after
    }

    /// Most results kept for one client.
    pub fn max_results(&self) -> usize {
        self.max_results
    }

    /// The number of clients known.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no client is known.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// How `sequence` of `client` stands.
    pub fn lookup(&self, client: u64, sequence: u64) -> Seen<'_> {
        match self.sessions.get(&client) {
            None => Seen::New,
            Some(s) => match s.find(sequence) {
                Ok(at) => Seen::Duplicate(&s.results[at].1),
                Err(_) if sequence < s.acked_below => Seen::Stale,
                Err(_) => Seen::New,
            },
        }
    }

    /// Remembers the outcome of `sequence`, applied at log `index`, and applies the limits.
    pub fn record(
        &mut self,
        client: u64,
        sequence: u64,
        index: u64,
        outcome: Stored,
        first_outstanding: u64,
    ) {
        let most_recent = self.by_activity.last_key_value().map(|(_, c)| *c);
        let stamp = self.next_stamp;
        let s = match self.sessions.get_mut(&client) {
            // Already the most recently active client: its place in the order stays right.
            Some(s) if most_recent == Some(client) => s,
            Some(s) => {
                self.by_activity.remove(&s.stamp);
                s
            }
            None => self.sessions.entry(client).or_insert_with(|| Session {
                results: VecDeque::new(),
                acked_below: 0,
                last_index: index,
                stamp,
            }),
        };
        if most_recent != Some(client) {
            self.next_stamp += 1;
            s.stamp = stamp;
            self.by_activity.insert(stamp, client);
        }
        s.last_index = index;
        s.store(sequence, outcome);
        if first_outstanding > s.acked_below {
            s.acked_below = first_outstanding;
            while s.results.front().is_some_and(|(q, _)| *q < first_outstanding) {
                s.results.pop_front();
            }
        }
        while s.results.len() > self.max_results {
            // A sequence whose result is dropped must not look new: a late copy of it (a
            // retry, a copy re-proposed after a leader change) would run a second time.
            if let Some((dropped, _)) = s.results.pop_front() {
                s.acked_below = s.acked_below.max(dropped + 1);
            }
        }
        self.expire(index);
    }

    /// Forgets the most idle clients while there are too many, or while the most idle one has
    /// been idle for more than `expire_after` entries at `index`.
    fn expire(&mut self, index: u64) {
        while let Some((&stamp, &client)) = self.by_activity.first_key_value() {
            let idle = index.saturating_sub(self.sessions[&client].last_index);
            if self.sessions.len() <= self.max_clients && idle <= self.expire_after {
                break;
            }
            self.by_activity.remove(&stamp);
            self.sessions.remove(&client);
        }
    }

    /// Every client's row, most idle first, for a snapshot.
    pub fn rows(&self) -> Vec<SessionRow> {
        self.by_activity
            .values()
            .map(|client| {
                let s = &self.sessions[client];
                (*client, s.acked_below, s.last_index, s.results.iter().cloned().collect())
            })
            .collect()
    }

    /// Replaces the whole table with `rows` (most idle first, as [`rows`](Self::rows) gives them).
    pub fn restore(&mut self, rows: Vec<SessionRow>) {
        self.sessions.clear();
        self.by_activity.clear();
        self.next_stamp = 0;
        for (client, acked_below, last_index, results) in rows {
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            let mut session =
                Session { results: VecDeque::with_capacity(results.len()), acked_below, last_index, stamp };
            for (sequence, outcome) in results {
                session.store(sequence, outcome);
            }
            if let Some(old) = self.sessions.insert(client, session) {
                self.by_activity.remove(&old.stamp);
            }
            self.by_activity.insert(stamp, client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(n: u8) -> Stored {
        Stored { result: Some(vec![n]), error: None }
    }

    #[test]
    fn a_retry_is_a_duplicate_and_an_acknowledged_sequence_is_stale() {
        let mut t = SessionTable::new(10, 100, 10).unwrap();
        assert_eq!(t.lookup(7, 1), Seen::New);
        t.record(7, 1, 1, ok(1), 0);
        assert_eq!(t.lookup(7, 1), Seen::Duplicate(&ok(1)));
        t.record(7, 3, 2, ok(3), 3);
        assert_eq!(t.lookup(7, 1), Seen::Stale, "dropped below first outstanding");
        assert_eq!(t.lookup(7, 2), Seen::Stale);
        assert_eq!(t.lookup(7, 4), Seen::New);
    }

    #[test]
    fn limits_evict_the_most_idle_and_the_lowest_sequences() {
        let mut t = SessionTable::new(2, 5, 2).unwrap();
        t.record(1, 1, 1, ok(1), 0);
        t.record(2, 1, 2, ok(1), 0);
        t.record(1, 2, 3, ok(2), 0); // client 1 is now the most recent
        t.record(3, 1, 4, ok(1), 0); // three clients: the most idle (2) goes
        assert_eq!(t.rows().iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 3]);
        t.record(1, 3, 5, ok(3), 0); // client 1 keeps two results: sequence 1 goes
        assert_eq!(t.lookup(1, 1), Seen::Stale, "a dropped result must not let its command run again");
        assert_eq!(t.lookup(1, 2), Seen::Duplicate(&ok(2)));
        t.record(1, 4, 10, ok(4), 0); // client 3 idle for 6 > 5 entries: expired
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn rows_round_trip_in_activity_order() {
        let mut t = SessionTable::new(10, 100, 10).unwrap();
        t.record(5, 2, 1, Stored { result: None, error: Some("boom".into()) }, 0);
        t.record(9, 1, 2, ok(1), 0);
        t.record(5, 1, 3, ok(1), 1);
        let rows = t.rows();
        assert_eq!(rows[0].0, 9);
        assert_eq!(rows[1].3.iter().map(|(q, _)| *q).collect::<Vec<_>>(), vec![1, 2]);
        let mut back = SessionTable::new(10, 100, 10).unwrap();
        back.restore(rows.clone());
        assert_eq!(back.rows(), rows);
        back.record(9, 2, 4, ok(2), 0);
        assert_eq!(back.rows()[0].0, 5, "restored activity order is kept");
    }

    #[test]
    fn late_and_repeated_sequences_keep_their_place() {
        let mut t = SessionTable::new(10, 100, 3).unwrap();
        for (sequence, index) in [(5, 1), (3, 2), (4, 3)] {
            t.record(7, sequence, index, ok(sequence as u8), 0);
        }
        t.record(7, 4, 4, ok(40), 0); // a retry that ran again replaces the stored outcome
        assert_eq!(t.lookup(7, 3), Seen::Duplicate(&ok(3)));
        assert_eq!(t.lookup(7, 4), Seen::Duplicate(&ok(40)));
        t.record(7, 2, 5, ok(2), 0); // over max_results: the lowest goes, though it came last
        assert_eq!(t.lookup(7, 2), Seen::Stale, "its outcome is gone: a late copy must not run");
        assert_eq!(t.lookup(7, 1), Seen::Stale);
        assert_eq!(t.rows()[0].3.iter().map(|(q, _)| *q).collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    /// The table's rules written the plainest way: clients in activity order, most idle first,
    /// each with its outcomes by sequence.
    #[derive(Default)]
    struct Model {
        clients: Vec<(u64, u64, u64, BTreeMap<u64, Stored>)>,
    }

    impl Model {
        fn record(&mut self, limits: (usize, u64, usize), op: (u64, u64, u64, u64)) {
            let (max_clients, expire_after, max_results) = limits;
            let (client, sequence, index, first_outstanding) = op;
            let at = self.clients.iter().position(|c| c.0 == client);
            let mut c = at.map_or((client, 0, index, BTreeMap::new()), |at| self.clients.remove(at));
            c.2 = index;
            c.3.insert(sequence, ok(sequence as u8));
            if first_outstanding > c.1 {
                c.1 = first_outstanding;
                c.3.retain(|q, _| *q >= first_outstanding);
            }
            while c.3.len() > max_results {
                if let Some((dropped, _)) = c.3.pop_first() {
                    c.1 = c.1.max(dropped + 1);
                }
            }
            self.clients.push(c);
            while self.clients.len() > max_clients
                || self.clients.first().is_some_and(|c| index.saturating_sub(c.2) > expire_after)
            {
                self.clients.remove(0);
            }
        }

        fn rows(&self) -> Vec<SessionRow> {
            let row = |c: &(u64, u64, u64, BTreeMap<u64, Stored>)| {
                (c.0, c.1, c.2, c.3.iter().map(|(q, o)| (*q, o.clone())).collect())
            };
            self.clients.iter().map(row).collect()
        }
    }

    proptest::proptest! {
        #[test]
        fn the_table_follows_its_rules(
            ops in proptest::collection::vec((0u64..4, 0u64..24, 0u64..8), 1..120),
            restore_at in 0usize..120,
        ) {
            let limits = (3, 12, 5);
            let mut table = SessionTable::new(limits.0, limits.1, limits.2).unwrap();
            let mut model = Model::default();
            for (i, (client, sequence, behind)) in ops.into_iter().enumerate() {
                let index = i as u64 + 1;
                let first_outstanding = sequence.saturating_sub(behind);
                table.record(client, sequence, index, ok(sequence as u8), first_outstanding);
                model.record(limits, (client, sequence, index, first_outstanding));
                proptest::prop_assert_eq!(table.rows(), model.rows());
                if i == restore_at {
                    let mut back = SessionTable::new(limits.0, limits.1, limits.2).unwrap();
                    back.restore(table.rows());
                    table = back;
                }
            }
        }
    }

    #[test]
    fn session_headers_are_read_from_payload_heads() {
        let mut payload = vec![SESSION_KIND];
        for n in [7u64, 9, 3] {
            payload.extend_from_slice(&n.to_le_bytes());
        }
        payload.extend_from_slice(b"cmd");
        assert_eq!(
            SessionHeader::parse(&payload),
            Some(SessionHeader { client: 7, sequence: 9, first_outstanding: 3 })
        );
        assert_eq!(SessionHeader::parse(&payload[..24]), None);
        assert_eq!(SessionHeader::parse(b"\x01cmd"), None);
    }
}
