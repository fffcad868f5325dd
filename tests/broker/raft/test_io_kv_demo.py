"""The demo key-value state machine: commands, malformed input, snapshots."""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from broker.raft.kv_demo import (
    MALFORMED,
    KeyValueStore,
    decode_command,
    encode_cas,
    encode_get,
    encode_put,
)
from broker.raft.messages import Configuration, Entry, EntryKind, Snapshot


def entries(*datas: bytes) -> list[Entry]:
    return [Entry(term=1, index=i, data=data) for i, data in enumerate(datas, start=1)]


def test_commands_apply_in_order():
    store = KeyValueStore()
    results = [
        store.apply(entry)
        for entry in entries(
            b"",  # a leader's no-op
            encode_put(b"k", b"1"),
            encode_cas(b"k", b"0", b"2"),
            encode_cas(b"k", b"1", b"2"),
            encode_cas(b"new", None, b"x"),
            encode_get(b"k"),
        )
    ]
    assert results == [None, None, False, True, True, b"2"]
    assert store.data == {b"k": b"2", b"new": b"x"} and store.applied_index == 6


def test_config_change_entries_are_observed_only():
    store = KeyValueStore()
    entry = Entry(term=1, index=1, kind=EntryKind.CONFIG_CHANGE, data=b"\x92\x00\x04")
    assert store.apply(entry) is None and store.data == {}


@given(st.binary(max_size=64))
def test_malformed_commands_are_deterministic_no_ops(data):
    store = KeyValueStore()
    result = store.apply(Entry(term=1, index=1, data=data))
    if decode_command(data) is None and data:
        assert result == MALFORMED and store.data == {}


def test_wrongly_typed_commands_are_malformed():
    for command in (["put", "text", b"v"], ["cas", b"k", b"e"], ["get"], ["drop", b"k"], {}):
        assert decode_command(msgpack.packb(command)) is None


def test_snapshot_round_trip():
    store = KeyValueStore()
    for entry in entries(encode_put(b"a", b"1"), encode_put(b"b", b"2")):
        store.apply(entry)
    snapshot = Snapshot(
        index=2, term=1, configuration=Configuration(voters=frozenset({1})), data=store.snapshot()
    )
    restored = KeyValueStore()
    restored.restore(snapshot)
    assert restored.data == store.data and restored.applied_index == 2
