//! Quorum arithmetic: which log index is committed, and who won an election.
//!
//! This is a tiny leaf module on purpose. The Raft protocol layer decides *what* to count (only
//! durable acknowledgements, only votes of the current term); this module only decides whether a
//! set of answers forms a majority. Keeping the arithmetic here, apart from the protocol, makes it
//! easy to prove correct in isolation and cheap to call on every acknowledgement.
//!
//! Learners never count towards a quorum. They are simply absent from the voter sets, so an
//! acknowledgement or vote reported for a learner id is never looked up.
//!
//! Answers are supplied as lookup closures (`node id -> Option<answer>`) rather than maps, so a
//! caller can keep progress in whatever structure suits it and nothing is copied to ask a question.

/// The outcome of counting votes in an election (or any other yes/no poll of the voters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VoteResult {
    /// Not decided yet: the missing votes could still tip it either way, so keep waiting.
    Pending,
    /// A majority can no longer be reached even if every missing voter says yes; a candidate
    /// should give up instead of waiting for the election timeout.
    Lost,
    /// A majority said yes; a candidate becomes leader.
    Won,
}

/// Voters below this count are tallied in a stack buffer, so the per-acknowledgement commit check
/// does not allocate for any realistic cluster (Raft clusters have 3, 5 or 7 voters).
const STACK_VOTERS: usize = 16;

/// A set of voters of which a simple majority decides.
///
/// The ids are kept sorted and deduplicated, so two configurations with the same members compare
/// equal whatever order they were given in, and membership tests are a binary search.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MajorityConfig {
    voters: Vec<u64>,
}

impl MajorityConfig {
    /// Builds a configuration from voter ids in any order; duplicates are dropped because a node
    /// votes once however often it is listed.
    pub fn new<I: IntoIterator<Item = u64>>(ids: I) -> Self {
        let mut voters: Vec<u64> = ids.into_iter().collect();
        voters.sort_unstable();
        voters.dedup();
        Self { voters }
    }

    /// The voter ids, sorted ascending, so callers can iterate deterministically.
    pub fn voters(&self) -> &[u64] {
        &self.voters
    }

    /// The number of distinct voters.
    pub fn len(&self) -> usize {
        self.voters.len()
    }

    /// True when there are no voters: the "no constraint" half of a non-joint configuration.
    pub fn is_empty(&self) -> bool {
        self.voters.is_empty()
    }

    /// Whether `id` is a voter here; learners and unknown nodes are not.
    pub fn contains(&self, id: u64) -> bool {
        self.voters.binary_search(&id).is_ok()
    }

    /// How many voters make a majority: `n / 2 + 1`, so any two majorities overlap in at least one
    /// voter (the overlap is what makes Raft safe). An empty configuration needs nobody and
    /// returns 0.
    pub fn quorum(&self) -> usize {
        if self.voters.is_empty() {
            0
        } else {
            self.voters.len() / 2 + 1
        }
    }

    /// The highest log index that a majority of voters has acknowledged.
    ///
    /// `acked(id)` returns the highest index known durable on voter `id`; `None` counts as 0
    /// (nothing acknowledged yet). The acknowledged indexes are sorted ascending and the one at
    /// position `n - quorum` is returned: it and everything to its right (`quorum` voters) are at
    /// least that high, and no higher value has that many.
    ///
    /// An empty configuration returns `u64::MAX`, the identity of `min`: that way the empty
    /// outgoing half of a non-joint [`JointConfig`] never constrains the incoming half.
    pub fn committed_index(&self, mut acked: impl FnMut(u64) -> Option<u64>) -> u64 {
        let n = self.voters.len();
        if n == 0 {
            return u64::MAX;
        }
        let mut stack = [0u64; STACK_VOTERS];
        let mut heap = Vec::new();
        let slots: &mut [u64] = if n <= STACK_VOTERS {
            &mut stack[..n]
        } else {
            heap.resize(n, 0);
            &mut heap
        };
        for (slot, &id) in slots.iter_mut().zip(&self.voters) {
            *slot = acked(id).unwrap_or(0);
        }
        slots.sort_unstable();
        slots[n - self.quorum()]
    }

    /// Counts the voters' answers: `votes(id)` is `Some(true)` for yes, `Some(false)` for no and
    /// `None` for not heard from yet.
    ///
    /// Won once yes votes reach the quorum; Pending while yes plus missing could still reach it;
    /// Lost otherwise. An empty configuration is Won, so that the empty outgoing half of a
    /// non-joint [`JointConfig`] never blocks the incoming half.
    pub fn vote_result(&self, mut votes: impl FnMut(u64) -> Option<bool>) -> VoteResult {
        let quorum = self.quorum();
        let (mut yes, mut missing) = (0usize, 0usize);
        for &id in &self.voters {
            match votes(id) {
                Some(true) => yes += 1,
                Some(false) => {}
                None => missing += 1,
            }
        }
        if yes >= quorum {
            VoteResult::Won
        } else if yes + missing >= quorum {
            VoteResult::Pending
        } else {
            VoteResult::Lost
        }
    }
}

impl FromIterator<u64> for MajorityConfig {
    fn from_iter<I: IntoIterator<Item = u64>>(ids: I) -> Self {
        Self::new(ids)
    }
}

/// A configuration during a membership change (Raft §6 joint consensus): every decision needs a
/// majority of the incoming voters *and* a majority of the outgoing voters, so neither the old
/// nor the new cluster can decide alone while the change is in flight.
///
/// A configuration that is not changing is a `JointConfig` with an empty `outgoing` half; the
/// empty half never constrains anything, so one type serves both cases and callers never branch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct JointConfig {
    /// The voters of the configuration being moved to (or the only configuration).
    pub incoming: MajorityConfig,
    /// The voters of the configuration being left; empty when no change is in progress.
    pub outgoing: MajorityConfig,
}

impl JointConfig {
    /// A joint configuration of the two halves.
    pub fn new(incoming: MajorityConfig, outgoing: MajorityConfig) -> Self {
        Self { incoming, outgoing }
    }

    /// A plain (non-joint) configuration: `incoming` alone decides.
    pub fn simple(incoming: MajorityConfig) -> Self {
        Self::new(incoming, MajorityConfig::default())
    }

    /// True while a membership change is in progress (the outgoing half has voters).
    pub fn is_joint(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Whether `id` votes in either half; such a node must be replicated to and asked for votes.
    pub fn contains(&self, id: u64) -> bool {
        self.incoming.contains(id) || self.outgoing.contains(id)
    }

    /// Every voter of either half, sorted ascending and deduplicated (a node in both halves is
    /// listed once, because it is one node to send messages to).
    pub fn voters(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.incoming.voters().to_vec();
        all.extend_from_slice(self.outgoing.voters());
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The highest index committed in both halves: the smaller of the two majority indexes.
    ///
    /// See [`MajorityConfig::committed_index`] for `acked`. If both halves are empty the result is
    /// `u64::MAX`; a caller with no voters at all has a bug and should check first.
    pub fn committed_index(&self, mut acked: impl FnMut(u64) -> Option<u64>) -> u64 {
        let incoming = self.incoming.committed_index(&mut acked);
        let outgoing = self.outgoing.committed_index(&mut acked);
        incoming.min(outgoing)
    }

    /// Won only if both halves won; Lost as soon as either half lost (it can never recover);
    /// Pending otherwise. See [`MajorityConfig::vote_result`] for `votes`.
    pub fn vote_result(&self, mut votes: impl FnMut(u64) -> Option<bool>) -> VoteResult {
        let incoming = self.incoming.vote_result(&mut votes);
        let outgoing = self.outgoing.vote_result(&mut votes);
        match (incoming, outgoing) {
            (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
            (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
            _ => VoteResult::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn majority(ids: &[u64]) -> MajorityConfig {
        ids.iter().copied().collect()
    }

    fn lookup<V: Copy>(map: &HashMap<u64, V>) -> impl FnMut(u64) -> Option<V> + '_ {
        move |id| map.get(&id).copied()
    }

    fn acks(pairs: &[(u64, u64)]) -> HashMap<u64, u64> {
        pairs.iter().copied().collect()
    }

    fn votes(pairs: &[(u64, bool)]) -> HashMap<u64, bool> {
        pairs.iter().copied().collect()
    }

    // ---- construction -------------------------------------------------------------------------

    #[test]
    fn voters_are_sorted_and_deduplicated() {
        let c = majority(&[5, 1, 3, 1, 5]);
        assert_eq!(c.voters(), &[1, 3, 5]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.quorum(), 2);
        assert!(c.contains(3));
        assert!(!c.contains(2));
        assert_eq!(c, majority(&[3, 5, 1]));
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        let expected = [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4), (9, 5)];
        for (n, q) in expected {
            assert_eq!(majority(&(1..=n).collect::<Vec<_>>()).quorum(), q as usize, "n={n}");
        }
    }

    // ---- committed index, majority ------------------------------------------------------------

    /// Voters 1..=n with distinct acks, so returning the neighbour of the right slot (an
    /// off-by-one) always gives a different answer.
    fn distinct_acks(n: u64) -> (MajorityConfig, HashMap<u64, u64>) {
        let cfg = majority(&(1..=n).collect::<Vec<_>>());
        // A rotation of 10, 20, ..., 10n: not in id order, so the result depends on sorting.
        let map = (1..=n).map(|id| (id, ((id + n / 2) % n + 1) * 10)).collect();
        (cfg, map)
    }

    #[test]
    fn committed_index_takes_the_quorum_th_largest_ack() {
        // n -> the quorum-th largest of {10, 20, ..., 10n}.
        for (n, expected) in [(1, 10), (2, 10), (3, 20), (4, 20), (5, 30), (7, 40), (9, 50)] {
            let (cfg, map) = distinct_acks(n);
            assert_eq!(cfg.committed_index(lookup(&map)), expected, "n={n}");
        }
    }

    #[test]
    fn committed_index_single_voter_is_its_own_ack() {
        let c = majority(&[1]);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 42)]))), 42);
        assert_eq!(c.committed_index(lookup(&acks(&[]))), 0);
    }

    #[test]
    fn committed_index_two_voters_need_both() {
        let c = majority(&[1, 2]);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10), (2, 5)]))), 5);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10)]))), 0);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10), (2, 10)]))), 10);
    }

    #[test]
    fn committed_index_three_voters() {
        let c = majority(&[1, 2, 3]);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10), (2, 8), (3, 2)]))), 8);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10)]))), 0);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10), (3, 4)]))), 4);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 7), (2, 7), (3, 7)]))), 7);
    }

    #[test]
    fn committed_index_four_voters_need_three() {
        let c = majority(&[1, 2, 3, 4]);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10), (2, 10), (3, 5), (4, 1)]))), 5);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10), (2, 10)]))), 0);
        assert_eq!(c.committed_index(lookup(&acks(&[(1, 10), (2, 10), (3, 10)]))), 10);
    }

    #[test]
    fn committed_index_five_voters() {
        let c = majority(&[1, 2, 3, 4, 5]);
        let m = acks(&[(1, 9), (2, 9), (3, 3), (4, 3), (5, 1)]);
        assert_eq!(c.committed_index(lookup(&m)), 3);
        let m = acks(&[(1, 9), (2, 9), (3, 9)]);
        assert_eq!(c.committed_index(lookup(&m)), 9);
        let m = acks(&[(1, 9), (2, 9)]);
        assert_eq!(c.committed_index(lookup(&m)), 0);
    }

    #[test]
    fn committed_index_seven_voters() {
        let c = majority(&[10, 20, 30, 40, 50, 60, 70]);
        let m = acks(&[(10, 100), (20, 90), (30, 80), (40, 70), (50, 60), (60, 50), (70, 40)]);
        assert_eq!(c.committed_index(lookup(&m)), 70);
        // Three down: the remaining four are still a majority.
        let m = acks(&[(10, 5), (20, 6), (30, 7), (40, 8)]);
        assert_eq!(c.committed_index(lookup(&m)), 5);
    }

    #[test]
    fn committed_index_larger_than_stack_buffer() {
        let n = STACK_VOTERS as u64 + 5; // 21 voters, quorum 11
        let cfg = majority(&(1..=n).collect::<Vec<_>>());
        let map: HashMap<u64, u64> = (1..=n).map(|id| (id, id * 10)).collect();
        // Values 10..=210; the 11th largest is 110.
        assert_eq!(cfg.committed_index(lookup(&map)), 110);
    }

    #[test]
    fn empty_majority_is_unconstrained() {
        let c = MajorityConfig::default();
        assert_eq!(c.committed_index(|_| Some(3)), u64::MAX);
        assert_eq!(c.vote_result(|_| Some(false)), VoteResult::Won);
    }

    #[test]
    fn learner_acks_are_ignored() {
        let c = majority(&[1, 2, 3]);
        // Learners 4 and 5 are far ahead; only voter 1 has anything.
        let m = acks(&[(1, 10), (4, 100), (5, 100)]);
        assert_eq!(c.committed_index(lookup(&m)), 0);
        let j = JointConfig::new(majority(&[1, 2, 3]), majority(&[1, 2, 6]));
        assert_eq!(j.committed_index(lookup(&m)), 0);
    }

    #[test]
    fn acked_is_only_asked_about_voters() {
        let c = JointConfig::new(majority(&[1, 2, 3]), majority(&[3, 4]));
        let mut asked = Vec::new();
        c.committed_index(|id| {
            asked.push(id);
            None
        });
        asked.sort_unstable();
        assert_eq!(asked, vec![1, 2, 3, 3, 4]);
    }

    // ---- votes, majority ----------------------------------------------------------------------

    #[test]
    fn votes_one_voter() {
        let c = majority(&[1]);
        assert_eq!(c.vote_result(lookup(&votes(&[]))), VoteResult::Pending);
        assert_eq!(c.vote_result(lookup(&votes(&[(1, true)]))), VoteResult::Won);
        assert_eq!(c.vote_result(lookup(&votes(&[(1, false)]))), VoteResult::Lost);
    }

    #[test]
    fn votes_two_voters_need_both() {
        let c = majority(&[1, 2]);
        assert_eq!(c.vote_result(lookup(&votes(&[(1, true)]))), VoteResult::Pending);
        assert_eq!(c.vote_result(lookup(&votes(&[(1, true), (2, false)]))), VoteResult::Lost);
        assert_eq!(c.vote_result(lookup(&votes(&[(1, true), (2, true)]))), VoteResult::Won);
    }

    #[test]
    fn votes_three_voters() {
        let c = majority(&[1, 2, 3]);
        assert_eq!(c.vote_result(lookup(&votes(&[(1, true)]))), VoteResult::Pending);
        assert_eq!(c.vote_result(lookup(&votes(&[(1, true), (2, true)]))), VoteResult::Won);
        let m = votes(&[(1, true), (2, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Pending);
        let m = votes(&[(1, true), (2, false), (3, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Lost);
        assert_eq!(c.vote_result(lookup(&votes(&[(2, false), (3, false)]))), VoteResult::Lost);
    }

    #[test]
    fn votes_four_voters_need_three() {
        let c = majority(&[1, 2, 3, 4]);
        assert_eq!(c.vote_result(lookup(&votes(&[(1, true), (2, true)]))), VoteResult::Pending);
        let m = votes(&[(1, true), (2, true), (3, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Pending);
        let m = votes(&[(1, true), (2, true), (3, false), (4, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Lost);
        let m = votes(&[(1, true), (2, true), (3, true)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Won);
    }

    #[test]
    fn votes_five_voters() {
        let c = majority(&[1, 2, 3, 4, 5]);
        let m = votes(&[(1, true), (2, true)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Pending);
        let m = votes(&[(1, true), (2, true), (3, true)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Won);
        let m = votes(&[(1, true), (2, true), (3, false), (4, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Pending);
        let m = votes(&[(1, true), (3, false), (4, false), (5, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Lost);
    }

    #[test]
    fn votes_seven_voters() {
        let c = majority(&[1, 2, 3, 4, 5, 6, 7]);
        let m = votes(&[(1, true), (2, true), (3, true)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Pending);
        let m = votes(&[(1, true), (2, true), (3, true), (4, true)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Won);
        let m = votes(&[(1, true), (2, true), (3, true), (4, false), (5, false), (6, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Pending);
        let m = votes(&[(4, false), (5, false), (6, false), (7, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Lost);
    }

    #[test]
    fn learner_votes_are_ignored() {
        let c = majority(&[1, 2, 3]);
        // With learner 4 counted this would be a won election.
        let m = votes(&[(1, true), (2, false), (4, true)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Pending);
        // With learners 4 and 5 counted as "no" this would be lost.
        let m = votes(&[(1, true), (4, false), (5, false)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Pending);
        let m = votes(&[(1, true), (2, false), (3, false), (4, true), (5, true), (6, true)]);
        assert_eq!(c.vote_result(lookup(&m)), VoteResult::Lost);
    }

    // ---- joint configurations -----------------------------------------------------------------

    #[test]
    fn simple_config_equals_its_incoming_majority() {
        let j = JointConfig::simple(majority(&[1, 2, 3]));
        assert!(!j.is_joint());
        let m = acks(&[(1, 10), (2, 8), (3, 2)]);
        assert_eq!(j.committed_index(lookup(&m)), 8);
        let v = votes(&[(1, true), (2, true)]);
        assert_eq!(j.vote_result(lookup(&v)), VoteResult::Won);
    }

    #[test]
    fn joint_committed_index_is_min_of_halves() {
        let j = JointConfig::new(majority(&[1, 2, 3]), majority(&[4, 5, 6]));
        assert!(j.is_joint());
        assert_eq!(j.voters(), vec![1, 2, 3, 4, 5, 6]);
        let m = acks(&[(1, 10), (2, 10), (3, 10), (4, 5), (5, 5), (6, 1)]);
        assert_eq!(j.committed_index(lookup(&m)), 5);
        let m = acks(&[(1, 1), (2, 2), (3, 3), (4, 9), (5, 9), (6, 9)]);
        assert_eq!(j.committed_index(lookup(&m)), 2);
        // The new half alone has a majority, the old half nothing: nothing is committed.
        let m = acks(&[(1, 10), (2, 10), (3, 10)]);
        assert_eq!(j.committed_index(lookup(&m)), 0);
    }

    #[test]
    fn joint_committed_index_overlapping_halves() {
        // Replacing node 3 with node 4: {1,2,4} incoming, {1,2,3} outgoing.
        let j = JointConfig::new(majority(&[1, 2, 4]), majority(&[1, 2, 3]));
        assert_eq!(j.voters(), vec![1, 2, 3, 4]);
        assert!(j.contains(3) && j.contains(4) && !j.contains(5));
        // 1 and 2 form a majority in both halves.
        let m = acks(&[(1, 7), (2, 6)]);
        assert_eq!(j.committed_index(lookup(&m)), 6);
        // 1 and 4 are a majority of the new half only; the old half has just node 1 at 9.
        let m = acks(&[(1, 9), (4, 9), (2, 3)]);
        assert_eq!(j.committed_index(lookup(&m)), 3);
        // Identical halves behave like the single majority.
        let same = JointConfig::new(majority(&[1, 2, 3]), majority(&[1, 2, 3]));
        let m = acks(&[(1, 10), (2, 8), (3, 2)]);
        assert_eq!(same.committed_index(lookup(&m)), 8);
    }

    #[test]
    fn joint_votes_need_both_halves() {
        let j = JointConfig::new(majority(&[1, 2, 3]), majority(&[4, 5, 6]));
        let v = votes(&[(1, true), (2, true)]);
        assert_eq!(j.vote_result(lookup(&v)), VoteResult::Pending);
        let v = votes(&[(1, true), (2, true), (4, true), (5, true)]);
        assert_eq!(j.vote_result(lookup(&v)), VoteResult::Won);
        // Incoming won, outgoing lost: lost.
        let v = votes(&[(1, true), (2, true), (4, false), (5, false)]);
        assert_eq!(j.vote_result(lookup(&v)), VoteResult::Lost);
        // Incoming lost, outgoing pending: lost.
        let v = votes(&[(1, false), (2, false), (4, true)]);
        assert_eq!(j.vote_result(lookup(&v)), VoteResult::Lost);
    }

    #[test]
    fn joint_votes_overlapping_halves() {
        let j = JointConfig::new(majority(&[1, 2, 4]), majority(&[1, 2, 3]));
        assert_eq!(j.vote_result(lookup(&votes(&[(1, true), (2, true)]))), VoteResult::Won);
        // Majority of the new half ({1,4}) but only one of the old half.
        let v = votes(&[(1, true), (4, true)]);
        assert_eq!(j.vote_result(lookup(&v)), VoteResult::Pending);
        let v = votes(&[(1, true), (4, true), (2, false), (3, false)]);
        assert_eq!(j.vote_result(lookup(&v)), VoteResult::Lost);
    }

    #[test]
    fn empty_joint_config_is_unconstrained() {
        let j = JointConfig::default();
        assert!(!j.is_joint());
        assert!(j.voters().is_empty());
        assert_eq!(j.committed_index(|_| Some(1)), u64::MAX);
        assert_eq!(j.vote_result(|_| None), VoteResult::Won);
    }

    // ---- properties against a naive reference -------------------------------------------------

    /// The definition, computed the slow way: the largest v among all acked values and 0 such
    /// that every half has at least a quorum of its voters at or above v.
    fn naive_committed(halves: &[&[u64]], acked: &HashMap<u64, u64>) -> u64 {
        if halves.iter().all(|h| h.is_empty()) {
            return u64::MAX;
        }
        let ack = |id: &u64| acked.get(id).copied().unwrap_or(0);
        let has_majority_at = |v: u64, voters: &[u64]| {
            let at_least = voters.iter().filter(|id| ack(id) >= v).count();
            voters.is_empty() || at_least > voters.len() / 2
        };
        acked
            .values()
            .copied()
            .chain([0])
            .filter(|&v| halves.iter().all(|h| has_majority_at(v, h)))
            .max()
            .expect("0 always qualifies")
    }

    /// Votes counted one half at a time by their definition.
    fn naive_votes(halves: &[&[u64]], votes: &HashMap<u64, bool>) -> VoteResult {
        let mut any_pending = false;
        for voters in halves {
            let yes = voters.iter().filter(|id| votes.get(id) == Some(&true)).count();
            let no = voters.iter().filter(|id| votes.get(id) == Some(&false)).count();
            let needed = voters.len() / 2 + 1;
            if voters.is_empty() || yes >= needed {
                continue;
            }
            if voters.len() - no < needed {
                return VoteResult::Lost;
            }
            any_pending = true;
        }
        if any_pending {
            VoteResult::Pending
        } else {
            VoteResult::Won
        }
    }

    fn dedup(mut ids: Vec<u64>) -> Vec<u64> {
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    // Ids come from a small range so that halves overlap and learners (ids in the map but in no
    // half) appear often; values from a small range so that ties are common.
    fn ids() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec(1u64..12, 0..9)
    }

    fn ack_map() -> impl Strategy<Value = HashMap<u64, u64>> {
        prop::collection::hash_map(1u64..14, 0u64..20, 0..14)
    }

    fn vote_map() -> impl Strategy<Value = HashMap<u64, bool>> {
        prop::collection::hash_map(1u64..14, any::<bool>(), 0..14)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn majority_committed_matches_reference(ids in ids(), acked in ack_map()) {
            let cfg = MajorityConfig::new(ids.clone());
            let voters = dedup(ids);
            prop_assert_eq!(cfg.committed_index(lookup(&acked)), naive_committed(&[&voters], &acked));
        }

        #[test]
        fn joint_committed_matches_reference(
            incoming in ids(), outgoing in ids(), acked in ack_map()
        ) {
            let cfg = JointConfig::new(
                MajorityConfig::new(incoming.clone()),
                MajorityConfig::new(outgoing.clone()),
            );
            let (inc, out) = (dedup(incoming), dedup(outgoing));
            prop_assert_eq!(cfg.committed_index(lookup(&acked)), naive_committed(&[&inc, &out], &acked));
        }

        #[test]
        fn majority_votes_match_reference(ids in ids(), votes in vote_map()) {
            let cfg = MajorityConfig::new(ids.clone());
            let voters = dedup(ids);
            prop_assert_eq!(cfg.vote_result(lookup(&votes)), naive_votes(&[&voters], &votes));
        }

        #[test]
        fn joint_votes_match_reference(incoming in ids(), outgoing in ids(), votes in vote_map()) {
            let cfg = JointConfig::new(
                MajorityConfig::new(incoming.clone()),
                MajorityConfig::new(outgoing.clone()),
            );
            let (inc, out) = (dedup(incoming), dedup(outgoing));
            prop_assert_eq!(cfg.vote_result(lookup(&votes)), naive_votes(&[&inc, &out], &votes));
        }

        /// Acknowledging more never un-commits anything (the commit index only moves forward).
        #[test]
        fn committed_index_is_monotonic_in_acks(
            incoming in ids(), outgoing in ids(), acked in ack_map(), id in 1u64..14, bump in 0u64..20
        ) {
            let cfg = JointConfig::new(MajorityConfig::new(incoming), MajorityConfig::new(outgoing));
            let before = cfg.committed_index(lookup(&acked));
            let mut raised = acked.clone();
            *raised.entry(id).or_insert(0) += bump;
            prop_assert!(cfg.committed_index(lookup(&raised)) >= before);
        }

        /// Answers from ids outside the configuration (learners) never change anything.
        #[test]
        fn non_voters_never_matter(
            incoming in ids(), outgoing in ids(), acked in ack_map(), votes in vote_map()
        ) {
            let cfg = JointConfig::new(MajorityConfig::new(incoming), MajorityConfig::new(outgoing));
            let voters_only = |m: &HashMap<u64, u64>| -> HashMap<u64, u64> {
                m.iter().filter(|(id, _)| cfg.contains(**id)).map(|(k, v)| (*k, *v)).collect()
            };
            let votes_only: HashMap<u64, bool> =
                votes.iter().filter(|(id, _)| cfg.contains(**id)).map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(
                cfg.committed_index(lookup(&acked)),
                cfg.committed_index(lookup(&voters_only(&acked)))
            );
            prop_assert_eq!(cfg.vote_result(lookup(&votes)), cfg.vote_result(lookup(&votes_only)));
        }
    }
}
