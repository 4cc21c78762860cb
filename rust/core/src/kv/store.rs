//! [`KvStore`]: keys in byte order with etcd-style revisions and a bounded watch history.

use std::collections::VecDeque;
use std::ops::Bound;
use std::sync::Arc;

use imbl::OrdMap;

use super::command::{self, Command};
use super::{Key, Record};

/// One change to one key: `kv` is the key after a put (`None` for a delete), `prev` the key
/// before the change (`None` when a put created it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The key that changed.
    pub key: Key,
    /// The key's record after a put; `None` for a delete.
    pub kv: Option<Record>,
    /// The key's record before the change; `None` when a put created the key.
    pub prev: Option<Record>,
    /// The store revision of the command that made the change.
    pub revision: u64,
}

/// Why [`KvStore::apply`] refused to run a command: a bug in the caller, not bad command bytes
/// (those are answered with an error result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexNotAfter {
    /// The index the caller passed.
    pub index: u64,
    /// The store's last applied index.
    pub last_applied: u64,
}

impl std::fmt::Display for IndexNotAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "index {} is not after last_applied {}: entries must be applied once each, in increasing index order",
            self.index, self.last_applied
        )
    }
}

/// The store. Revisions work like etcd's: `revision` grows by one per command that changes
/// state, and every key carries its create and mod revisions and its version.
#[derive(Debug, Clone, Default)]
pub struct KvStore {
    pub(super) map: OrdMap<Key, Record>,
    pub(super) revision: u64,
    pub(super) last_applied: u64,
    // The bounded history, whose newest `latest` events are those of the latest apply: each
    // event is made and dropped once.
    history: VecDeque<Event>,
    history_limit: usize,
    latest: usize,
    // The latest apply's events when it made more than the history keeps (a large delete-range,
    // or a store with no history), so that subscribers still get them all.
    latest_overflow: Vec<Event>,
    compacted: u64,
    restores: u64,
}

impl KvStore {
    /// An empty store at revision 0 that keeps up to `history_limit` watch events.
    pub fn new(history_limit: usize) -> Self {
        Self { history_limit, ..Self::default() }
    }

    /// The number of state-changing commands applied so far.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The log index of the last applied command (0 if none).
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }

    /// Events after this revision are in the history; older ones were dropped.
    pub fn compacted_revision(&self) -> u64 {
        self.compacted
    }

    /// How many times a snapshot replaced the state.
    pub fn restores(&self) -> u64 {
        self.restores
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The record of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&Record> {
        self.map.get(key)
    }

    /// The keys starting with `prefix` in byte order, at most `limit` of them.
    pub fn range(&self, prefix: &[u8], limit: Option<usize>) -> Vec<(Key, Record)> {
        self.prefixed(prefix).take(limit.unwrap_or(usize::MAX)).map(|(k, r)| (k.clone(), r.clone())).collect()
    }

    fn prefixed<'a>(&'a self, prefix: &'a [u8]) -> impl Iterator<Item = (&'a Key, &'a Record)> + 'a {
        self.map
            .range::<_, [u8]>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The events of the latest [`apply`](Self::apply), in order (none if it changed nothing).
    pub fn latest_events(&self) -> impl Iterator<Item = &Event> {
        let kept = if self.latest_overflow.is_empty() { self.latest } else { 0 };
        self.latest_overflow.iter().chain(self.history.range(self.history.len() - kept..))
    }

    /// The retained events with a revision above `revision`, oldest first; `Err` with the
    /// compacted revision when some of them were already dropped.
    pub fn events_since(&self, revision: u64) -> Result<Vec<Event>, u64> {
        if revision < self.compacted {
            return Err(self.compacted);
        }
        let newer = self.history.iter().rev().take_while(|e| e.revision > revision).count();
        Ok(self.history.iter().skip(self.history.len() - newer).cloned().collect())
    }

    /// What [`apply`](Self::apply) would answer for `data` at store revision `revision`, and
    /// the revision after it, for a command whose answer does not depend on the keys: a put that
    /// does not ask for the key it replaces, or bytes that do not parse. `None` for any other
    /// command. This lets a batch of such commands be answered before the map is walked (see
    /// `crate::apply::answer_blind_run`).
    pub fn blind_result(revision: u64, data: &[u8]) -> Option<(Vec<u8>, u64)> {
        match command::parse(data) {
            Err(message) => Some((command::encode_error(revision, &message), revision)),
            Ok(Command::Put { prev: false, .. }) => {
                Some((command::encode_result(true, revision + 1, None, 0), revision + 1))
            }
            Ok(_) => None,
        }
    }

    /// Applies the committed `command` at log `index` and returns the encoded result.
    ///
    /// Malformed bytes change nothing but `last_applied` and are answered with an error result,
    /// the same on every replica. An `index` not above `last_applied` changes nothing at all.
    pub fn apply(&mut self, index: u64, data: &[u8]) -> Result<Vec<u8>, IndexNotAfter> {
        if index <= self.last_applied {
            return Err(IndexNotAfter { index, last_applied: self.last_applied });
        }
        self.last_applied = index;
        self.latest = 0;
        self.latest_overflow.clear();
        let command = match command::parse(data) {
            Ok(command) => command,
            Err(message) => return Ok(command::encode_error(self.revision, &message)),
        };
        let result = match command {
            Command::Put { key, value, prev: wanted } => {
                let prev = self.put(key, value);
                let prev = prev.as_ref().filter(|_| wanted).map(|p| (key, p));
                let result = command::encode_result(true, self.revision, prev, 0);
                self.publish();
                result
            }
            Command::Delete { key } => {
                let Some((key, prev)) = self.map.remove_with_key(key) else {
                    return Ok(command::encode_result(false, self.revision, None, 0));
                };
                self.revision += 1;
                let result = command::encode_result(true, self.revision, Some((&key, &prev)), 1);
                self.record(Event { key, kv: None, prev: Some(prev), revision: self.revision });
                self.publish();
                result
            }
            Command::Cas { key, expected, value } => {
                let current = self.map.get(key);
                let matches = match (expected, current) {
                    (None, current) => current.is_none(),
                    (Some(expected), Some(current)) => *current.value == *expected,
                    (Some(_), None) => false,
                };
                if !matches {
                    // A failed swap reports the current key so the client can retry without a read.
                    return Ok(command::encode_result(false, self.revision, current.map(|c| (key, c)), 0));
                }
                let prev = self.put(key, value);
                let result = command::encode_result(true, self.revision, prev.as_ref().map(|p| (key, p)), 0);
                self.publish();
                result
            }
            Command::DeleteRange { prefix } => {
                let victims: Vec<(Key, Record)> =
                    self.prefixed(prefix).map(|(k, r)| (k.clone(), r.clone())).collect();
                if victims.is_empty() {
                    return Ok(command::encode_result(true, self.revision, None, 0));
                }
                self.revision += 1;
                let deleted = victims.len() as u64;
                for (key, prev) in victims {
                    self.delete(key, prev);
                }
                self.publish();
                command::encode_result(true, self.revision, None, deleted)
            }
        };
        Ok(result)
    }

    /// Stores `key` at the next revision; returns the previous record.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Option<Record> {
        self.revision += 1;
        let revision = self.revision;
        let value: Arc<[u8]> = Arc::from(value);
        let key = Key::from(key);
        // An existing key is changed where it is found: one walk down the tree, not two.
        if let Some((k, record)) = self.map.get_key_value_mut(&key) {
            let next = Record {
                value,
                create_revision: record.create_revision,
                mod_revision: revision,
                version: record.version + 1,
            };
            let prev = std::mem::replace(record, next.clone());
            let event = Event { key: k.clone(), kv: Some(next), prev: Some(prev.clone()), revision };
            self.record(event);
            return Some(prev);
        }
        let record = Record { value, create_revision: revision, mod_revision: revision, version: 1 };
        self.record(Event { key: key.clone(), kv: Some(record.clone()), prev: None, revision });
        self.map.insert(key, record);
        None
    }

    /// Removes `key` at the current revision (already incremented by the caller).
    fn delete(&mut self, key: Key, prev: Record) {
        self.map.remove(&*key);
        self.record(Event { key, kv: None, prev: Some(prev), revision: self.revision });
    }

    fn record(&mut self, event: Event) {
        self.history.push_back(event);
        self.latest += 1;
    }

    /// Bounds the history, once the latest apply's events are in it.
    fn publish(&mut self) {
        if self.latest > self.history_limit {
            let from = self.history.len() - self.latest;
            self.latest_overflow.extend(self.history.range(from..).cloned());
        }
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.revision;
            }
        }
    }

    /// Replaces the state with one read from a snapshot: the history is emptied and starts at
    /// the snapshot's revision. Returns the replaced state, for the caller to free where a
    /// drop of a whole tree (tens of milliseconds) holds up nobody.
    #[must_use = "the replaced state is freed wherever it is dropped"]
    pub fn install(&mut self, restored: super::snapshot::Restored) -> Replaced {
        let replaced = Replaced { _map: std::mem::replace(&mut self.map, restored.map) };
        self.revision = restored.revision;
        self.last_applied = restored.last_applied;
        self.history.clear();
        self.latest = 0;
        self.latest_overflow.clear();
        self.compacted = restored.revision;
        self.restores += 1;
        replaced
    }
}

/// The state a [`KvStore::install`] replaced, freed when dropped.
pub struct Replaced {
    _map: OrdMap<Key, Record>,
}
