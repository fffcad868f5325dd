"""`PartitionLog.truncate_fully_and_start_at` on disk: a crash at any step of it (or of its
completion by the loader) reopens either the old log or the new empty one, never a mix.

A crash is simulated by copying the log's directory right before every change of a file
name or size (rename, replace, unlink, ftruncate): each copy is what a process crash at that
moment leaves (the page cache survives it). What a power loss may leave follows from the
order of the fsyncs: the intent file is durable before any other change, and removed only
once everything else is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from storage_test_support import make_batch, small_config
from storage_test_support import read_all

from broker.storage import EpochEntry, PartitionLog
from broker.storage.log_loader import TRUNCATE_FULLY_FILE

CONFIG = small_config(segment_bytes=1024, index_interval_bytes=100)  # fsync=never
EPOCHS = [0] * 6 + [3] * 8 + [7] * 6


def open_log(directory: Path) -> PartitionLog:
    return PartitionLog.open(directory, CONFIG, now_ms=0, high_watermark_managed_externally=True)


def filled_log(directory: Path) -> tuple[PartitionLog, list[bytes]]:
    log = open_log(directory)
    written = []
    for number, epoch in enumerate(EPOCHS):
        batch = make_batch(number, records=1 + number % 3, value_bytes=40)
        log.append(batch, now_ms=0, leader_epoch=epoch)
        written.append(bytes(batch))
    log.set_high_watermark(log.log_end_offset - 5)
    assert log.segment_count >= 3
    return log, written


def segment_bases(directory: Path) -> list[int]:
    return sorted(int(path.name[:20]) for path in directory.glob("*.log"))


def snapshots_during(
    monkeypatch: pytest.MonkeyPatch, directory: Path, into: Path, action: Callable[[], None]
) -> list[Path]:
    """Run `action`, copying `directory` before each rename, replace, unlink or ftruncate
    in it; return the copies, in order, then one of the final state."""
    copies: list[Path] = []
    copying = False

    def copy() -> None:
        nonlocal copying
        copying = True  # copying itself may call the patched functions
        try:
            target = into / f"crash-{len(copies):03d}"
            shutil.copytree(directory, target)
            (target / ".clean-shutdown").unlink(missing_ok=True)
            copies.append(target)
        finally:
            copying = False

    def before(function: Callable[..., object]) -> Callable[..., object]:
        def patched(*args: object, **kwargs: object) -> object:
            if not copying:
                copy()
            return function(*args, **kwargs)

        return patched

    with monkeypatch.context() as patch:
        for name in ("rename", "replace", "unlink", "ftruncate"):
            patch.setattr(os, name, before(getattr(os, name)))
        action()
    copy()
    return copies


def state_of(log: PartitionLog) -> str:
    return "new" if log.log_start_offset > 0 or log.log_end_offset == 0 else "old"


def check_old_or_new(
    directory: Path, written: list[bytes], old_epochs: tuple[EpochEntry, ...], start: int
) -> str:
    """Open `directory`: it must hold the old log (the high watermark as checkpointed) or
    the new empty one at `start`. Returns which."""
    log = open_log(directory)
    try:
        assert not (directory / TRUNCATE_FULLY_FILE).exists()
        if log.log_start_offset == 0 and log.log_end_offset > 0:
            assert read_all(log) == written
            assert log.leader_epochs.entries() == old_epochs
            return "old"
        assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (start, start, 0)
        assert log.high_watermark == log.restored_high_watermark == start
        assert log.leader_epochs.entries() == ()
        assert segment_bases(directory) == [start]
        log.append(make_batch(99), now_ms=0, leader_epoch=8)  # usable
        assert log.leader_epochs.entries() == (EpochEntry(8, start),)
        return "new"
    finally:
        log.close()


@pytest.mark.parametrize("where", ["beyond the end", "at a segment base", "at zero"])
def test_a_crash_at_any_step_leaves_the_old_log_or_the_new_one(tmp_path, monkeypatch, where):
    directory = tmp_path / "t-0"
    log, written = filled_log(directory)
    old_epochs = log.leader_epochs.entries()
    start = {
        "beyond the end": log.log_end_offset + 500,
        "at a segment base": segment_bases(directory)[1],  # that segment is emptied and kept
        "at zero": 0,
    }[where]
    copies = snapshots_during(
        monkeypatch, directory, tmp_path, lambda: log.truncate_fully_and_start_at(start)
    )
    log.close()
    assert len(copies) > 10
    outcomes = [check_old_or_new(copy, written, old_epochs, start) for copy in copies]
    first_new = outcomes.index("new")
    assert outcomes == ["old"] * first_new + ["new"] * (len(outcomes) - first_new), outcomes
    assert first_new >= 1 and outcomes[-1] == "new"


def test_a_crash_while_loading_completes_the_full_truncation_anyway(tmp_path, monkeypatch):
    directory = tmp_path / "t-0"
    log, written = filled_log(directory)
    old_epochs = log.leader_epochs.entries()
    start = log.log_end_offset + 10
    copies = snapshots_during(
        monkeypatch, directory, tmp_path / "first", lambda: log.truncate_fully_and_start_at(start)
    )
    log.close()
    # the first copy with the intent file and every old segment still there
    interrupted = next(copy for copy in copies if (copy / TRUNCATE_FULLY_FILE).exists())
    assert len(segment_bases(interrupted)) >= 3
    loading = snapshots_during(
        monkeypatch, interrupted, tmp_path / "second", lambda: open_log(interrupted).close()
    )
    assert len(loading) > 5
    for copy in loading:
        assert check_old_or_new(copy, written, old_epochs, start) == "new"
