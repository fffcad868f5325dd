"""The process-wide cache of open file descriptors: bounded, least recently used first,
pinned and leased descriptors never closed under their users, evicted files reopened (the
same file, its data intact), writes of evicted files still fsynced; and partition logs on a
tiny cache: idle partitions hold no descriptor, everything reads back."""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest
from storage_test_support import append_batches, read_batches, small_config

from broker.storage import PartitionLog
from broker.storage.file_descriptor_cache import (
    CachedFile,
    FileDescriptorCache,
    capacity_for_limit,
    process_cache,
)

CAPACITY = 8


def descriptors_on(directory) -> list[str]:
    """The files under `directory` this process has a descriptor of."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue  # the descriptor listdir itself used
        if target.startswith(str(directory)):
            found.append(target)
    return found


def make_files(cache: FileDescriptorCache, directory, count: int) -> list[CachedFile]:
    files = []
    for number in range(count):
        path = directory / f"file-{number}"
        path.write_bytes(b"content of %d" % number)
        files.append(cache.open([path], os.O_RDWR | os.O_APPEND))
    return files


def content(file: CachedFile) -> bytes:
    with file.pinned() as fd:
        return os.pread(fd, 100, 0)


@pytest.fixture
def cache():
    return FileDescriptorCache(CAPACITY)


def test_open_descriptors_stay_within_the_capacity(cache, tmp_path):
    files = make_files(cache, tmp_path, 3 * CAPACITY)
    assert len(descriptors_on(tmp_path)) == CAPACITY
    for number, file in enumerate(files):  # every file still reads as itself
        assert content(file) == b"content of %d" % number
        assert len(descriptors_on(tmp_path)) <= CAPACITY
    statistics = cache.statistics()
    assert statistics.open == CAPACITY and statistics.evictions >= 3 * CAPACITY
    assert statistics.reopens >= 2 * CAPACITY


def test_the_least_recently_used_descriptor_goes_first(cache, tmp_path):
    files = make_files(cache, tmp_path, CAPACITY)
    content(files[0])  # used: now the most recent
    (tmp_path / "new").write_bytes(b"new")
    cache.open([tmp_path / "new"], os.O_RDONLY)
    assert files[0].is_open and not files[1].is_open
    assert all(file.is_open for file in files[2:])


def test_a_pinned_descriptor_is_never_evicted(cache, tmp_path):
    first, *_ = make_files(cache, tmp_path, 1)
    (tmp_path / "others").mkdir()
    with first.pinned() as fd:
        inode = os.fstat(fd).st_ino
        make_files(cache, tmp_path / "others", 4 * CAPACITY)
        assert first.is_open
        assert os.fstat(fd).st_ino == inode  # still that file's descriptor, not closed
        assert os.pread(fd, 100, 0) == b"content of 0"
    make_files(cache, tmp_path / "others", CAPACITY)
    assert not first.is_open  # evictable again once the block ended


def test_a_leased_descriptor_stays_open_until_the_thread_leases_another(cache, tmp_path):
    first, second = make_files(cache, tmp_path, 2)
    fd = first.descriptor()
    (tmp_path / "others").mkdir()
    make_files(cache, tmp_path / "others", 4 * CAPACITY)
    assert first.is_open and os.pread(fd, 100, 0) == b"content of 0"
    second.descriptor()  # the thread's lease moves to the second file
    make_files(cache, tmp_path / "others", 4 * CAPACITY)
    assert not first.is_open and second.is_open


def test_leases_of_threads_that_ended_are_released(cache, tmp_path):
    files = make_files(cache, tmp_path, CAPACITY)
    all_leased = threading.Barrier(CAPACITY)  # alive together: no thread id is reused

    def lease(file: CachedFile) -> None:
        file.descriptor()
        all_leased.wait(10)

    threads = [threading.Thread(target=lease, args=(file,)) for file in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.statistics().pinned == CAPACITY
    (tmp_path / "new").write_bytes(b"new")
    cache.open([tmp_path / "new"], os.O_RDONLY)  # room is made: the leases are gone
    assert cache.statistics().open == CAPACITY


def test_an_evicted_file_is_reopened_with_its_writes(cache, tmp_path):
    first, *_ = make_files(cache, tmp_path, 1)
    with first.pinned() as fd:
        os.write(fd, b" and more")
    (tmp_path / "others").mkdir()
    make_files(cache, tmp_path / "others", CAPACITY)
    assert not first.is_open
    assert content(first) == b"content of 0 and more"
    with first.pinned() as fd:  # reopened with the same flags: appends still append
        os.write(fd, b"!")
    assert (tmp_path / "file-0").read_bytes() == b"content of 0 and more!"


def test_a_replaced_file_is_never_reopened_in_its_place(cache, tmp_path):
    first, *_ = make_files(cache, tmp_path, 1)
    (tmp_path / "others").mkdir()
    make_files(cache, tmp_path / "others", CAPACITY)
    (tmp_path / "impostor").write_bytes(b"another file")
    os.rename(tmp_path / "impostor", tmp_path / "file-0")
    with pytest.raises(FileNotFoundError):
        content(first)


def test_a_renamed_file_is_found_under_its_later_names(cache, tmp_path):
    cleaned, swap, final = tmp_path / "a.cleaned", tmp_path / "a.swap", tmp_path / "a"
    final.write_bytes(b"the original segment")
    file = cache.open([cleaned, swap, final], os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    with file.pinned() as fd:
        os.write(fd, b"compacted")
    for old, new in ((cleaned, swap), (swap, final)):
        os.rename(old, new)
        (tmp_path / "others").mkdir(exist_ok=True)
        make_files(cache, tmp_path / "others", CAPACITY)
        assert not file.is_open
        assert content(file) == b"compacted"


def test_datasync_reaches_an_evicted_dirty_file(cache, tmp_path, monkeypatch):
    first, second = make_files(cache, tmp_path, 2)
    synced_inodes = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced_inodes.append(os.fstat(fd).st_ino)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with first.pinned() as fd:
        os.write(fd, b"!")
        first.mark_written()
    (tmp_path / "others").mkdir()
    make_files(cache, tmp_path / "others", CAPACITY)
    assert not first.is_open and first.is_dirty
    assert cache.statistics().dirty_evictions == 1
    first.datasync()
    second.datasync()  # never written: nothing to sync
    assert synced_inodes == [os.stat(tmp_path / "file-0").st_ino]
    assert not first.is_dirty
    first.datasync()
    assert len(synced_inodes) == 1


def test_closing_a_pinned_file_waits_for_the_end_of_the_block(cache, tmp_path):
    first, *_ = make_files(cache, tmp_path, 1)
    with first.pinned() as fd:
        first.close()
        assert os.pread(fd, 100, 0) == b"content of 0"
    assert descriptors_on(tmp_path) == []
    first.close()  # idempotent


def test_borrowed_copies_leave_less_room(cache, tmp_path):
    make_files(cache, tmp_path, CAPACITY)
    for _ in range(3):
        cache.borrow()
    assert cache.statistics().open == CAPACITY - 3
    assert cache.may_borrow()
    cache.borrow()
    assert not cache.may_borrow()  # half the capacity is out
    for _ in range(4):
        cache.give_back()
    assert cache.may_borrow()
    (tmp_path / "others").mkdir()
    make_files(cache, tmp_path / "others", CAPACITY)
    assert cache.statistics().open == CAPACITY


def test_close_idle_closes_what_was_not_used_since_the_previous_sweep(cache, tmp_path):
    files = make_files(cache, tmp_path, 4)
    assert cache.close_idle() == 0  # all used since the (implicit) previous sweep
    content(files[0])
    with files[1].pinned():
        assert cache.close_idle() == 2  # files 2 and 3
        assert cache.close_idle() == 1  # file 0; file 1 is pinned
    assert files[1].is_open and not any(f.is_open for f in (files[0], files[2], files[3]))
    assert cache.close_idle() == 1


def test_running_out_of_descriptors_evicts_and_retries(cache, tmp_path, monkeypatch):
    make_files(cache, tmp_path, CAPACITY)
    real_open = os.open
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def open_failing_once(*arguments, **keywords):
        if failures:
            raise failures.pop()
        return real_open(*arguments, **keywords)

    monkeypatch.setattr(os, "open", open_failing_once)
    (tmp_path / "new").write_bytes(b"new")
    file = cache.open([tmp_path / "new"], os.O_RDONLY)
    assert content(file) == b"new"
    assert cache.statistics().open < CAPACITY  # an eighth (at least one) made room


def test_threads_never_see_another_files_descriptor(cache, tmp_path):
    files = make_files(cache, tmp_path, 4 * CAPACITY)
    errors: list[str] = []

    def use(seed: int) -> None:
        chooser = random.Random(seed)
        for _ in range(400):
            number = chooser.randrange(len(files))
            expected = b"content of %d" % number
            if chooser.random() < 0.5:
                with files[number].pinned() as fd:
                    got = os.pread(fd, 100, 0)
            else:
                got = os.pread(files[number].descriptor(), 100, 0)
            if got != expected:
                errors.append(f"read {got!r} for {expected!r}")

    threads = [threading.Thread(target=use, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.statistics().open <= CAPACITY


def test_the_default_capacity_leaves_room_for_sockets():
    assert capacity_for_limit(20_000) == 15_000
    assert capacity_for_limit(256) == 192
    assert capacity_for_limit(16) >= 8


# Partition logs on a tiny process cache.


@pytest.fixture
def tiny_process_cache():
    cache = process_cache()
    capacity = cache.capacity
    cache.set_capacity(CAPACITY)
    try:
        yield cache
    finally:
        cache.set_capacity(capacity)


def test_many_logs_on_a_tiny_cache_read_back_everything(tmp_path, tiny_process_cache):
    logs = [PartitionLog.open(tmp_path / f"t-{n}", small_config(), now_ms=0) for n in range(20)]
    written = {n: append_batches(log, 30) for n, log in enumerate(logs)}  # several segments each
    assert all(log.segment_count > 2 for log in logs)
    assert len(descriptors_on(tmp_path)) <= CAPACITY
    for n, log in enumerate(logs):
        assert [data for _, data in read_batches(log)] == written[n]
        assert len(descriptors_on(tmp_path)) <= CAPACITY
    for log in logs:
        log.close()
    reopened = [PartitionLog.open(tmp_path / f"t-{n}", small_config(), now_ms=0) for n in range(20)]
    for n, log in enumerate(reopened):
        assert [data for _, data in read_batches(log)] == written[n]
        log.close()


def test_idle_logs_hold_no_descriptor(tmp_path, tiny_process_cache):
    log = PartitionLog.open(tmp_path / "t-0", small_config(), now_ms=0)
    written = append_batches(log, 30)
    assert descriptors_on(tmp_path) != []
    tiny_process_cache.close_idle()
    tiny_process_cache.close_idle()
    assert descriptors_on(tmp_path) == []
    assert [data for _, data in read_batches(log)] == written  # reopened on demand
    log.close()
    assert descriptors_on(tmp_path) == []


async def test_an_fsync_after_eviction_covers_the_evicted_writes(
    tmp_path, tiny_process_cache, monkeypatch
):
    log = PartitionLog.open(tmp_path / "t-0", small_config(fsync="always"), now_ms=0)
    synced_inodes: list[int] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced_inodes.append(os.fstat(fd).st_ino)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    append_batches(log, 3)
    tiny_process_cache.close_idle()
    tiny_process_cache.close_idle()
    assert descriptors_on(tmp_path) == []  # the written descriptor was closed unsynced
    await log.wait_durable(log.log_end_offset)
    [active] = sorted((tmp_path / "t-0").glob("*.log"))
    assert os.stat(active).st_ino in synced_inodes
    assert log.durable_offset == log.log_end_offset
    log.close()


def test_a_fetch_slice_outlives_the_eviction_of_its_segment(tmp_path, tiny_process_cache):
    log = PartitionLog.open(tmp_path / "t-0", small_config(), now_ms=0)
    written = append_batches(log, 3)
    fetched = log.read(0, 1 << 20)
    assert tiny_process_cache.statistics().borrowed == 1
    tiny_process_cache.close_idle()
    tiny_process_cache.close_idle()
    assert os.pread(fetched.fd, fetched.length, fetched.position) == b"".join(written)
    fetched.close()
    assert tiny_process_cache.statistics().borrowed == 0
    log.close()
