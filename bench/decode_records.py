"""Records per second of the batch codecs a consumer and the Kafka listener run, in-process.

Builds one fetch-sized buffer per layout (`--batches` batches of `--records` records with
`--value-bytes` values, 1 record in 10 with a header) and times, for `--seconds` each:

- `decode_records` of DWAL msgpack batches (the native consumer's hot path), uncompressed
  and zstd;
- `decode_records` of Kafka v2 batches (a Kafka producer's, stored verbatim), and of a mix;
- `check_kafka_batches` (what the broker runs on every Kafka produce), every codec;
- `to_kafka_batches` of DWAL batches (what a Kafka client's fetch of DWAL data costs) and of
  Kafka batches (copied as they are).

Prints one line per figure: ``decode_records msgpack/NONE records_per_s=X MB_per_s=Y``.
Figures only, never a pass or fail. Usage:
python bench/decode_records.py [--records N] [--batches N] [--value-bytes N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocol import Compression, encode_kafka_batch  # noqa: E402
from protocol.kafka_transcode import check_kafka_batches, to_kafka_batches  # noqa: E402
from protocol.record_batch import build_batch, decode_records  # noqa: E402


def records_of(count: int, value_bytes: int, first: int) -> list[tuple]:
    return [
        (
            1_700_000_000_000 + first + index,
            b"key-%d" % (first + index),
            b"v" * value_bytes,
            [("trace", b"abc")] if index % 10 == 0 else [],
        )
        for index in range(count)
    ]


def buffer_of(kind: str, codec: Compression, batches: int, records: int, value_bytes: int):
    parts = []
    for number in range(batches):
        batch_records = records_of(records, value_bytes, number * records)
        dwal = kind == "msgpack" or (kind == "mixed" and number % 2 == 0)
        if dwal:
            batch = bytearray(build_batch(batch_records, compression=codec))
        else:
            batch = bytearray(encode_kafka_batch(batch_records, compression=codec))
        batch[:8] = (number * records).to_bytes(8, "big")  # base offset, outside the CRC
        parts.append(bytes(batch))
    return b"".join(parts)


def rate(run: Callable[[], object], seconds: float) -> float:
    """Calls of `run` per second, measured for about `seconds`."""
    run()  # warm up
    calls = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        run()
        calls += 1
    return calls / elapsed


def report(name: str, data: bytes, records: int, calls_per_s: float) -> None:
    print(
        f"{name} records_per_s={records * calls_per_s:,.0f} "
        f"MB_per_s={len(data) * calls_per_s / 1e6:,.1f} buffer_bytes={len(data)}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500, help="records per batch")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0, help="per figure")
    options = parser.parse_args()
    total = options.records * options.batches
    shape = (options.batches, options.records, options.value_bytes)
    for kind, codec in [
        ("msgpack", Compression.NONE),
        ("msgpack", Compression.ZSTD),
        ("kafka", Compression.NONE),
        ("kafka", Compression.SNAPPY),
        ("mixed", Compression.NONE),
    ]:
        data = buffer_of(kind, codec, *shape)
        assert len(decode_records(data)) == total
        speed = rate(lambda: decode_records(data), options.seconds)
        report(f"decode_records {kind}/{codec.name}", data, total, speed)
    for codec in Compression:
        data = buffer_of("kafka", codec, *shape)
        speed = rate(lambda: check_kafka_batches(data), options.seconds)
        report(f"check_kafka_batches kafka/{codec.name}", data, total, speed)
    for kind, codec in [
        ("msgpack", Compression.NONE),
        ("msgpack", Compression.ZSTD),
        ("kafka", Compression.NONE),
    ]:
        data = buffer_of(kind, codec, *shape)
        speed = rate(lambda: to_kafka_batches(data), options.seconds)
        report(f"to_kafka_batches {kind}/{codec.name}", data, total, speed)


if __name__ == "__main__":
    main()
