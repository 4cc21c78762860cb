"""Linearizability checker for recorded client histories.

A replicated service is correct when every history its clients observe is *linearizable*: each
operation appears to take effect atomically at one instant between its invocation and its response,
and the sequence of those instants is a legal run of the sequential specification (the *model*).
Users record what their clients saw (`HistoryRecorder`), then `check` the history against a `Model`
of their state machine; dengine's own tests do the same against the built-in KV store (`KVModel`).

The search is Wing & Gong's (1993) algorithm with Lowe's (2017) memoization: walk the time-ordered
list of call/return events, try to linearize any operation whose call has been seen, backtrack when
an operation's return is reached before it was linearized, and never revisit a (set of linearized
operations, model state) configuration. Before searching, the model may split the history into
independent sub-histories (P-compositionality: for the KV store, one per key), because a history is
linearizable exactly when each of those is, and the search cost is exponential in the worst case.
Three reductions, each of which only skips work that provably cannot succeed where something
already tried failed, keep typical histories near linear: an operation that cannot change the
state (a read) is linearized as soon as it is legal, without trying alternatives; operations
without a response take effect only in short runs just before an operation that needs them; and a
configuration is skipped when one with fewer such operations used up already failed.

Choices that matter to users:

* Intervals are closed. An operation that returns at `t` and one that is invoked at the same `t` are
  treated as concurrent, so they may be ordered either way. Clocks with coarse ticks therefore never
  produce a false alarm. Ties are broken only where the order is known: `HistoryRecorder` numbers
  every call and return it timestamps itself, in the order it records them, so a driver on a
  virtual clock that issues the next operation from the previous one's callback (same instant)
  keeps its program order.
* An operation without a response (`ret is None`: the client timed out or crashed) may take effect
  at any time after its call, or never. Read-only ones cannot affect anyone and are dropped.
* A search that exceeds its step `budget` or `timeout` yields ``ok=None`` (unknown), never a pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from math import inf, isnan
from time import monotonic
from typing import Any, Literal, Protocol, TypeAlias, TypeVar

__all__ = [
    "CheckResult",
    "HistoryRecorder",
    "KVInput",
    "KVModel",
    "KVOutput",
    "Model",
    "Operation",
    "PartitionResult",
    "RegisterInput",
    "RegisterModel",
    "check",
]


# ---- history ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation as the client observed it: what it asked, when, and what it got back.

    `client` identifies the issuer; it appears in error messages only, since the checker needs no
    more than the intervals. `call` and `ret` may be wall-clock or virtual times, in any unit, as
    long as all operations of a history share one clock. `ret is None` marks an indeterminate
    operation (timed out, connection lost, client crashed): it may have taken effect at any time
    after `call`, or never, and its `output` is ignored. `call == ret` is accepted because virtual
    clocks need not advance during an operation.

    `call_seq` and `ret_seq` order events that share one time: among events at equal times that
    both carry one, the lower number happened first (`HistoryRecorder` sets them). Events at equal
    times without them are taken as concurrent.
    """

    client: int
    input: Any
    call: float
    output: Any = None
    ret: float | None = None
    call_seq: int | None = field(default=None, compare=False)
    ret_seq: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isnan(self.call):
            raise ValueError(f"operation call time is NaN: {self!r}")
        # `not ret >= call` also rejects a NaN return time.
        if self.ret is not None and not self.ret >= self.call:
            raise ValueError(f"operation returns before it is called (ret < call): {self!r}")

    @property
    def indeterminate(self) -> bool:
        """True when the client never learned the outcome, so the operation may or may not have
        taken effect."""
        return self.ret is None


@dataclass(slots=True)
class _Pending:
    client: int
    input: Any
    call: float
    call_seq: int | None
    output: Any = None
    ret: float | None = None
    ret_seq: int | None = None


class HistoryRecorder:
    """Collects operations from a test driver, which need not know the outcome of every call.

    Call `invoke` just before sending a request and `complete` when its response arrives. Requests
    that never complete (timeouts, crashed clients) appear in `history()` as indeterminate, which is
    the only safe reading: the service may have applied them. Use `discard` only for a request the
    service certainly never applied (for example, one rejected before it was sent). The recorder is
    thread-safe so that drivers with client threads can share one.

    Calls and returns timestamped by the recorder's own clock (no `time` passed) are also numbered
    in the order recorded, so that events at one instant keep their real order (see `Operation`);
    a time passed by the caller says nothing about order within its instant.
    """

    def __init__(self, clock: Callable[[], float] = monotonic) -> None:
        """`clock` supplies times for calls that do not pass one; the default suits real clusters,
        a simulation should pass its virtual clock."""
        self._clock = clock
        self._ops: dict[int, _Pending] = {}
        self._next_id = 0
        self._next_seq = 0
        self._lock = threading.Lock()

    def _stamp(self, time: float | None) -> tuple[float, int | None]:
        """The time of an event and its number (called with the lock held)."""
        if time is not None:
            return time, None
        self._next_seq += 1
        return self._clock(), self._next_seq

    def invoke(self, client: int, input: Any, time: float | None = None) -> int:
        """Records that `client` issued `input` at `time` (default: now); returns the id to
        complete it with."""
        with self._lock:
            call, seq = self._stamp(time)
            op_id = self._next_id
            self._next_id += 1
            self._ops[op_id] = _Pending(client, input, call, seq)
        return op_id

    def complete(self, op_id: int, output: Any = None, time: float | None = None) -> None:
        """Records the response `output` of operation `op_id`, received at `time` (default: now)."""
        with self._lock:
            ret, seq = self._stamp(time)
            pending = self._ops.get(op_id)
            if pending is None:
                raise KeyError(f"unknown or discarded operation id {op_id}")
            if pending.ret is not None:
                raise ValueError(f"operation {op_id} was already completed")
            if not ret >= pending.call:
                raise ValueError(f"operation {op_id} completes at {ret}, before its call at {pending.call}")
            pending.output = output
            pending.ret = ret
            pending.ret_seq = seq

    def discard(self, op_id: int) -> None:
        """Forgets operation `op_id`, which the service is known never to have applied."""
        with self._lock:
            if self._ops.pop(op_id, None) is None:
                raise KeyError(f"unknown or discarded operation id {op_id}")

    def history(self) -> list[Operation]:
        """The recorded operations in invocation order; those not completed are indeterminate."""
        with self._lock:
            pending = list(self._ops.values())
        return [
            Operation(
                p.client,
                p.input,
                p.call,
                p.output if p.ret is not None else None,
                p.ret,
                p.call_seq,
                p.ret_seq if p.ret is not None else None,
            )
            for p in pending
        ]


# ---- models -----------------------------------------------------------------------------------

S = TypeVar("S", bound=Hashable)
I_contra = TypeVar("I_contra", contravariant=True)
O_contra = TypeVar("O_contra", contravariant=True)


class Model(Protocol[S, I_contra, O_contra]):
    """The sequential specification a history is checked against.

    States must be hashable and compare by value: the search remembers which (operations done,
    state) configurations it already explored, and that memo is what keeps it fast. Subclass
    `Model` explicitly to inherit the defaults of the optional methods (one partition, no read-only
    operations, `repr`-based descriptions); `init`, `step` and `step_unknown` have no sensible
    default.
    """

    def init(self) -> S:
        """The state before any operation."""
        ...

    def step(self, state: S, input: I_contra, output: O_contra) -> tuple[bool, S]:
        """Whether `output` is a legal response to `input` in `state`, and the state after it."""
        ...

    def step_unknown(self, state: S, input: I_contra) -> S:
        """The state after `input` takes effect in `state` when its response was never seen.

        Used for indeterminate operations; the possibility that the operation never took effect is
        explored separately by the checker, so this only describes the case where it did.
        """
        ...

    def read_only(self, input: I_contra) -> bool:
        """True if `input` can never change the state, so an indeterminate one can be dropped.

        Dropping is safe because an unobserved read constrains nothing; it also shrinks the search.
        Defaults to False, which is always correct but slower.
        """
        return False

    def unchanged(self, input: I_contra, output: O_contra) -> bool:
        """True if an operation with this response leaves the state as it was, wherever it is legal
        (a read; a compare-and-swap that reports failure).

        Purely a speed-up: such an operation can be linearized as early as possible, which spares
        the checker most of its backtracking. Defaults to `read_only(input)`.
        """
        return self.read_only(input)

    def blind(self, input: I_contra) -> bool:
        """True if the state after `input` does not depend on the state before (put, delete).

        Purely a speed-up for histories with indeterminate operations: the effect of a blind one
        erases whatever unobserved operations took effect just before it, so the checker need not
        try those combinations. Defaults to False, which is always correct.
        """
        return False

    def partition(self, ops: Sequence[Operation]) -> list[Sequence[Operation]]:
        """Splits `ops` into sub-histories that cannot affect one another, each checked alone.

        Only split where the specification is truly independent (such as distinct keys of a map):
        the search is exponential in the worst case, and each part is much cheaper than the whole.
        Defaults to a single partition.
        """
        return [ops]

    def describe_partition(self, ops: Sequence[Operation]) -> str:
        """A name for the sub-history `ops` in error messages, such as the key it touches."""
        return "history"

    def describe_input(self, input: I_contra) -> str:
        """`input` as a person reads it; used for indeterminate operations, which have no output."""
        return repr(input)

    def describe(self, input: I_contra, output: O_contra) -> str:
        """An operation and its response as a person reads them, for error messages."""
        return f"{self.describe_input(input)} -> {output!r}"


# -- the built-in KV store --

KVOutput: TypeAlias = bytes | bool | None


@dataclass(frozen=True, slots=True)
class KVInput:
    """A request to dengine's built-in KV store.

    `value` is the value written by put and the new value of cas. For cas, `expected` is the value
    the key must hold for the swap to happen, and None means the key must be absent.
    """

    op: Literal["put", "get", "delete", "cas"]
    key: bytes
    value: bytes | None = None
    expected: bytes | None = None

    def __post_init__(self) -> None:
        if self.op not in ("put", "get", "delete", "cas"):
            raise ValueError(f"unknown KV operation {self.op!r}; expected put, get, delete or cas")
        if self.op in ("put", "cas") and self.value is None:
            raise ValueError(f"KV {self.op} needs a value")


def _call_text(inp: KVInput) -> str:
    if inp.op == "put":
        return f"put({inp.key!r}, {inp.value!r})"
    if inp.op == "cas":
        return f"cas({inp.key!r}, expected={inp.expected!r}, new={inp.value!r})"
    return f"{inp.op}({inp.key!r})"


class KVModel(Model["bytes | None", KVInput, KVOutput]):
    """dengine's built-in KV store: put, get, delete and compare-and-swap on independent keys.

    Responses: put → anything (ignored, so servers may return revisions); get → the value, or None
    when the key is absent; delete → True if the key existed; cas → True if it swapped. The history
    is partitioned per key, and the state of each partition is the value of its one key (None when
    absent), which is why the checker stays fast on histories over many keys.
    """

    def init(self) -> bytes | None:
        """Every key starts absent."""
        return None

    def step(self, state: bytes | None, input: KVInput, output: KVOutput) -> tuple[bool, bytes | None]:
        """Applies `input` to the key's value `state`; checks `output` against the result."""
        op = input.op
        if op == "get":
            return output == state, state
        if op == "put":
            return True, input.value
        if op == "delete":
            return output == (state is not None), None
        swapped = state == input.expected
        return output == swapped, input.value if swapped else state

    def step_unknown(self, state: bytes | None, input: KVInput) -> bytes | None:
        """The key's value after `input` took effect with an unseen response."""
        op = input.op
        if op == "put":
            return input.value
        if op == "delete":
            return None
        if op == "cas":
            return input.value if state == input.expected else state
        return state

    def read_only(self, input: KVInput) -> bool:
        """Only get leaves the store unchanged."""
        return input.op == "get"

    def unchanged(self, input: KVInput, output: KVOutput) -> bool:
        """get, and a delete or cas that reports it did nothing."""
        return input.op == "get" or (input.op in ("delete", "cas") and output is False)

    def blind(self, input: KVInput) -> bool:
        """put and delete set the key's value without reading it."""
        return input.op in ("put", "delete")

    def partition(self, ops: Sequence[Operation]) -> list[Sequence[Operation]]:
        """One sub-history per key, in order of each key's first appearance."""
        by_key: dict[bytes, list[Operation]] = {}
        for op in ops:
            by_key.setdefault(op.input.key, []).append(op)
        return list(by_key.values())

    def describe_partition(self, ops: Sequence[Operation]) -> str:
        """Names the key."""
        return f"key {ops[0].input.key!r}" if ops else "no key"

    def describe_input(self, input: KVInput) -> str:
        """Such as ``put(b'k', b'v')`` or ``cas(b'k', expected=None, new=b'v')``."""
        return _call_text(input)

    def describe(self, input: KVInput, output: KVOutput) -> str:
        """Such as ``get(b'k') -> b'v'``; put shows no response because its response is ignored."""
        if input.op == "put":
            return _call_text(input)
        return f"{_call_text(input)} -> {output!r}"


# -- a single register, mostly for tests and examples --


@dataclass(frozen=True, slots=True)
class RegisterInput:
    """A request to a single register: read, write `value`, or swap `expected` for `value`."""

    op: Literal["read", "write", "cas"]
    value: Hashable = None
    expected: Hashable = None

    def __post_init__(self) -> None:
        if self.op not in ("read", "write", "cas"):
            raise ValueError(f"unknown register operation {self.op!r}; expected read, write or cas")


class RegisterModel(Model[Hashable, RegisterInput, Hashable]):
    """One register holding any hashable value: read → the value, write → anything (ignored),
    cas → True if it swapped. The smallest useful model; handy to learn the checker with."""

    def __init__(self, initial: Hashable = None) -> None:
        """`initial` is the register's value before any operation."""
        self.initial = initial

    def init(self) -> Hashable:
        """The initial value."""
        return self.initial

    def step(self, state: Hashable, input: RegisterInput, output: Hashable) -> tuple[bool, Hashable]:
        """Applies `input` to the register value `state`; checks `output` against the result."""
        if input.op == "read":
            return output == state, state
        if input.op == "write":
            return True, input.value
        swapped = state == input.expected
        return output == swapped, input.value if swapped else state

    def step_unknown(self, state: Hashable, input: RegisterInput) -> Hashable:
        """The register value after `input` took effect with an unseen response."""
        if input.op == "write":
            return input.value
        if input.op == "cas":
            return input.value if state == input.expected else state
        return state

    def read_only(self, input: RegisterInput) -> bool:
        """Only read leaves the register unchanged."""
        return input.op == "read"

    def unchanged(self, input: RegisterInput, output: Hashable) -> bool:
        """read, and a cas that reports failure."""
        return input.op == "read" or (input.op == "cas" and output is False)

    def blind(self, input: RegisterInput) -> bool:
        """A write sets the value without reading it."""
        return input.op == "write"

    def describe(self, input: RegisterInput, output: Hashable) -> str:
        """Such as ``read() -> 3`` or ``cas(1, 2) -> True``."""
        if input.op == "write":
            return self.describe_input(input)
        return f"{self.describe_input(input)} -> {output!r}"

    def describe_input(self, input: RegisterInput) -> str:
        """Such as ``write(3)``."""
        if input.op == "read":
            return "read()"
        if input.op == "write":
            return f"write({input.value!r})"
        return f"cas({input.expected!r}, {input.value!r})"


# ---- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionResult:
    """The verdict on one independent sub-history (for the KV store, one key).

    `ok` is True (linearizable), False (not) or None (the search ran out of budget or time).
    `operations` counts the operations searched: unanswered read-only ones are dropped first.
    `linearization` is a witness order when ok; on failure, `longest_prefix` is the longest
    sequence of operations the search managed to linearize and `unlinearizable` the operations
    that had no legal place after it. `explanation` renders all of that for people.
    """

    index: int
    name: str
    ok: bool | None
    operations: int
    steps: int
    linearization: tuple[Operation, ...] = ()
    longest_prefix: tuple[Operation, ...] = ()
    unlinearizable: tuple[Operation, ...] = ()
    explanation: str = ""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict on a whole history: `ok` is True only if every partition is linearizable.

    `ok` is False as soon as one partition is proven non-linearizable, even if others ran out of
    budget, and None if none failed but some could not be decided: unknown is never a pass, which
    is also why the result is truthy only when `ok is True`. `str(result)` explains failures.
    """

    ok: bool | None
    partitions: tuple[PartitionResult, ...]

    @property
    def failures(self) -> tuple[PartitionResult, ...]:
        """The partitions proven non-linearizable."""
        return tuple(p for p in self.partitions if p.ok is False)

    @property
    def undecided(self) -> tuple[PartitionResult, ...]:
        """The partitions whose search exhausted its budget or timeout."""
        return tuple(p for p in self.partitions if p.ok is None)

    @property
    def steps(self) -> int:
        """Search steps spent over all partitions; a machine-independent measure of effort."""
        return sum(p.steps for p in self.partitions)

    def __bool__(self) -> bool:
        return self.ok is True

    def __str__(self) -> str:
        ops = sum(p.operations for p in self.partitions)
        count = len(self.partitions)
        summary = (
            f"{ops} operations in {count} partition{'' if count == 1 else 's'}, {self.steps} search steps"
        )
        if self.ok:
            return f"linearizable: {summary}"
        if self.ok is False:
            shown, head = self.failures, "NOT linearizable"
        else:
            shown, head = self.undecided, "UNKNOWN (search budget or timeout exhausted)"
        lines = [f"{head}: {len(shown)} of {count} partitions ({summary})"]
        lines.extend(p.explanation for p in shown)
        return "\n".join(lines)


# ---- the search -------------------------------------------------------------------------------

_MAX_SHOWN_PREFIX = 10
_MAX_SHOWN_CANDIDATES = 10
_MAX_REPR = 80
_MAX_CACHED_CLOSURES = 4096
_DEADLINE_CHECK_MASK = 1023  # look at the clock every 1024 steps; monotonic() is not free


def check(
    history: Sequence[Operation],
    model: Model[Any, Any, Any] | None = None,
    *,
    budget: int | None = None,
    timeout: float | None = None,
) -> CheckResult:
    """Decides whether `history` is linearizable with respect to `model` (default: `KVModel`).

    `budget` caps the search steps spent on each partition and `timeout` the wall-clock seconds
    spent on the whole check; a partition that hits either limit is reported as unknown
    (``ok=None``). The budget is the deterministic choice for tests: a typical history needs a
    few steps per operation, a pathological one exponentially many.
    """
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if model is None:
        model = KVModel()
    elif not all(hasattr(model, name) for name in _OPTIONAL_METHODS):
        model = _Completed(model)
    deadline = None if timeout is None else monotonic() + timeout
    results = []
    for index, part in enumerate(model.partition(history)):
        if part:
            results.append(_Partition(model, part, index).search(budget, deadline))
    if any(r.ok is False for r in results):
        ok: bool | None = False
    elif any(r.ok is None for r in results):
        ok = None
    else:
        ok = True
    return CheckResult(ok, tuple(results))


_OPTIONAL_METHODS = (
    "read_only",
    "unchanged",
    "blind",
    "partition",
    "describe_partition",
    "describe_input",
    "describe",
)


class _Completed(Model[Any, Any, Any]):
    """A model given as a plain class, with `Model`'s defaults for the optional methods it lacks:
    the protocol asks only for `init`, `step` and `step_unknown`."""

    def __init__(self, model: Any) -> None:
        self._model = model
        # The model's own methods, bound, shadow this class's: no extra call on the search's path.
        for name in ("init", "step", "step_unknown", *_OPTIONAL_METHODS):
            method = getattr(model, name, None)
            if method is not None:
                setattr(self, name, method)

    def init(self) -> Any:
        return self._model.init()

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:
        return self._model.step(state, input, output)  # type: ignore[no-any-return]

    def step_unknown(self, state: Any, input: Any) -> Any:
        return self._model.step_unknown(state, input)


# One search step: the indeterminate ops that take effect first, each with the state after it, then the
# definite op; its bits mark those indeterminate ops.
_Run: TypeAlias = "tuple[tuple[int, Any], ...]"
_Child: TypeAlias = "tuple[_Run, int, int, Any]"  # (run, bits of the run's ops, definite op, state after)
# The linearized prefix as an immutable linked list of (steps, total ops, rest), newest first: the
# deepest prefix can then be kept, to explain a failure, without copying it.
_Path: TypeAlias = "tuple[_Run, int, _Path | None]"


class _Exhausted(Exception):
    """Raised inside the search when the step budget or the deadline runs out."""


@dataclass(slots=True)
class _Node:
    """A configuration on the search stack: what is linearized, the state, the choices left."""

    state: Any
    done: int  # bit i set: definite op i is linearized
    used: int  # bit i set: indeterminate op i has taken effect
    length: int  # ops linearized in all
    path: _Path | None
    pushed: tuple[int, ...]  # ops linearized by the step that led here, to undo on backtracking
    definite: list[int]  # definite ops that may come next
    pending: list[int]  # indeterminate ops that may take effect before those
    blocking: int  # the definite op with the earliest return: it must come before any later call
    children: Iterator[_Child]


def _walk(path: _Path | None) -> list[tuple[int, Any]]:
    """The (op, state after it) pairs of a linked prefix, oldest first."""
    runs = []
    while path is not None:
        runs.append(path[0])
        path = path[2]
    return [pair for run in reversed(runs) for pair in run]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


class _Partition:
    """One sub-history prepared for the search: its operations and their time-ordered events.

    The search is depth-first over configurations (definite ops done, indeterminate ops used,
    state). From each one it tries every definite op that may come next (its call precedes the
    earliest pending return), first directly, then preceded by a run of indeterminate ops taking
    effect. Indeterminate ops never have to take effect, so only runs that reach a state no smaller
    run reaches are tried, and a configuration is skipped when one with the same definite ops and
    state but a subset of its indeterminate ops already failed: anything the larger set can do, the
    smaller can too. With no indeterminate ops this is exactly Lowe's memoized Wing & Gong search;
    with them it avoids trying every subset of the timed-out ops at every step.
    """

    def __init__(self, model: Model[Any, Any, Any], part: Sequence[Operation], index: int) -> None:
        self.model = model
        self.index = index
        self.name = model.describe_partition(part)
        self.ops = [op for op in part if op.ret is not None or not model.read_only(op.input)]
        self.inputs = [op.input for op in self.ops]
        self.is_definite = [op.ret is not None for op in self.ops]
        self.outputs = [op.output for op in self.ops]
        n = len(self.ops)
        # At equal times, events numbered by the recorder keep their recorded order; an unnumbered
        # call sorts before them and an unnumbered return after them, so an op returning at t and
        # one called at t overlap unless their order is known: the tie rule that never rejects a
        # valid history. Indeterminate returns sort at +inf after every definite return, even one
        # at +inf. An event is (time, group, number, kind, op); kind 0 call, 1 return, 2 none.
        events = sorted(
            [
                (op.call, 0, 0, 0, i) if op.call_seq is None else (op.call, 1, op.call_seq, 0, i)
                for i, op in enumerate(self.ops)
            ]
            + [
                (inf, 3, 0, 2, i)
                if op.ret is None
                else (op.ret, 2, 0, 1, i)
                if op.ret_seq is None
                else (op.ret, 1, op.ret_seq, 1, i)
                for i, op in enumerate(self.ops)
            ]
        )
        # A doubly linked list over the events, between sentinel entries `head` and `tail`; the
        # entries of linearized ops are unlinked, so the calls before the first return left in the
        # list are exactly the ops that may be linearized next.
        self.head, self.tail = 2 * n, 2 * n + 1
        self.nxt = [*range(1, 2 * n), self.tail, 0 if n else self.tail, self.tail]
        self.prv = [self.head, *range(2 * n - 1), self.head, 2 * n - 1 if n else self.head]
        self.entry_op = [i for *_, i in events]
        self.kind = [kind for *_, kind, _ in events]
        self.call_entry = [0] * n
        self.ret_entry = [0] * n
        for e, (*_, kind, i) in enumerate(events):
            if kind:
                self.ret_entry[i] = e
            else:
                self.call_entry[i] = e
        self.blind = [model.blind(op.input) for op in self.ops]
        self.passive = [op.ret is not None and model.unchanged(op.input, op.output) for op in self.ops]
        self.closures: dict[tuple[Any, tuple[int, ...]], list[tuple[_Run, int, Any]]] = {}
        self.steps = 0
        self.budget: int | None = None
        self.deadline: float | None = None

    def _unlink(self, i: int) -> None:
        """Takes op i's call and return entries out of the event list once it is linearized."""
        nxt, prv = self.nxt, self.prv
        for e in (self.call_entry[i], self.ret_entry[i]):
            nxt[prv[e]] = nxt[e]
            prv[nxt[e]] = prv[e]

    def _relink(self, i: int) -> None:
        """Undoes `_unlink(i)`; exact as long as undos come in LIFO order ("dancing links")."""
        nxt, prv = self.nxt, self.prv
        for e in (self.ret_entry[i], self.call_entry[i]):
            nxt[prv[e]] = e
            prv[nxt[e]] = e

    def _tick(self) -> None:
        self.steps += 1
        if self.budget is not None and self.steps > self.budget:
            self.steps -= 1
            raise _Exhausted
        if (
            self.deadline is not None
            and not self.steps & _DEADLINE_CHECK_MASK
            and monotonic() > self.deadline
        ):
            raise _Exhausted

    def _node(self, state: Any, done: int, used: int, path: _Path | None, pushed: tuple[int, ...]) -> _Node:
        """The configuration reached by `pushed`, whose ops are already unlinked."""
        definite: list[int] = []
        pending: list[int] = []
        is_definite, kind, entry_op, nxt = self.is_definite, self.kind, self.entry_op, self.nxt
        e = nxt[self.head]
        # Only called while a definite op is pending, and its return sorts before every
        # indeterminate return, so the first return reached is a definite op's.
        while not kind[e]:
            i = entry_op[e]
            (definite if is_definite[i] else pending).append(i)
            e = nxt[e]
        length = 0 if path is None else path[1]
        children = self._children(state, definite, pending)
        return _Node(state, done, used, length, path, pushed, definite, pending, self.entry_op[e], children)

    def _children(self, state: Any, definite: list[int], pending: list[int]) -> Iterator[_Child]:
        """The legal next steps from `state`, cheapest first, generated lazily because a valid
        history usually needs only the first."""
        step, inputs, outputs, tick = self.model.step, self.inputs, self.outputs, self._tick
        blind, passive = self.blind, self.passive
        direct = []
        after_run = []  # the definite ops worth trying after a run of indeterminate ones
        for d in definite:
            tick()
            legal, after = step(state, inputs[d], outputs[d])
            if not legal:
                after_run.append(d)
                continue
            if passive[d]:
                # An op that never changes the state where it is legal (a read, a failed cas) can
                # go first in any linearization that places it later, so no alternative needs
                # exploring. This one rule removes most backtracking on read/write races.
                yield (), 0, d, after
                return
            direct.append(((), 0, d, after))
            if not blind[d]:
                # Legal now, and a blind op leads to the same state after any run: covered by this.
                after_run.append(d)
        yield from direct
        if not pending or not after_run:
            return
        for run, run_bits, mid in self._closure(state, pending):
            for d in after_run:
                tick()
                legal, after = step(mid, inputs[d], outputs[d])
                if legal:
                    yield run, run_bits, d, after

    def _closure(self, state: Any, pending: list[int]) -> list[tuple[_Run, int, Any]]:
        """The runs of indeterminate ops worth taking effect from `state`: (run, its op bits, state).

        Breadth first, so smaller runs come first, and a run is dropped when a subset of it reaches
        the same state (the subset leaves more ops available later). A blind op erases what came
        before it, so it only ever starts a run. Cached, because failing configurations near each
        other share the state and the pending ops.
        """
        key = (state, tuple(pending))
        cached = self.closures.get(key)
        if cached is not None:
            return cached
        step_unknown, inputs, blind, tick = self.model.step_unknown, self.inputs, self.blind, self._tick
        out: list[tuple[_Run, int, Any]] = []
        # `bits` index `pending` (small ints, cheap subset tests); `op_bits` index ops.
        smallest: dict[Any, list[int]] = {state: [0]}
        blind_effects: set[Any] = set()
        frontier: list[tuple[_Run, int, int, Any]] = [((), 0, 0, state)]
        while frontier:
            deeper = []
            for run, bits, op_bits, before in frontier:
                for j, w in enumerate(pending):
                    new_bits = bits | 1 << j
                    if new_bits == bits or (run and blind[w]):
                        continue
                    tick()
                    mid = step_unknown(before, inputs[w])
                    if blind[w]:
                        # Blind ops with equal effects are interchangeable from here on: both are
                        # pending now, their effect ignores the state, and neither constrains when
                        # others happen. Trying the first one is enough.
                        if mid in blind_effects:
                            continue
                        blind_effects.add(mid)
                    known = smallest.setdefault(mid, [])
                    if any(k | new_bits == new_bits for k in known):
                        continue
                    known.append(new_bits)
                    new_run = (*run, (w, mid))
                    new_op_bits = op_bits | 1 << w
                    deeper.append((new_run, new_bits, new_op_bits, mid))
                    out.append((new_run, new_op_bits, mid))
            frontier = deeper
        if len(self.closures) >= _MAX_CACHED_CLOSURES:
            self.closures.clear()
        self.closures[key] = out
        return out

    def search(self, budget: int | None, deadline: float | None) -> PartitionResult:
        """Decides this partition; see the class docstring for the search."""
        self.budget, self.deadline = budget, deadline
        remaining = sum(self.is_definite)
        if not remaining:
            return PartitionResult(self.index, self.name, True, len(self.ops), 0)
        # (definite ops done, state) -> the minimal sets of indeterminate ops with which that
        # configuration was fully explored and failed. Recorded only once a configuration is
        # finished, so a pruned one is always covered by a finished search.
        failed: dict[tuple[int, Any], list[int]] = {}
        node = self._node(self.model.init(), 0, 0, None, ())
        stack: list[_Node] = []
        deepest = node
        try:
            while True:
                child = next(node.children, None)
                if child is None:
                    known = failed.setdefault((node.done, node.state), [])
                    known[:] = [k for k in known if node.used & ~k]
                    known.append(node.used)
                    if node.length > deepest.length:
                        deepest = node
                    if not stack:
                        return self._failed(deepest)
                    for i in reversed(node.pushed):
                        self._relink(i)
                    remaining += 1
                    node = stack.pop()
                    continue
                run, run_bits, d, after = child
                done, used = node.done | 1 << d, node.used | run_bits
                smaller = failed.get((done, after))
                if smaller and any(k | used == used for k in smaller):
                    continue
                pushed = (*(w for w, _ in run), d)
                for i in pushed:
                    self._unlink(i)
                remaining -= 1
                stack.append(node)
                path = ((*run, (d, after)), node.length + len(pushed), node.path)
                if not remaining:
                    break
                node = self._node(after, done, used, path, pushed)
        except _Exhausted:
            return self._undecided(budget, node if node.length > deepest.length else deepest)
        order = tuple(self.ops[i] for i, _ in _walk(path))
        return PartitionResult(self.index, self.name, True, len(self.ops), self.steps, linearization=order)

    def _op_text(self, op: Operation) -> str:
        if op.ret is None:
            what = f"{self.model.describe_input(op.input)} -> ? (no response)"
        else:
            what = self.model.describe(op.input, op.output)
        if len(what) > 2 * _MAX_REPR:
            what = what[: 2 * _MAX_REPR - 3] + "..."
        ret = "?" if op.ret is None else f"{op.ret:g}"
        return f"client {op.client} [{op.call:g}, {ret}] {what}"

    def _prefix_lines(self, done: list[tuple[int, Any]]) -> list[str]:
        skipped = max(0, len(done) - _MAX_SHOWN_PREFIX)
        lines = [f"    ... {skipped} earlier operations"] if skipped else []
        width = len(str(len(done)))
        for k in range(skipped, len(done)):
            i, after = done[k]
            lines.append(f"    {k + 1:{width}}. {self._op_text(self.ops[i])}  => {_short(after)}")
        return lines

    def _failed(self, dead: _Node) -> PartitionResult:
        ops = self.ops
        done = _walk(dead.path)
        lines = [f"{self.name}: not linearizable ({len(ops)} operations)"]
        if done:
            lines.append(f"  longest linearizable prefix found ({len(done)} operations, => state after):")
            lines.extend(self._prefix_lines(done))
            where = f"then, in state {_short(dead.state)}"
        else:
            where = f"from the initial state {_short(dead.state)}"
        lines.append(f"  {where}, none of these operations can take effect next:")
        for i in (dead.definite + dead.pending)[:_MAX_SHOWN_CANDIDATES]:
            op = ops[i]
            if i == dead.blocking:
                why = f"must take effect by its return at {op.ret:g}, but has no legal place"
            elif op.ret is None:
                why = "may take effect here, but that does not help"
            elif not self.model.step(dead.state, op.input, op.output)[0]:
                why = "illegal in this state"
            else:
                why = "legal here, but then the others cannot all be linearized"
            lines.append(f"    {self._op_text(op)}  <- {why}")
        hidden = len(dead.definite) + len(dead.pending) - _MAX_SHOWN_CANDIDATES
        if hidden > 0:
            lines.append(f"    ... {hidden} more")
        return PartitionResult(
            self.index,
            self.name,
            False,
            len(ops),
            self.steps,
            longest_prefix=tuple(ops[i] for i, _ in done),
            unlinearizable=tuple(ops[i] for i in dead.definite + dead.pending),
            explanation="\n".join(lines),
        )

    def _undecided(self, budget: int | None, dead: _Node) -> PartitionResult:
        limit = "the step budget" if budget is not None and self.steps >= budget else "the timeout"
        prefix = tuple(self.ops[i] for i, _ in _walk(dead.path))
        text = (
            f"{self.name}: undecided, {limit} ran out after {self.steps} steps ({len(self.ops)} operations);"
            f" deepest partial linearization so far: {len(prefix)} operations"
        )
        return PartitionResult(
            self.index, self.name, None, len(self.ops), self.steps, longest_prefix=prefix, explanation=text
        )
