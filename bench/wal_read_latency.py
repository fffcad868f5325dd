"""Latency of the HTTP WAL service: `GET /` of one record by offset, next to `POST /`.

For each batch layout, starts a fresh `dwal broker` (data in a temporary directory, the HTTP
gateway on a free port), writes `--records` records of `--value-bytes` to partition 0 of
topic `wal` through the native producer, then, over one keep-alive HTTP connection:

- `GET /` with `{"offset": N}` at uniformly random offsets of the whole log (`get_random`),
- `GET /` near the end of the log (`get_tail`, the last 1000 offsets),
- `POST /` of one record (`post`).

Layouts: `one_record_batches` (batch_size=1, linger 0: one record per batch, as `POST /`
writes them) and `64KiB_batches` (batch_size=64 KiB). Prints one line per figure:

    wal_read one_record_batches records=1000000 log_MB=183 get_random p50_ms=X p99_ms=Y ...

Requests are sent one at a time, so each latency is the full round trip seen by a client.
Each line ends with the machine's load average: tail latencies mean little on a busy machine
(a process waiting for a core waits a scheduler slice, several milliseconds).
Usage: python bench/wal_read_latency.py [--records N] [--requests N] [--fsync POLICY]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from functools import partial

import h11
import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.broker_process import run_broker  # noqa: E402
from client import Admin, Producer  # noqa: E402

LAYOUTS = {"one_record_batches": 1, "64KiB_batches": 64 * 1024}  # producer batch_size


class HttpConnection:
    """One keep-alive HTTP/1.1 connection speaking JSON, one request at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._connection = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def request(self, method: str, body: object) -> tuple[int, object]:
        data = json.dumps(body).encode()
        headers = [("host", "bench"), ("content-length", str(len(data)))]
        send = self._connection.send
        out = send(h11.Request(method=method, target="/", headers=headers))
        out += send(h11.Data(data=data)) + send(h11.EndOfMessage())
        await self._stream.send_all(out)
        status, parts = 0, []
        while True:
            event = self._connection.next_event()
            if event is h11.NEED_DATA:
                self._connection.receive_data(await self._stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._connection.start_next_cycle()
                return status, json.loads(b"".join(parts))

    async def aclose(self) -> None:
        await self._stream.aclose()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def produce(bootstrap: str, records: int, value: bytes, batch_size: int) -> float:
    """Write `records` records to wal-0; returns the seconds it took."""
    async with client.connect(bootstrap) as cluster:
        await Admin(cluster).create_topic("wal", 1)
        async with Producer(
            cluster, acks=1, linger_ms=0 if batch_size == 1 else 5, batch_size=batch_size
        ) as producer:
            started = time.perf_counter()
            sent = 0
            while sent < records:
                try:
                    producer.send_nowait("wal", value, partition=0)
                except trio.WouldBlock:  # the buffer is full: wait for room
                    await producer.send("wal", value, partition=0)
                sent += 1
                if sent % 1000 == 0:
                    await trio.lowlevel.checkpoint()
            await producer.flush()
            return time.perf_counter() - started


async def log_size_bytes(bootstrap: str) -> int:
    async with client.connect(bootstrap) as cluster:
        (topic,) = await Admin(cluster).describe_topics(["wal"])
        return topic.partitions[0].size_bytes


async def measure(http: HttpConnection, method: str, bodies: list[dict]) -> list[float]:
    """Send each body in turn; returns the latencies in ms. Every answer must be a 200."""
    latencies = []
    for body in bodies:
        started = time.perf_counter()
        status, answer = await http.request(method, body)
        latencies.append((time.perf_counter() - started) * 1000)
        assert status == 200, (status, answer)
    return latencies


def figures(name: str, latencies: list[float]) -> str:
    return (
        f"{name} n={len(latencies)} p50_ms={percentile(latencies, 0.5):.2f} "
        f"p90_ms={percentile(latencies, 0.9):.2f} p99_ms={percentile(latencies, 0.99):.2f} "
        f"max_ms={max(latencies):.2f} loadavg_1min={os.getloadavg()[0]:.1f}"
    )


async def scenario(layout: str, records: int, requests: int, value_bytes: int, fsync: str):
    value = os.urandom(value_bytes // 2 + 1).hex()[:value_bytes].encode()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="dwal-bench-") as data_dir:
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(partial(run_broker, data_dir, "--fsync", fsync, http=True))
            bootstrap = broker.bootstrap
            seconds = await produce(bootstrap, records, value, LAYOUTS[layout])
            size = await log_size_bytes(bootstrap)
            print(
                f"wal_read {layout} fsync={fsync} records={records} value_bytes={value_bytes} "
                f"log_MB={size / 1e6:.0f} bytes_per_record={size / records:.0f} "
                f"produced_in_s={seconds:.1f}",
                flush=True,
            )
            http = await HttpConnection.open(broker.http_port)
            await measure(http, "GET", [{"offset": 0}] * 20)  # warm the connection
            random_offsets = [{"offset": rng.randrange(records)} for _ in range(requests)]
            tail_offsets = [
                {"offset": rng.randrange(records - 1000, records)} for _ in range(requests)
            ]
            posts = [{"record": {"value": value.decode()}} for _ in range(requests)]
            for name, method, bodies in (
                ("get_random", "GET", random_offsets),
                ("get_tail", "GET", tail_offsets),
                ("post", "POST", posts),
            ):
                latencies = await measure(http, method, bodies)
                print(f"wal_read {layout} {figures(name, latencies)}", flush=True)
            await http.aclose()
            nursery.cancel_scope.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000, help="records in the log")
    parser.add_argument("--requests", type=int, default=2000, help="requests per figure")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--fsync", default="always", help="the broker's fsync policy")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    for layout in args.layouts.split(","):
        await scenario(layout, args.records, args.requests, args.value_bytes, args.fsync)


if __name__ == "__main__":
    trio.run(main)
