"""The linearizability checker (`dengine.testing.linearizability`).

Known-good histories must pass, known-bad ones must fail with an explanation that points at the
culprit, and on small random histories the checker must agree with a brute-force search over every
order of the operations, which is slow but obviously right.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import pytest

from dengine.testing.linearizability import (
    CheckResult,
    HistoryRecorder,
    KVInput,
    KVModel,
    Model,
    Operation,
    RegisterInput,
    RegisterModel,
    check,
)

# ---- helpers ----------------------------------------------------------------------------------


def put(key: bytes, value: bytes) -> KVInput:
    return KVInput("put", key, value)


def get(key: bytes) -> KVInput:
    return KVInput("get", key)


def delete(key: bytes) -> KVInput:
    return KVInput("delete", key)


def cas(key: bytes, expected: bytes | None, value: bytes) -> KVInput:
    return KVInput("cas", key, value, expected)


def op(client: int, inp: Any, call: float, ret: float | None, output: Any = None) -> Operation:
    return Operation(client, inp, call, output, ret)


READ = RegisterInput("read")


def write(value: Hashable) -> RegisterInput:
    return RegisterInput("write", value)


def reg_cas(expected: Hashable, value: Hashable) -> RegisterInput:
    return RegisterInput("cas", value, expected)


def assert_linearizable(result: CheckResult) -> None:
    assert result.ok is True, str(result)


def assert_not_linearizable(result: CheckResult) -> None:
    assert result.ok is False, str(result)
    assert result.failures


KVOp = Literal["put", "get", "delete", "cas"]
# Planned ops: (client, input, call, return or None, linearization point or None for "never").
Plan = list[tuple[int, KVInput, float, float | None, float | None]]


def random_kv_history(
    seed: int, n_ops: int, clients: int, keys: Sequence[bytes], indeterminate: float = 0.0
) -> list[Operation]:
    """A linearizable history: every op gets a linearization point inside its interval (or, for a
    timed-out op, any time after its call, or never) and its output is what a dict store answers
    when the ops are applied in the order of those points. Written values are unique."""
    rng = random.Random(seed)
    kinds: tuple[KVOp, ...] = ("put", "get", "get", "delete", "cas")
    planned: Plan = []
    written: dict[bytes, list[bytes | None]] = {key: [None] for key in keys}
    for client in range(clients):
        t = rng.random()
        for _ in range(n_ops // clients):
            call = t + rng.expovariate(2.0)
            t = ret = call + 0.01 + rng.expovariate(1.0)
            key, kind, value = rng.choice(keys), rng.choice(kinds), b"v%d" % len(planned)
            expected = rng.choice(written[key][-3:]) if kind == "cas" else None
            inp = KVInput(kind, key, value if kind in ("put", "cas") else None, expected)
            if kind in ("put", "cas"):
                written[key].append(value)
            if rng.random() < indeterminate:
                # The client gives up; the op may still take effect, much later, or never.
                point = call + rng.uniform(0, 20) if rng.random() < 0.5 else None
                planned.append((client, inp, call, None, point))
            else:
                planned.append((client, inp, call, ret, rng.uniform(call, ret)))
    outputs = _answers(planned)
    return [
        op(client, inp, call, ret, outputs.get(n) if ret is not None else None)
        for n, (client, inp, call, ret, _) in enumerate(planned)
    ]


def _answers(planned: Plan) -> dict[int, Any]:
    """What a dict store answers to the planned ops applied in the order of their points."""
    store: dict[bytes, bytes | None] = {}
    outputs: dict[int, Any] = {}
    for _, n in sorted((p[4], n) for n, p in enumerate(planned) if p[4] is not None):
        inp = planned[n][1]
        current = store.get(inp.key)
        if inp.op == "get":
            outputs[n] = current
        elif inp.op == "delete":
            outputs[n] = store.pop(inp.key, None) is not None
        elif inp.op == "cas":
            outputs[n] = current == inp.expected
            store[inp.key] = inp.value if outputs[n] else current
        else:
            store[inp.key] = inp.value
    return outputs


def brute_force(history: Sequence[Operation], model: Model[Any, Any, Any]) -> bool:
    """Tries every order of the operations that respects real time (an op may go next unless a
    pending completed op returned strictly before its call); ops without a response are optional."""
    ops = list(history)
    completed = frozenset(i for i, o in enumerate(ops) if o.ret is not None)

    @functools.cache
    def search(done: frozenset[int], state: Any) -> bool:
        if completed <= done:
            return True
        for i, o in enumerate(ops):
            if i in done or any(
                j not in done and (r := ops[j].ret) is not None and r < o.call for j in completed
            ):
                continue
            if o.ret is None:
                legal, after = True, model.step_unknown(state, o.input)
            else:
                legal, after = model.step(state, o.input, o.output)
            if legal and search(done | {i}, after):
                return True
        return False

    return search(frozenset(), model.init())


K = b"k"

# ---- histories that must pass -----------------------------------------------------------------


def test_empty_history_is_linearizable() -> None:
    result = check([])
    assert_linearizable(result)
    assert result.partitions == ()


def test_sequential_history() -> None:
    history = [
        op(0, get(K), 0, 1, None),
        op(0, put(K, b"1"), 2, 3),
        op(1, get(K), 4, 5, b"1"),
        op(1, cas(K, b"1", b"2"), 6, 7, True),
        op(0, cas(K, b"1", b"3"), 8, 9, False),
        op(0, get(K), 10, 11, b"2"),
        op(1, delete(K), 12, 13, True),
        op(1, delete(K), 14, 15, False),
        op(0, cas(K, None, b"4"), 16, 17, True),
        op(0, get(K), 18, 19, b"4"),
    ]
    result = check(history)
    assert_linearizable(result)
    assert [o.call for o in result.partitions[0].linearization] == sorted(o.call for o in history)


@pytest.mark.parametrize("seen", [None, b"1"])
def test_read_concurrent_with_a_write_may_see_either_value(seen: bytes | None) -> None:
    history = [op(0, put(K, b"1"), 0, 10), op(1, get(K), 2, 5, seen)]
    assert_linearizable(check(history))


@pytest.mark.parametrize("last", [b"a", b"b"])
def test_concurrent_writes_may_take_effect_in_either_order(last: bytes) -> None:
    history = [
        op(0, put(K, b"a"), 0, 10),
        op(1, put(K, b"b"), 1, 9),
        op(2, get(K), 11, 12, last),
        op(2, get(K), 13, 14, last),
    ]
    assert_linearizable(check(history))


def test_touching_intervals_may_be_ordered_either_way() -> None:
    # The read is called at the instant the write returns: closed intervals overlap, so the read may
    # still come first. One tick later it may not.
    touching = [op(0, put(K, b"1"), 0, 1), op(1, get(K), 1, 2, None)]
    assert_linearizable(check(touching))
    apart = [op(0, put(K, b"1"), 0, 1), op(1, get(K), 1.5, 2, None)]
    assert_not_linearizable(check(apart))


def test_instantaneous_operations_are_accepted() -> None:
    history = [op(0, put(K, b"1"), 3, 3), op(1, get(K), 3, 3, b"1"), op(0, get(K), 4, 4, b"1")]
    assert_linearizable(check(history))


def test_indeterminate_write_that_took_effect_even_late() -> None:
    history = [
        op(0, put(K, b"1"), 0, None),  # timed out
        op(1, put(K, b"2"), 2, 3),
        op(1, get(K), 4, 5, b"2"),
        op(2, get(K), 6, 7, b"1"),  # the timed-out put landed after put(2) completed
        op(2, get(K), 8, 9, b"1"),
    ]
    assert_linearizable(check(history))


def test_indeterminate_write_that_never_took_effect() -> None:
    history = [
        op(0, put(K, b"1"), 0, None),
        op(1, get(K), 2, 3, None),
        op(1, put(K, b"2"), 4, 5),
        op(2, get(K), 6, 7, b"2"),
    ]
    assert_linearizable(check(history))


def test_indeterminate_reads_are_dropped() -> None:
    history = [op(0, put(K, b"1"), 0, 1), op(1, get(K), 2, None), op(2, get(K), 3, 4, b"1")]
    result = check(history)
    assert_linearizable(result)
    assert result.partitions[0].operations == 2


def test_chain_of_indeterminate_cas_operations() -> None:
    # The final read needs both unanswered swaps to have taken effect, in order.
    history = [
        op(0, write(1), 0, 1),
        op(1, reg_cas(1, 2), 2, None),
        op(2, reg_cas(2, 3), 2.5, None),
        op(3, READ, 4, 5, 3),
    ]
    assert_linearizable(check(history, RegisterModel()))
    history[-1] = op(3, READ, 4, 5, 4)
    assert_not_linearizable(check(history, RegisterModel()))


def test_many_keys_are_checked_as_independent_partitions() -> None:
    history = []
    for n in range(50):
        key = b"key%d" % n
        history += [op(n, put(key, b"x%d" % n), n, n + 1), op(n, get(key), n + 2, n + 3, b"x%d" % n)]
    result = check(history)
    assert_linearizable(result)
    assert len(result.partitions) == 50
    assert {p.name for p in result.partitions} == {f"key {b'key%d' % n!r}" for n in range(50)}


def test_witness_is_a_legal_order_that_respects_real_time() -> None:
    history = random_kv_history(seed=11, n_ops=400, clients=6, keys=[K], indeterminate=0.05)
    result = check(history)
    assert_linearizable(result)
    order = result.partitions[0].linearization
    model = KVModel()
    state = model.init()
    for o in order:
        if o.ret is None:
            state = model.step_unknown(state, o.input)
        else:
            legal, state = model.step(state, o.input, o.output)
            assert legal, o
    position = {id(o): n for n, o in enumerate(order)}
    completed = [o for o in history if o.ret is not None]
    assert all(id(o) in position for o in completed)
    for a in completed:
        for b in completed:
            assert a.ret is not None
            if a.ret < b.call:
                assert position[id(a)] < position[id(b)]


def test_big_random_history_passes_within_a_small_budget() -> None:
    # The budget (search steps per partition) is a machine-independent stand-in for "quickly":
    # 4,000 ops on one hot key from 8 concurrent clients need only a few steps each.
    history = random_kv_history(seed=1, n_ops=4000, clients=8, keys=[K])
    result = check(history, budget=10 * len(history))
    assert_linearizable(result)
    assert result.partitions[0].operations == 4000


def test_big_random_history_with_timeouts_over_many_keys() -> None:
    keys = [b"k%d" % n for n in range(10)]
    history = random_kv_history(seed=2, n_ops=8000, clients=10, keys=keys, indeterminate=0.05)
    assert sum(o.ret is None for o in history) > 300
    result = check(history, budget=20 * len(history) // len(keys))
    assert_linearizable(result)
    assert len(result.partitions) == len(keys)


def test_big_random_history_with_timeouts_on_one_key() -> None:
    history = random_kv_history(seed=3, n_ops=3000, clients=8, keys=[K], indeterminate=0.05)
    assert_linearizable(check(history, budget=30 * len(history)))


# ---- histories that must fail -----------------------------------------------------------------


def test_stale_read_is_rejected() -> None:
    history = [
        op(0, put(K, b"1"), 0, 1),
        op(0, put(K, b"2"), 2, 3),
        op(1, get(K), 4, 5, b"1"),
    ]
    result = check(history)
    assert_not_linearizable(result)
    failure = result.failures[0]
    assert failure.longest_prefix == (history[0], history[1])
    assert failure.unlinearizable == (history[2],)
    text = str(result)
    assert "key b'k'" in text
    assert "client 1 [4, 5] get(b'k') -> b'1'" in text
    assert "b'2'" in text  # the state the read contradicts


def test_lost_update_two_successful_cas_from_the_same_value() -> None:
    history = [
        op(0, put(K, b"0"), 0, 1),
        op(1, cas(K, b"0", b"a"), 2, 5, True),
        op(2, cas(K, b"0", b"b"), 3, 6, True),
    ]
    assert_not_linearizable(check(history))


def test_read_going_back_in_time_is_rejected() -> None:
    history = [
        op(0, put(K, b"1"), 0, 10),
        op(1, put(K, b"2"), 0, 10),
        op(2, get(K), 1, 2, b"2"),
        op(2, get(K), 3, 4, b"1"),  # no write of 1 after 2 was seen...
        op(2, get(K), 5, 6, b"2"),  # ...and 2 comes back
    ]
    assert_not_linearizable(check(history))
    assert_linearizable(check(history[:4]))  # seeing 2 then 1 alone is fine: put(1) may land late
    # Once a write still in flight has been seen, the value it replaced cannot come back.
    history = [
        op(0, put(K, b"1"), 0, 1),
        op(1, put(K, b"2"), 2, 10),
        op(2, get(K), 3, 4, b"2"),
        op(2, get(K), 5, 6, b"1"),
    ]
    assert_not_linearizable(check(history))


def test_read_of_a_value_never_written_is_rejected() -> None:
    history = [op(0, put(K, b"1"), 0, 1), op(1, get(K), 0.5, 3, b"ghost")]
    result = check(history)
    assert_not_linearizable(result)
    assert "ghost" in str(result)


def test_delete_of_an_absent_key_reporting_true_is_rejected() -> None:
    history = [op(0, put(K, b"1"), 0, 1), op(0, delete(K), 2, 3, True), op(1, delete(K), 4, 5, True)]
    assert_not_linearizable(check(history))
    assert_not_linearizable(check([op(0, delete(K), 0, 1, True)]))


def test_timed_out_write_takes_effect_at_most_once() -> None:
    # Seeing 2, then 3, then 2 again would need the single unanswered put(2) to apply twice: the
    # duplicate a careless client retry produces.
    history = [
        op(0, put(K, b"1"), 0, 1),
        op(1, put(K, b"2"), 2, None),
        op(2, get(K), 3, 4, b"2"),
        op(2, put(K, b"3"), 5, 6),
        op(2, get(K), 7, 8, b"2"),
    ]
    assert_not_linearizable(check(history))


def test_failure_among_many_valid_keys_names_the_bad_key() -> None:
    history = random_kv_history(seed=4, n_ops=3000, clients=10, keys=[b"k%d" % n for n in range(30)])
    history += [
        op(99, put(b"bad", b"1"), 0, 1),
        op(99, put(b"bad", b"2"), 2, 3),
        op(98, get(b"bad"), 4, 5, b"1"),
    ]
    result = check(history)
    assert_not_linearizable(result)
    assert len(result.partitions) == 31
    assert [p.name for p in result.failures] == ["key b'bad'"]
    text = str(result)
    assert "NOT linearizable: 1 of 31 partitions" in text
    assert "key b'bad'" in text
    assert "get(b'bad') -> b'1'" in text
    assert "k0" not in text


def test_corrupted_big_history_is_rejected() -> None:
    history = random_kv_history(seed=5, n_ops=2000, clients=8, keys=[K], indeterminate=0.03)
    assert_linearizable(check(history))
    puts = [o for o in history if o.input.op == "put" and o.ret is not None]
    # Find a read called after two writes completed one after the other, and make it return the
    # first write's value: stale, since written values are unique.
    n, read, stale = next(
        (n, r, w1)
        for n, r in enumerate(history)
        if r.input.op == "get" and r.ret is not None
        for w1 in puts
        for w2 in puts
        if w1.ret < w2.call and w2.ret < r.call and w1.input.value != r.output  # type: ignore[operator]
    )
    history[n] = op(read.client, read.input, read.call, read.ret, stale.input.value)
    assert_not_linearizable(check(history))


# ---- budget and timeout -----------------------------------------------------------------------


def _hard_history(writers: int) -> list[Operation]:
    """Concurrent writes then a read of a value nobody wrote: a failure only an exhaustive search
    of the writes' orders can prove."""
    history = [op(n, put(K, b"w%d" % n), 0, 10) for n in range(writers)]
    return [*history, op(writers, get(K), 11, 12, b"nobody")]


def test_exhausted_budget_gives_unknown_never_a_pass() -> None:
    history = _hard_history(10)
    assert_not_linearizable(check(history))
    result = check(history, budget=100)
    assert result.ok is None
    assert not result
    assert result.partitions[0].steps == 100
    assert "UNKNOWN" in str(result)
    assert "step budget" in str(result)


def test_budget_is_per_partition_and_a_failure_wins_over_unknown() -> None:
    history = [*_hard_history(10), op(0, get(b"other"), 0, 1, b"ghost")]
    result = check(history, budget=100)
    assert result.ok is False
    assert [p.ok for p in result.partitions] == [None, False]


def test_timeout_gives_unknown() -> None:
    result = check(_hard_history(12), timeout=0.0)
    assert result.ok is None
    assert "timeout" in str(result)


def test_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        check([], budget=-1)


# ---- agreement with brute force ---------------------------------------------------------------


def _small_history(rng: random.Random, kv: bool) -> list[Operation]:
    """A few ops from 3 clients on integer times (so ties are common), answered by a simulated
    store, some left unanswered, and half of the time with one answer changed."""
    values: list[Any] = [b"a", b"b"] if kv else [1, 2]
    free = [0, 0, 0]
    planned: list[tuple[int, Any, int, int]] = []
    for _ in range(rng.randint(2, 7)):
        client = rng.randrange(3)
        call = free[client] + rng.randint(0, 2)
        ret = call + rng.randint(0, 3)
        free[client] = ret + rng.randint(0, 1)
        kind = rng.choice(["put", "get", "delete", "cas"] if kv else ["write", "read", "cas"])
        value, expected = rng.choice(values), rng.choice([None, *values])
        if kv:
            inp: Any = KVInput(kind, K, value if kind in ("put", "cas") else None, expected)  # type: ignore[arg-type]
        else:
            inp = RegisterInput(kind, value, expected)  # type: ignore[arg-type]
        planned.append((client, inp, call, ret))
    state: Any = None
    outputs: list[Any] = [None] * len(planned)
    for _, n in sorted((rng.uniform(call, ret), n) for n, (_, _, call, ret) in enumerate(planned)):
        inp = planned[n][1]
        if inp.op in ("get", "read"):
            outputs[n] = state
        elif inp.op in ("put", "write"):
            state = inp.value
        elif inp.op == "delete":
            state, outputs[n] = None, state is not None
        else:
            outputs[n] = state == inp.expected
            state = inp.value if outputs[n] else state
    history = [
        op(client, inp, call, None if rng.random() < 0.15 else ret, outputs[n])
        for n, (client, inp, call, ret) in enumerate(planned)
    ]
    n = rng.randrange(len(history))
    if rng.random() < 0.5 and history[n].input.op not in ("put", "write"):
        o = history[n]
        history[n] = op(o.client, o.input, o.call, o.ret, rng.choice([None, True, False, *values]))
    return history


@pytest.mark.parametrize("kv", [True, False], ids=["kv", "register"])
def test_agrees_with_brute_force_on_small_random_histories(kv: bool) -> None:
    rng = random.Random(20240 + kv)
    model: Model[Any, Any, Any] = KVModel() if kv else RegisterModel()
    verdicts = {True: 0, False: 0}
    for _ in range(1500):
        history = _small_history(rng, kv)
        expected = brute_force(history, model)
        result = check(history, model)
        assert result.ok is expected, (history, str(result))
        verdicts[expected] += 1
    # Both kinds of history must be well represented, or this test proves little.
    assert min(verdicts.values()) > 200, verdicts


# ---- custom models, the recorder, input validation --------------------------------------------


class Counter(Model[int, str, Any]):
    """A counter with "incr" (returns the new value) and "get"; uses every default of Model."""

    def init(self) -> int:
        return 0

    def step(self, state: int, input: str, output: Any) -> tuple[bool, int]:
        after = state + 1 if input == "incr" else state
        return output == after, after

    def step_unknown(self, state: int, input: str) -> int:
        return state + 1 if input == "incr" else state


def test_custom_model_with_defaults() -> None:
    good = [op(0, "incr", 0, 2, 1), op(1, "incr", 1, 3, 2), op(2, "get", 4, 5, 2)]
    result = check(good, Counter())
    assert_linearizable(result)
    assert [p.name for p in result.partitions] == ["history"]
    bad = [op(0, "incr", 0, 1, 1), op(1, "incr", 2, None), op(2, "get", 4, 5, 3)]
    result = check(bad, Counter())
    assert_not_linearizable(result)
    assert "'get' -> 3" in str(result)
    assert "'incr' -> ? (no response)" in str(result)


def test_recorder_turns_unfinished_calls_into_indeterminate_operations() -> None:
    recorder = HistoryRecorder()
    a = recorder.invoke(0, put(K, b"1"), 0.0)
    b = recorder.invoke(1, get(K), 0.5)
    c = recorder.invoke(2, put(K, b"2"), 0.7)
    d = recorder.invoke(3, put(K, b"never sent"), 0.8)
    recorder.complete(a, None, 1.0)
    recorder.complete(b, b"1", 2.0)
    recorder.discard(d)
    history = recorder.history()
    assert history == [
        Operation(0, put(K, b"1"), 0.0, None, 1.0),
        Operation(1, get(K), 0.5, b"1", 2.0),
        Operation(2, put(K, b"2"), 0.7, None, None),
    ]
    assert history[2].indeterminate
    assert c == 2
    assert_linearizable(check(history))
    with pytest.raises(ValueError, match="already completed"):
        recorder.complete(a, None, 3.0)
    with pytest.raises(KeyError):
        recorder.complete(d, None, 3.0)
    with pytest.raises(ValueError, match="before its call"):
        recorder.complete(c, None, 0.1)


def test_recorder_uses_its_clock_when_no_time_is_given() -> None:
    ticks = iter([5.0, 7.0])
    recorder = HistoryRecorder(clock=lambda: next(ticks))
    recorder.complete(recorder.invoke(0, get(K)), None)
    assert recorder.history() == [Operation(0, get(K), 5.0, None, 7.0)]
    assert (recorder.history()[0].call_seq, recorder.history()[0].ret_seq) == (1, 2)


def test_one_clients_operations_at_one_instant_keep_their_program_order() -> None:
    """A driver on a virtual clock that issues the next operation from the previous one's
    callback records one instant for all of them. Closed intervals alone would let them overlap,
    and put(a), put(b), get -> a by one client would pass; the recorder's numbering keeps them in
    the order the client ran them."""
    recorder = HistoryRecorder(clock=lambda: 3.0)
    for inp, out in [(put(K, b"a"), None), (put(K, b"b"), None), (get(K), b"a")]:
        recorder.complete(recorder.invoke(1, inp), out)
    result = check(recorder.history(), KVModel())
    assert result.ok is False, str(result)
    ok = HistoryRecorder(clock=lambda: 3.0)
    for inp, out in [(put(K, b"a"), None), (put(K, b"b"), None), (get(K), b"b")]:
        ok.complete(ok.invoke(1, inp), out)
    assert check(ok.history(), KVModel()).ok is True


def test_operations_at_one_instant_without_a_known_order_still_overlap() -> None:
    """Times passed by the caller carry no order within their instant (a coarse clock): those
    operations stay concurrent, as before."""
    recorder = HistoryRecorder()
    for inp, out in [(put(K, b"a"), None), (put(K, b"b"), None), (get(K), b"a")]:
        recorder.complete(recorder.invoke(1, inp, 3.0), out, 3.0)
    assert check(recorder.history(), KVModel()).ok is True


def test_operation_and_input_validation() -> None:
    with pytest.raises(ValueError, match="before it is called"):
        Operation(0, get(K), 2.0, None, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        Operation(0, get(K), float("nan"))
    with pytest.raises(ValueError, match="needs a value"):
        KVInput("put", K)
    with pytest.raises(ValueError, match="unknown KV operation"):
        KVInput("incr", K)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown register operation"):
        RegisterInput("incr")  # type: ignore[arg-type]


class PlainRegister:
    """A user's model as a plain class: only the three methods the protocol requires."""

    def init(self) -> int:
        return 0

    def step(self, state: int, input: tuple[str, int], output: int | None) -> tuple[bool, int]:
        op, value = input
        if op == "write":
            return True, value
        return output == state, state

    def step_unknown(self, state: int, input: tuple[str, int]) -> int:
        op, value = input
        return value if op == "write" else state


def test_a_plain_class_model_gets_the_protocol_defaults() -> None:
    """The README promises that any model implementing the small Model protocol works, without
    inheriting from it: the optional methods fall back to their defaults."""
    good = [
        Operation(1, ("write", 1), 0.0, None, 1.0),
        Operation(2, ("read", 0), 2.0, 1, 3.0),
        Operation(3, ("write", 2), 4.0),  # no response
    ]
    assert check(good, PlainRegister()).ok is True  # type: ignore[arg-type]
    bad = [Operation(1, ("write", 1), 0.0, None, 1.0), Operation(2, ("read", 0), 2.0, 0, 3.0)]
    result = check(bad, PlainRegister())  # type: ignore[arg-type]
    assert result.ok is False
    assert "('read', 0) -> 0" in str(result) and "history" in str(result)
