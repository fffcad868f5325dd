"""The hard state file: round trip, alternating slots, damage detection and fallback."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.raft.hard_state_file import (
    SLOT_NAMES,
    HardStateCorruptError,
    HardStateFile,
    PersistentState,
    decode_state,
    encode_state,
)
from broker.raft.messages import Configuration, HardState


def state(term: int, vote: int = 0, commit: int = 0, voters=(1, 2, 3), learners=()):
    return PersistentState(
        hard_state=HardState(term=term, vote=vote, commit=commit),
        configuration=Configuration(voters=frozenset(voters), learners=frozenset(learners)),
    )


@given(
    sequence=st.integers(0, 2**63),
    term=st.integers(0, 2**63),
    vote=st.integers(0, 2**32),
    commit=st.integers(0, 2**63),
    nodes=st.lists(st.integers(1, 2**32), unique=True, max_size=20),
    split=st.integers(0, 20),
)
def test_encoding_round_trips(sequence, term, vote, commit, nodes, split):
    original = state(term, vote, commit, nodes[:split], nodes[split:])
    assert decode_state(encode_state(sequence, original)) == (sequence, original)


@given(data=st.data())
def test_any_damage_is_detected(data):
    encoded = bytearray(encode_state(7, state(5, 2, 9)))
    position = data.draw(st.integers(0, len(encoded) - 1))
    flip = data.draw(st.integers(1, 255))
    encoded[position] ^= flip
    with pytest.raises(HardStateCorruptError):
        decode_state(bytes(encoded))


@given(cut=st.integers(0, 40))
def test_any_truncation_is_detected(cut):
    encoded = encode_state(7, state(5, 2, 9))
    if cut < len(encoded):
        with pytest.raises(HardStateCorruptError):
            decode_state(encoded[:cut])


def test_new_directory_has_no_state(tmp_path):
    assert HardStateFile(tmp_path).load() is None


def test_store_then_load_returns_newest(tmp_path):
    file = HardStateFile(tmp_path)
    for term in range(1, 6):
        file.store(state(term, vote=1, commit=term))
    assert HardStateFile(tmp_path).load() == state(5, vote=1, commit=5)
    assert sorted(os.listdir(tmp_path)) == sorted(SLOT_NAMES)


def test_damaged_newest_copy_falls_back_to_previous(tmp_path):
    file = HardStateFile(tmp_path)
    file.store(state(1))
    file.store(state(2))  # lands in the other slot
    newest = tmp_path / SLOT_NAMES[1]
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    reloaded = HardStateFile(tmp_path)
    assert reloaded.load() == state(1)
    # The next write must not overwrite the only good copy's slot... it goes to the damaged one.
    reloaded.store(state(3))
    assert HardStateFile(tmp_path).load() == state(3)
    (tmp_path / SLOT_NAMES[1]).write_bytes(b"garbage")
    assert HardStateFile(tmp_path).load() == state(1)


def test_torn_newest_copy_falls_back(tmp_path):
    file = HardStateFile(tmp_path)
    file.store(state(1))
    file.store(state(2))
    newest = tmp_path / SLOT_NAMES[1]
    whole = newest.read_bytes()
    for cut in range(len(whole)):
        newest.write_bytes(whole[:cut])
        assert HardStateFile(tmp_path).load() == state(1)


def test_every_copy_damaged_raises(tmp_path):
    file = HardStateFile(tmp_path)
    file.store(state(1))
    (tmp_path / SLOT_NAMES[0]).write_bytes(b"\x00" * 10)
    with pytest.raises(HardStateCorruptError):
        HardStateFile(tmp_path).load()


def test_leftover_temporary_file_is_ignored(tmp_path):
    file = HardStateFile(tmp_path)
    file.store(state(4))
    (tmp_path / (SLOT_NAMES[1] + ".tmp")).write_bytes(b"half a write")
    reloaded = HardStateFile(tmp_path)
    assert reloaded.load() == state(4)
    reloaded.remove_temporary_files()
    assert sorted(os.listdir(tmp_path)) == [SLOT_NAMES[0]]
