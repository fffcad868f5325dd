"""The linearizability checker used by the simulation: known histories, and random
histories built from a real sequential execution (always linearizable)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from simulation.linearizability import (
    UNKNOWN,
    Operation,
    check_history,
    check_register,
    describe,
    step,
)


def op(kind, start, end, output=UNKNOWN, *, value=None, expected=None, key=b"k", client=1):
    operation = Operation(
        client=client, kind=kind, key=key, value=value, expected=expected, invoked_at=start
    )
    if end is not None:
        operation.completes(end, output)
    return operation


def test_sequential_history_is_linearizable():
    history = [
        op("put", 0, 1, None, value=b"a"),
        op("get", 2, 3, b"a"),
        op("cas", 4, 5, True, expected=b"a", value=b"b"),
        op("cas", 6, 7, False, expected=b"a", value=b"c"),
        op("get", 8, 9, b"b"),
    ]
    assert check_history(history).linearizable


def test_a_stale_read_is_not_linearizable():
    history = [
        op("put", 0, 1, None, value=b"a"),
        op("put", 2, 3, None, value=b"b"),
        op("get", 4, 5, b"a"),
    ]
    result = check_history(history)
    assert not result.linearizable and result.key == b"k"
    assert "not linearizable" in describe(result)


def test_concurrent_operations_may_take_effect_in_either_order():
    history = [
        op("put", 0, 10, None, value=b"a", client=1),
        op("put", 1, 9, None, value=b"b", client=2),
        op("get", 11, 12, b"a", client=3),
    ]
    assert check_history(history).linearizable
    history[-1] = op("get", 11, 12, b"b", client=3)
    assert check_history(history).linearizable
    history[-1] = op("get", 11, 12, None, client=3)
    assert not check_history(history).linearizable


def test_reads_must_agree_on_one_order():
    history = [
        op("put", 0, 10, None, value=b"a", client=1),
        op("put", 0, 10, None, value=b"b", client=2),
        op("get", 11, 12, b"a", client=3),
        op("get", 13, 14, b"b", client=4),
    ]
    assert not check_history(history).linearizable


def test_an_operation_with_unknown_outcome_may_or_may_not_happen():
    lost = op("put", 0, None, value=b"x")
    assert check_history([lost, op("get", 5, 6, None)]).linearizable
    assert check_history([lost, op("get", 5, 6, b"x")]).linearizable
    # ...but not before it began, and not undone once seen.
    assert not check_history(
        [op("get", 0, 1, b"x", client=2), op("put", 2, None, value=b"x")]
    ).linearizable
    seen_then_gone = [lost, op("get", 5, 6, b"x", client=2), op("get", 7, 8, None, client=3)]
    assert not check_history(seen_then_gone).linearizable


def test_keys_are_checked_independently():
    history = [
        op("put", 0, 1, None, value=b"a", key=b"x"),
        op("put", 0, 1, None, value=b"b", key=b"y"),
        op("get", 2, 3, b"a", key=b"x"),
        op("get", 2, 3, None, key=b"y"),
    ]
    result = check_history(history)
    assert not result.linearizable and result.key == b"y"


def test_step_models_cas():
    cas = op("cas", 0, 1, True, expected=None, value=b"v")
    assert step(None, cas) == (True, b"v")
    assert step(b"w", cas) == (False, b"w")
    assert step(b"w", op("cas", 0, None, expected=None, value=b"v")) == (True, b"w")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 14))
def test_histories_of_a_real_execution_are_linearizable(seed, count):
    """Run operations one by one on a register, each at a linearization point inside an
    interval that may overlap others; some lose their response (outcome unknown)."""
    rng = random.Random(seed)
    state = None
    history = []
    for number in range(count):
        point = number * 10 + 5
        start = point - rng.uniform(0, 25)
        end = point + rng.uniform(0, 25)
        kind = rng.choice(["put", "get", "cas"])
        value = b"v%d" % number
        expected = rng.choice([None, state, b"v0"])
        operation = op(kind, start, None, value=value if kind != "get" else None, expected=expected)
        possible, after = step(state, operation)
        assert possible
        output = {"put": None, "get": state, "cas": state == expected}[kind]
        state = after
        if kind == "get" or rng.random() > 0.2:
            operation.completes(end, output)
        history.append(operation)
    ok, _ = check_register(history)
    assert ok
