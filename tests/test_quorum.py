"""Python API of the quorum arithmetic: `dengine._core.JointConfig` and `VoteResult`.

The Rust crate tests the arithmetic exhaustively; these tests check that the binding converts
arguments faithfully (ids, mappings, learners, errors) and that the answers come through intact.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import pytest

from dengine._core import JointConfig, VoteResult

U64_MAX = 2**64 - 1


class _Answers(Mapping[int, int]):
    """A Mapping that is not a dict, to exercise the generic lookup path."""

    def __init__(self, data: dict[int, int]) -> None:
        self._data = data

    def __getitem__(self, key: int) -> int:
        return self._data[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


# ---- construction and properties ---------------------------------------------------------------


def test_voters_are_deduplicated_frozensets() -> None:
    config = JointConfig([3, 1, 2, 3, 1])
    assert config.incoming == frozenset({1, 2, 3})
    assert isinstance(config.incoming, frozenset)
    assert config.outgoing == frozenset()
    assert isinstance(config.outgoing, frozenset)
    assert config.voters == frozenset({1, 2, 3})
    assert config.is_joint is False


def test_joint_voters_are_the_union() -> None:
    config = JointConfig([1, 2, 4], [1, 2, 3])
    assert config.incoming == frozenset({1, 2, 4})
    assert config.outgoing == frozenset({1, 2, 3})
    assert config.voters == frozenset({1, 2, 3, 4})
    assert isinstance(config.voters, frozenset)
    assert config.is_joint is True


def test_accepts_any_iterable_and_keywords() -> None:
    expected = JointConfig([1, 2, 3], [4, 5])
    assert JointConfig(iter([3, 2, 1]), (5, 4)) == expected
    assert JointConfig(frozenset({1, 2, 3}), {4, 5}) == expected
    assert JointConfig(range(1, 4), (i for i in (4, 5))) == expected
    assert JointConfig(incoming=[1, 2, 3], outgoing=[4, 5]) == expected
    assert JointConfig([1, 2, 3], ()) == JointConfig([1, 2, 3])


def test_large_ids_are_kept_exactly() -> None:
    config = JointConfig([U64_MAX, 0])
    assert config.voters == frozenset({0, U64_MAX})


def test_negative_or_oversized_ids_are_rejected() -> None:
    with pytest.raises(OverflowError):
        JointConfig([1, -2, 3])
    with pytest.raises(OverflowError):
        JointConfig([1], [2**64])


def test_non_integer_ids_are_rejected() -> None:
    with pytest.raises(TypeError):
        JointConfig(["a", "b"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        JointConfig("123")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        JointConfig([1.5])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        JointConfig(3)  # type: ignore[arg-type]


def test_config_is_immutable() -> None:
    config = JointConfig([1, 2, 3])
    with pytest.raises(AttributeError):
        config.incoming = frozenset({4})  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.is_joint = True  # type: ignore[misc]


def test_repr_round_trips() -> None:
    simple = JointConfig([3, 1, 2])
    joint = JointConfig([1, 2, 4], [3, 2, 1])
    assert repr(simple) == "JointConfig([1, 2, 3])"
    assert repr(joint) == "JointConfig([1, 2, 4], [1, 2, 3])"
    assert repr(JointConfig([])) == "JointConfig([])"
    namespace = {"JointConfig": JointConfig}
    assert eval(repr(simple), namespace) == simple
    assert eval(repr(joint), namespace) == joint


def test_equality_and_hash_ignore_order_and_duplicates() -> None:
    a = JointConfig([1, 2, 3], [3, 4])
    b = JointConfig([3, 2, 1, 1], [4, 3])
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


def test_halves_are_not_interchangeable() -> None:
    assert JointConfig([1, 2, 3], [4, 5]) != JointConfig([4, 5], [1, 2, 3])
    assert JointConfig([1, 2, 3], [1, 2, 3]) != JointConfig([1, 2, 3])
    assert JointConfig([1, 2, 3]) != JointConfig([1, 2])


def test_not_equal_to_other_types() -> None:
    config = JointConfig([1, 2, 3])
    assert config != frozenset({1, 2, 3})
    assert config != "JointConfig([1, 2, 3])"
    assert config is not None


# ---- committed index ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    # Voter i acked 10 * i: the committed index is the quorum-th largest of those values, so an
    # off-by-one in either direction gives a different number.
    [(1, 10), (2, 10), (3, 20), (4, 20), (5, 30), (7, 40)],
)
def test_committed_index_is_the_quorum_th_largest(size: int, expected: int) -> None:
    config = JointConfig(range(1, size + 1))
    acked = {voter: 10 * voter for voter in range(size, 0, -1)}
    assert config.committed_index(acked) == expected


def test_missing_acks_count_as_zero() -> None:
    config = JointConfig([1, 2, 3])
    assert config.committed_index({}) == 0
    assert config.committed_index({1: 10}) == 0
    assert config.committed_index({1: 10, 3: 4}) == 4


def test_learner_acks_are_ignored() -> None:
    config = JointConfig([1, 2, 3])
    # Learners 4 and 5 are far ahead; counting them would commit 100.
    assert config.committed_index({1: 100, 4: 100, 5: 100}) == 0
    assert config.committed_index({1: 7, 2: 5, 4: 100}) == 5


def test_learner_entries_are_never_converted() -> None:
    # Values and keys of non-voters are never looked at, so bad ones there do no harm.
    config = JointConfig([1, 2, 3])
    not_voters: dict[object, object] = {-1: -1, "learner": "x", 9: None}
    assert config.committed_index({1: 5, 2: 5, **not_voters}) == 5  # type: ignore[dict-item]


def test_joint_committed_index_is_the_minimum_of_both_halves() -> None:
    config = JointConfig([1, 2, 3], [4, 5, 6])
    assert config.committed_index({1: 10, 2: 10, 3: 10, 4: 5, 5: 5, 6: 1}) == 5
    assert config.committed_index({1: 1, 2: 2, 3: 3, 4: 9, 5: 9, 6: 9}) == 2
    # A majority of the new voters alone commits nothing.
    assert config.committed_index({1: 10, 2: 10, 3: 10}) == 0


def test_joint_committed_index_with_overlapping_halves() -> None:
    # Replacing voter 3 by voter 4.
    config = JointConfig([1, 2, 4], [1, 2, 3])
    assert config.committed_index({1: 7, 2: 6}) == 6
    assert config.committed_index({1: 9, 4: 9, 2: 3}) == 3


def test_empty_outgoing_half_is_just_the_incoming_majority() -> None:
    acked = {1: 10, 2: 8, 3: 2}
    assert JointConfig([1, 2, 3], []).committed_index(acked) == 8
    assert JointConfig([1, 2, 3]).committed_index(acked) == 8


def test_full_u64_range_of_indexes() -> None:
    config = JointConfig([1, 2, 3])
    assert config.committed_index({1: U64_MAX, 2: U64_MAX, 3: 0}) == U64_MAX


def test_committed_index_accepts_any_mapping() -> None:
    config = JointConfig([1, 2, 3])
    acked = {1: 10, 2: 8, 3: 2, 4: 50}
    assert config.committed_index(MappingProxyType(acked)) == 8
    assert config.committed_index(_Answers(acked)) == 8
    assert config.committed_index(_Answers({1: 10})) == 0


def test_committed_index_rejects_non_mappings() -> None:
    config = JointConfig([0, 1, 2])
    with pytest.raises(TypeError):
        config.committed_index([10, 8, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        config.committed_index(None)  # type: ignore[arg-type]


def test_committed_index_rejects_bad_voter_values() -> None:
    config = JointConfig([1, 2, 3])
    with pytest.raises(OverflowError):
        config.committed_index({1: -1})
    with pytest.raises(TypeError):
        config.committed_index({1: "10"})  # type: ignore[dict-item]


def test_empty_config_committed_index_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="no voters"):
        JointConfig([]).committed_index({1: 5})
    with pytest.raises(ValueError, match="no voters"):
        JointConfig([], []).committed_index({})


# ---- votes -------------------------------------------------------------------------------------


def test_vote_result_members() -> None:
    members = [VoteResult.PENDING, VoteResult.LOST, VoteResult.WON]
    assert len(set(members)) == 3
    assert VoteResult.WON == VoteResult.WON
    assert VoteResult.WON != VoteResult.LOST
    assert repr(VoteResult.WON) == "VoteResult.WON"
    assert repr(VoteResult.PENDING) == "VoteResult.PENDING"
    assert repr(VoteResult.LOST) == "VoteResult.LOST"


def test_three_voter_election() -> None:
    config = JointConfig([1, 2, 3])
    assert config.vote_result({}) == VoteResult.PENDING
    assert config.vote_result({1: True}) == VoteResult.PENDING
    assert config.vote_result({1: True, 2: True}) == VoteResult.WON
    assert config.vote_result({1: True, 2: False}) == VoteResult.PENDING
    assert config.vote_result({1: True, 2: False, 3: False}) == VoteResult.LOST
    assert config.vote_result({2: False, 3: False}) == VoteResult.LOST
    assert isinstance(config.vote_result({}), VoteResult)


def test_four_voter_election_needs_three() -> None:
    config = JointConfig([1, 2, 3, 4])
    assert config.vote_result({1: True, 2: True}) == VoteResult.PENDING
    assert config.vote_result({1: True, 2: True, 3: True}) == VoteResult.WON
    assert config.vote_result({1: True, 2: True, 3: False, 4: False}) == VoteResult.LOST


def test_learner_votes_are_ignored() -> None:
    config = JointConfig([1, 2, 3])
    # Counting learner 4 would win the election.
    assert config.vote_result({1: True, 2: False, 4: True}) == VoteResult.PENDING
    # Counting learners 4 and 5 as "no" would lose it.
    assert config.vote_result({1: True, 4: False, 5: False}) == VoteResult.PENDING


def test_joint_votes_need_both_halves() -> None:
    config = JointConfig([1, 2, 3], [4, 5, 6])
    assert config.vote_result({1: True, 2: True}) == VoteResult.PENDING
    assert config.vote_result({1: True, 2: True, 4: True, 5: True}) == VoteResult.WON
    assert config.vote_result({1: True, 2: True, 4: False, 5: False}) == VoteResult.LOST
    assert config.vote_result({1: False, 2: False, 4: True}) == VoteResult.LOST


def test_joint_votes_with_overlapping_halves() -> None:
    config = JointConfig([1, 2, 4], [1, 2, 3])
    assert config.vote_result({1: True, 2: True}) == VoteResult.WON
    assert config.vote_result({1: True, 4: True}) == VoteResult.PENDING
    assert config.vote_result({1: True, 4: True, 2: False, 3: False}) == VoteResult.LOST


def test_vote_result_accepts_any_mapping() -> None:
    config = JointConfig([1, 2, 3])
    assert config.vote_result(MappingProxyType({1: True, 2: True})) == VoteResult.WON


def test_votes_must_be_bools() -> None:
    config = JointConfig([1, 2, 3])
    with pytest.raises(TypeError):
        config.vote_result({1: 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        config.vote_result({1: "yes"})  # type: ignore[dict-item]


def test_empty_config_vote_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="no voters"):
        JointConfig([]).vote_result({1: True})


# ---- agreement with a reference written from the definitions -----------------------------------


def _reference_committed(halves: list[set[int]], acked: dict[int, int]) -> int:
    def majority_at(value: int, voters: set[int]) -> bool:
        reached = sum(1 for voter in voters if acked.get(voter, 0) >= value)
        return not voters or reached > len(voters) // 2

    candidates = {0, *acked.values()}
    return max(v for v in candidates if all(majority_at(v, half) for half in halves))


def _reference_vote(halves: list[set[int]], votes: dict[int, bool]) -> VoteResult:
    pending = False
    for voters in halves:
        if not voters:
            continue
        needed = len(voters) // 2 + 1
        yes = sum(1 for voter in voters if votes.get(voter) is True)
        no = sum(1 for voter in voters if votes.get(voter) is False)
        if yes >= needed:
            continue
        if len(voters) - no < needed:
            return VoteResult.LOST
        pending = True
    return VoteResult.PENDING if pending else VoteResult.WON


def test_random_configs_agree_with_reference() -> None:
    rng = random.Random(20240601)
    for _ in range(2000):
        incoming = {rng.randrange(1, 10) for _ in range(rng.randrange(1, 8))}
        outgoing = {rng.randrange(1, 10) for _ in range(rng.randrange(0, 8))}
        config = JointConfig(incoming, outgoing)
        # Ids up to 12 so that learners (ids in no half) show up often.
        ids = range(1, 13)
        acked = {i: rng.randrange(0, 15) for i in ids if rng.random() < 0.7}
        votes = {i: rng.random() < 0.5 for i in ids if rng.random() < 0.6}
        halves = [incoming, outgoing]
        assert config.committed_index(acked) == _reference_committed(halves, acked), (
            config,
            acked,
        )
        assert config.vote_result(votes) == _reference_vote(halves, votes), (config, votes)
