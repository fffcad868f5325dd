import random
import struct

import pytest
from storage_test_support import make_batch, read_batches, small_config

from broker.storage import PartitionLog
from broker.storage.offset_index import OffsetIndex
from broker.storage.time_index import TimeIndex
from protocol.record_batch import parse_header


def build_log(directory, *, batches, segment_bytes, index_interval_bytes, seed=1):
    """A log of `batches` batches with shuffled timestamps; returns it and its headers."""
    config = small_config(segment_bytes=segment_bytes, index_interval_bytes=index_interval_bytes)
    log = PartitionLog.open(directory, config, now_ms=0)
    generator = random.Random(seed)
    for number in range(batches):
        timestamp = 10_000 + number * 10 + generator.randrange(-40, 40)
        batch = make_batch(number, records=generator.randrange(1, 5), timestamp_ms=timestamp)
        log.append(batch, now_ms=0)
    return log, [header for header, _ in read_batches(log)]


def check_every_offset_is_found(log, headers):
    for header in headers:
        for offset in range(header.base_offset, header.next_offset):
            with log.read(offset, 1) as fetched:
                found = parse_header(fetched.read_bytes())
            assert found.base_offset == header.base_offset


def expected_for_timestamp(headers, timestamp):
    for header in headers:
        if header.max_timestamp >= timestamp:
            return header.base_offset, header.max_timestamp
    return None


def check_timestamp_lookups(log, headers):
    timestamps = sorted({header.max_timestamp for header in headers})
    targets = [0, timestamps[0] - 1, timestamps[-1], timestamps[-1] + 1]
    for timestamp in timestamps:
        targets += [timestamp - 1, timestamp, timestamp + 1]
    for target in targets:
        assert log.offset_for_timestamp(target) == expected_for_timestamp(headers, target), target


@pytest.mark.parametrize("segment_bytes", [1024, 1 << 20])
@pytest.mark.parametrize("index_interval_bytes", [0, 100, 4096])
def test_every_offset_and_timestamp_is_found(tmp_path, segment_bytes, index_interval_bytes):
    log, headers = build_log(
        tmp_path / "t-0",
        batches=150,
        segment_bytes=segment_bytes,
        index_interval_bytes=index_interval_bytes,
    )
    check_every_offset_is_found(log, headers)
    check_timestamp_lookups(log, headers)
    log.close()
    reopened = PartitionLog.open(tmp_path / "t-0", log.config, now_ms=0)
    check_every_offset_is_found(reopened, headers)
    check_timestamp_lookups(reopened, headers)
    reopened.close()


def test_index_is_sparse(tmp_path):
    log, headers = build_log(
        tmp_path / "t-0", batches=100, segment_bytes=1 << 20, index_interval_bytes=500
    )
    log.close()
    entries = (tmp_path / "t-0" / "00000000000000000000.index").stat().st_size // 8
    total = sum(header.size_bytes for header in headers)
    assert total // 600 <= entries <= total // 500


def test_timestamp_lookup_ignores_what_is_not_durable(tmp_path):
    log = PartitionLog.open(tmp_path / "t-0", small_config(fsync="always"), now_ms=0)
    log.append(make_batch(1, timestamp_ms=5_000), now_ms=0)
    assert log.offset_for_timestamp(0) is None
    log.close()


def damage_index_files(directory):
    """Damage the index files of several segments in different ways."""
    indexes = sorted(directory.glob("*.index"))
    time_indexes = sorted(directory.glob("*.timeindex"))
    assert len(indexes) >= 4
    indexes[0].unlink()
    with open(time_indexes[1], "ab") as file:
        file.write(b"\x01\x02\x03")  # not a whole entry
    indexes[2].write_bytes(struct.pack(">II", 5, 900) + struct.pack(">II", 3, 950))
    indexes[-1].write_bytes(struct.pack(">II", 1, 10**6))  # points beyond the log
    return indexes


def check_time_indexes_end_with_the_largest_timestamp(directory, headers):
    bases = sorted(int(path.stem) for path in directory.glob("*.log"))
    for base, next_base in zip(bases, bases[1:] + [10**18]):
        data = (directory / f"{base:020d}.timeindex").read_bytes()
        last_timestamp, _ = struct.unpack(">qI", data[-12:])
        inside = [h.max_timestamp for h in headers if base <= h.base_offset < next_base]
        assert last_timestamp == max(inside)


def test_damaged_indexes_are_rebuilt_after_a_clean_shutdown(tmp_path):
    directory = tmp_path / "t-0"
    log, headers = build_log(directory, batches=120, segment_bytes=1024, index_interval_bytes=300)
    log.close()
    healthy = {path.name: path.read_bytes() for path in directory.glob("*index")}
    damage_index_files(directory)
    reopened = PartitionLog.open(directory, log.config, now_ms=0)
    assert {path.name: path.read_bytes() for path in directory.glob("*index")} == healthy
    check_time_indexes_end_with_the_largest_timestamp(directory, headers)
    assert [header for header, _ in read_batches(reopened)] == headers
    check_every_offset_is_found(reopened, headers)
    check_timestamp_lookups(reopened, headers)
    reopened.close()


def test_offset_index_lookup(tmp_path):
    index = OffsetIndex(tmp_path / "x.index", 100)
    assert index.lookup(150) == (100, 0)
    index.append(110, 200)
    index.append(130, 400)
    assert [index.lookup(offset) for offset in (100, 109, 110, 129, 130, 10**6)] == [
        (100, 0),
        (100, 0),
        (110, 200),
        (110, 200),
        (130, 400),
        (130, 400),
    ]
    index.write_file()
    loaded = OffsetIndex(tmp_path / "x.index", 100)
    assert loaded.load(log_size=500, entries_max=10) and loaded.lookup(131) == (130, 400)
    assert not OffsetIndex(tmp_path / "x.index", 100).load(log_size=400, entries_max=10)
    assert not OffsetIndex(tmp_path / "x.index", 100).load(log_size=500, entries_max=1)


def test_time_index_lookup(tmp_path):
    index = TimeIndex(tmp_path / "x.timeindex", 100)
    assert index.lookup(5) == 100 and index.last_timestamp is None
    index.append(50, 110)
    index.append(70, 120)
    found = [index.lookup(timestamp) for timestamp in (10, 50, 51, 70, 71)]
    assert found == [100, 100, 110, 110, 120]
    index.write_file()
    loaded = TimeIndex(tmp_path / "x.timeindex", 100)
    assert loaded.load(entries_max=10) and loaded.last_timestamp == 70 and loaded.last_offset == 120
