"""DurableStorage after crashes and damage: torn tails at every byte, flipped bytes, torn
truncations, segments a crash failed to delete, interrupted snapshots."""

from __future__ import annotations

import os
import shutil

import pytest

from broker.raft.durable_storage import (
    DurableStorage,
    DurableStorageConfig,
    StorageCorruptError,
    snapshot_file_name,
)
from broker.raft.hard_state_file import SLOT_NAMES
from broker.raft.messages import Configuration, Entry, HardState, Snapshot
from broker.storage.errors import StorageError

INITIAL = Configuration(voters=frozenset({1, 2, 3}))
SMALL = DurableStorageConfig(segment_bytes_max=600, cache_bytes_max=1)


def entry(index: int, term: int, size: int = 40) -> Entry:
    return Entry(term=term, index=index, data=bytes([index % 256, term % 256]) * (size // 2))


def segments(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".log"))


def reopen(directory, config=SMALL) -> DurableStorage:
    return DurableStorage.open(directory, INITIAL, config)


def test_a_torn_last_entry_at_every_byte_leaves_a_prefix(tmp_path):
    original = tmp_path / "original"
    storage = DurableStorage.open(original, INITIAL)
    written = [entry(i, 1 + i // 4) for i in range(1, 9)]
    storage.append(written[:-1])
    storage.set_hard_state(HardState(term=2, vote=1, commit=5))
    (name,) = segments(original)
    start = os.path.getsize(original / name)
    storage.append(written[-1:])
    end = os.path.getsize(original / name)
    storage.close()
    for cut in range(start, end + 1):
        crashed = tmp_path / f"cut{cut}"
        shutil.copytree(original, crashed)
        os.truncate(crashed / name, cut)
        recovered = reopen(crashed)
        expected = written if cut == end else written[:-1]
        assert recovered.last_index() == len(expected)
        assert recovered.entries(1, len(expected) + 1) == expected
        assert os.path.getsize(crashed / name) == (end if cut == end else start)
        recovered.append([entry(len(expected) + 1, 9)])  # and it is writable again
        recovered.close()
        shutil.rmtree(crashed)


def test_a_damaged_byte_drops_that_entry_and_everything_after(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL, SMALL)
    written = [entry(i, 1) for i in range(1, 31)]
    storage.append(written)
    storage.close()
    names = segments(tmp_path)
    assert len(names) >= 4
    victim = names[1]
    base = int(victim.split(".")[0])
    with open(tmp_path / victim, "r+b") as file:
        file.seek(100)  # inside the batch of the segment's first entry
        byte = file.read(1)
        file.seek(100)
        file.write(bytes([byte[0] ^ 0x40]))
    recovered = reopen(tmp_path)
    assert recovered.last_index() == base - 1
    assert recovered.entries(1, base) == written[: base - 1]
    assert segments(tmp_path) == names[:2]
    recovered.close()


def test_old_entries_behind_a_torn_truncation_are_not_resurrected(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL)
    storage.append([entry(i, 1) for i in range(1, 11)])
    (name,) = segments(tmp_path)
    old_bytes = (tmp_path / name).read_bytes()
    replacement = [entry(6, 2), entry(7, 2)]  # same sizes as the old 6 and 7
    storage.append(replacement)
    storage.close()
    new_bytes = (tmp_path / name).read_bytes()
    assert len(new_bytes) < len(old_bytes)
    # A crash after the new write but before the truncation reached the disk: the old 8..10
    # follow the new 7 at exactly a batch boundary.
    (tmp_path / name).write_bytes(new_bytes + old_bytes[len(new_bytes) :])
    recovered = reopen(tmp_path)
    assert recovered.last_index() == 7
    assert recovered.entries(6, 8) == replacement
    recovered.close()


def test_a_segment_a_crash_failed_to_delete_is_dropped(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL, SMALL)
    storage.append([entry(i, 1) for i in range(1, 21)])
    saved = {name: (tmp_path / name).read_bytes() for name in segments(tmp_path)}
    storage.append([entry(3, 2, size=10)])  # conflicts early: later segments go
    storage.close()
    assert len(segments(tmp_path)) == 1
    for name, data in saved.items():
        if not (tmp_path / name).exists():
            (tmp_path / name).write_bytes(data)
    recovered = reopen(tmp_path)
    assert recovered.last_index() == 3 and recovered.term(3) == 2
    recovered.close()


def test_snapshot_and_compaction_survive_only_once_synced(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL, SMALL)
    written = [entry(i, 1) for i in range(1, 31)]
    storage.append(written)
    storage.set_hard_state(HardState(term=1, vote=1, commit=30))
    storage.create_snapshot(20, INITIAL, b"state at 20")
    storage.compact(20)
    storage.close()  # a crash: nothing after the last sync
    recovered = reopen(tmp_path)
    assert recovered.snapshot().index == 0 and recovered.entries(1, 31) == written
    recovered.create_snapshot(20, INITIAL, b"state at 20")
    recovered.compact(20)
    segment_count = len(segments(tmp_path))
    recovered.sync()
    assert len(segments(tmp_path)) < segment_count
    recovered.close()
    again = reopen(tmp_path)
    assert again.snapshot().data == b"state at 20"
    assert (again.first_index(), again.last_index()) == (21, 30)
    assert again.entries(21, 31) == written[20:]
    again.close()


def test_a_leader_snapshot_interrupted_before_the_log_was_replaced(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL, SMALL)
    storage.append([entry(i, 1) for i in range(1, 11)])
    ahead = Snapshot(index=50, term=3, configuration=INITIAL, data=b"ahead")
    storage.write_snapshot_file(ahead)
    storage.close()  # crash before install_snapshot
    recovered = reopen(tmp_path)
    assert recovered.snapshot() == ahead
    assert (recovered.first_index(), recovered.last_index()) == (51, 50)
    recovered.close()


def test_a_snapshot_matching_the_log_keeps_the_entries_after_it(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL, SMALL)
    written = [entry(i, 1) for i in range(1, 21)]
    storage.append(written)
    storage.write_snapshot_file(Snapshot(index=8, term=1, configuration=INITIAL, data=b""))
    storage.close()
    recovered = reopen(tmp_path)
    assert (recovered.first_index(), recovered.last_index()) == (9, 20)
    assert recovered.entries(9, 21) == written[8:]
    recovered.close()


def test_a_snapshot_contradicting_the_log_replaces_it(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL, SMALL)
    storage.append([entry(i, 1) for i in range(1, 21)])
    storage.write_snapshot_file(Snapshot(index=8, term=2, configuration=INITIAL, data=b""))
    storage.close()
    recovered = reopen(tmp_path)
    assert (recovered.first_index(), recovered.last_index()) == (9, 8)
    recovered.close()


def test_lost_committed_entries_are_refused(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL)
    storage.append([entry(i, 1) for i in range(1, 11)])
    storage.set_hard_state(HardState(term=1, vote=1, commit=10))
    storage.close()
    (name,) = segments(tmp_path)
    os.truncate(tmp_path / name, os.path.getsize(tmp_path / name) - 1)
    with pytest.raises(StorageCorruptError, match="committed entries were lost"):
        reopen(tmp_path)


def test_a_missing_segment_after_the_snapshot_is_refused(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL, SMALL)
    storage.apply_snapshot(Snapshot(index=5, term=1, configuration=INITIAL, data=b""))
    storage.append([entry(i, 1) for i in range(6, 30)])
    storage.close()
    first = segments(tmp_path)[0]
    assert first == f"{6:020d}.log"
    os.unlink(tmp_path / first)
    with pytest.raises(StorageCorruptError, match="missing"):
        reopen(tmp_path)


def test_a_damaged_snapshot_is_refused(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL)
    snapshot = Snapshot(index=5, term=1, configuration=INITIAL, data=b"state")
    storage.apply_snapshot(snapshot)
    storage.close()
    path = tmp_path / snapshot_file_name(snapshot)
    data = bytearray(path.read_bytes())
    data[-2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StorageCorruptError):
        reopen(tmp_path)


def test_hard_state_and_leftovers(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL)
    storage.append([entry(1, 1)])
    storage.set_hard_state(HardState(term=4, vote=2, commit=1))
    storage.close()
    (tmp_path / (SLOT_NAMES[1] + ".tmp")).write_bytes(b"torn")
    (tmp_path / "00000000000000000007-00000000000000000001.snapshot.tmp").write_bytes(b"torn")
    recovered = DurableStorage.open(tmp_path, Configuration(voters=frozenset({9})))
    assert recovered.initial_state() == (HardState(term=4, vote=2, commit=1), INITIAL)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    recovered.close()


def test_damage_found_while_reading_is_an_error(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL, SMALL)
    storage.append([entry(i, 1) for i in range(1, 11)])
    (name,) = segments(tmp_path)[:1]
    with open(tmp_path / name, "r+b") as file:
        file.seek(80)
        file.write(b"\xff\xff")
    with pytest.raises(StorageError):
        storage.entries(1, 3)
    storage.close()


def test_a_commit_only_change_waits_for_a_later_sync_when_lazy(tmp_path):
    storage = DurableStorage.open(tmp_path, INITIAL)
    storage.append([entry(i, 1) for i in range(1, 6)])
    storage.set_hard_state(HardState(term=1, vote=2, commit=1))
    storage.set_persistent_hard_state(HardState(term=1, vote=2, commit=4))
    storage.write_entries([entry(6, 1)])
    storage.prepare_sync(lazy_commit=True).run()
    storage.close()
    recovered = reopen(tmp_path)
    assert recovered.last_index() == 6  # the entries are durable
    assert recovered.initial_state()[0] == HardState(term=1, vote=2, commit=1)
    recovered.set_persistent_hard_state(HardState(term=2, vote=0, commit=5))
    recovered.prepare_sync(lazy_commit=True).run()  # a new term is never lazy
    recovered.close()
    assert reopen(tmp_path).initial_state()[0] == HardState(term=2, vote=0, commit=5)
