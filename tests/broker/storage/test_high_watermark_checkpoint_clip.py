"""A high-watermark checkpoint beyond the recovered log (a power loss cut the log's tail
after the checkpoint was written) is clipped on open and rewritten so: left as it was, the
next crash, once the log has grown back past it with records nobody confirmed committed,
would restore it again - and a follower never truncates below its high watermark."""

from __future__ import annotations

import shutil

from storage_test_support import make_batch, small_config

from broker.storage import MemoryPartitionLog, PartitionLog
from broker.storage.checkpoint import read_offset_checkpoint, write_offset_checkpoint
from broker.storage.log_loader import HIGH_WATERMARK_FILE

CONFIG = small_config()


def test_the_file_log_rewrites_a_checkpoint_beyond_its_end(tmp_path):
    directory = tmp_path / "t-0"
    log = PartitionLog.open(directory, CONFIG, now_ms=0, high_watermark_managed_externally=True)
    for number in range(3):
        log.append(make_batch(number), now_ms=0)
    end = log.log_end_offset
    log.close()
    write_offset_checkpoint(directory / HIGH_WATERMARK_FILE, end + 100)  # the lost tail's
    log = PartitionLog.open(directory, CONFIG, now_ms=0, high_watermark_managed_externally=True)
    assert log.restored_high_watermark == log.high_watermark == end
    assert read_offset_checkpoint(directory / HIGH_WATERMARK_FILE) == end
    for number in range(3, 80):  # the log grows back past the stale value
        log.append(make_batch(number), now_ms=0)
    assert log.log_end_offset > end + 100
    crashed = tmp_path / "crashed"
    shutil.copytree(directory, crashed)  # a crash: no clean shutdown, no new checkpoint
    log.close()
    again = PartitionLog.open(crashed, CONFIG, now_ms=0, high_watermark_managed_externally=True)
    assert again.restored_high_watermark == end
    again.close()


async def test_the_memory_log_does_the_same():
    log = MemoryPartitionLog("t-0", CONFIG, high_watermark_managed_externally=True)
    for number in range(3):
        log.append(make_batch(number), now_ms=0)
    await log.flush()
    durable_end = log.log_end_offset
    for number in range(3, 6):
        log.append(make_batch(number), now_ms=0)
    log.set_high_watermark(log.log_end_offset)
    await log.write_high_watermark_checkpoint()  # beyond what a power loss keeps
    recovered = MemoryPartitionLog.recover(
        "t-0", CONFIG, log.crash(power_loss=True), high_watermark_managed_externally=True
    )
    assert recovered.restored_high_watermark == durable_end
    for number in range(6, 80):
        recovered.append(make_batch(number), now_ms=0)
    again = MemoryPartitionLog.recover(
        "t-0", CONFIG, recovered.crash(power_loss=False), high_watermark_managed_externally=True
    )
    assert again.restored_high_watermark == durable_end
