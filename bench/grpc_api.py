"""The gRPC API's figures next to the JSON (HTTP) API's and the native client's, in one run.

Three fresh `dwal broker` processes, one after the other (data in temporary directories, ports
chosen by the OS on 127.0.0.1, each broker stopped by PID at the end of its part, on errors
too: see bench/broker_process.py), all with fsync policy `--fsync` (default `always`, as
`make run`) and `--value-bytes` (100) byte values. Requests are sent one at a time from this
one process, so each latency is a full round trip seen by a client, and the client shares the
machine's cores with the broker.

1. gRPC (`log.v1.Log`, one synchronous grpcio channel, run in a worker thread), to topic
   `wal` partition 0 (appends with acks=all):
   - `Produce` (unary, one record) latency, then `Consume` (unary, `max_records` 0, one
     record at a uniformly random offset of those written) latency: `--requests` (2000)
     calls each after `--warmup` (200);
   - `ProduceStream` throughput: `--records` (500,000) records, `--records-per-request`
     (100) records per ProduceRequest (in `records`; the requests are built in the timed
     loop), from the first request sent to the last response received;
   - `ConsumeStream` throughput: the same records, `max_records=--max-records` (1000), from
     the call to the response holding the last of them;
   - for comparison, one record per message: `ProduceStream` of `--single-records` (30,000)
     requests of one record, then `ConsumeStream` of them with `max_records` 0.
2. JSON API over HTTP/1.1 (one keep-alive connection, h11): `POST /` (acks=all) latency and
   `GET /` (a random offset of those written) latency, `--requests` each after `--warmup`;
   then REST `POST /topics/rest/records` throughput (acks=1: that route's acknowledgement)
   with `--rest-records-per-request` (1000) records per body, for `--rest-records` (200,000).
3. Native client (`client` package, trio): `Producer` throughput with acks=all (linger 2 ms,
   batch_size 256 KiB, as bench/produce_consume.py) for `--records` records; `Consumer`
   throughput reading them back; single-record send latency with acks=all and linger 0
   (`await (await producer.send(...)).wait()`, one at a time), `--requests` after `--warmup`.

Prints a header (machine, versions, settings), then one table row per figure. Nothing is
asserted about time. A stream that gives no response for STALL_S (15) seconds is cancelled
and its row says STALLED (with how far it got); the run then ends with PROBLEM lines and exit
status 1.

Where a unary gRPC call's time goes (timing probes in a broker process, 2-core machine,
p50): grpcio's own cost per call, synchronous client and asyncio server in Python, is about
0.45-0.6 ms even against a server that answers constants; the gateway's hop from its asyncio
thread into trio and back (TrioBridge.call) adds about 0.22 ms; Consume's batch read about
0.1 ms. Hence unary Consume takes about twice as long as `GET /`. One record per stream
message runs at grpcio's per-message rate (a do-nothing server gets about the same).

Usage: python bench/grpc_api.py [--fsync always|never] [--records N] [--requests N]
       [--records-per-request N] [--max-records N] [--single-records N] [--value-bytes N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from importlib import metadata
from typing import TypeVar

import h11
import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import client  # noqa: E402
from bench.broker_process import run_broker  # noqa: E402
from bench.produce_consume import percentile  # noqa: E402
from client import Admin, Consumer, Producer  # noqa: E402

GRPC_TIMEOUT_S = 60.0  # per unary call; streams get STREAM_TIMEOUT_S
STREAM_TIMEOUT_S = 600.0
STALL_S = 15.0  # a stream with no response for this long is cancelled and reported
ROWS: list[tuple[str, str, str]] = []  # (figure, result, how), printed at the end as well
PROBLEMS: list[str] = []  # printed at the end; the exit status is 1 when there are any
R = TypeVar("R", bound=tuple[int, float])  # a stream measurement: (first offset, seconds)


def row(figure: str, result: str, how: str) -> None:
    ROWS.append((figure, result, how))
    print(f"  {figure:<34} {result:<30} {how}", flush=True)


def latency_result(latencies_ms: list[float]) -> str:
    return (
        f"p50 {percentile(latencies_ms, 0.5):.2f} ms  p99 {percentile(latencies_ms, 0.99):.2f} ms"
    )


def rate_result(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f} rec/s"


# -- gRPC (synchronous grpcio, in a worker thread) -------------------------------------------


class Stalled(Exception):
    """A stream gave no response for STALL_S seconds (the Watchdog cancelled it)."""


class Watchdog:
    """Cancels a grpcio stream that makes no progress for STALL_S seconds; leaving the block
    then raises Stalled instead of the stream's CANCELLED error."""

    def __init__(self, call) -> None:  # type: ignore[no-untyped-def]
        self._call = call
        self._last = time.monotonic()
        self._done = threading.Event()
        self.stalled = False

    def progress(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            if time.monotonic() - self._last > STALL_S:
                self.stalled = True
                self._call.cancel()
                return

    def __enter__(self) -> Watchdog:
        threading.Thread(target=self._watch, name="stream watchdog", daemon=True).start()
        return self

    def __exit__(self, kind, error, traceback) -> bool:  # type: ignore[no-untyped-def]
        self._done.set()
        if self.stalled:
            raise Stalled()
        return False


def grpc_part(port: int, value: bytes, arguments: argparse.Namespace) -> None:
    import grpc

    from protocol.grpc_api import log_pb2, log_pb2_grpc

    with grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    ) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = log_pb2_grpc.LogStub(channel)
        requests, warmup = arguments.requests, arguments.warmup

        def produce_one() -> int:
            request = log_pb2.ProduceRequest(record=log_pb2.Record(value=value))
            return stub.Produce(request, timeout=GRPC_TIMEOUT_S).offset

        latencies = []
        for index in range(warmup + requests):
            started = time.perf_counter()
            produce_one()
            if index >= warmup:
                latencies.append((time.perf_counter() - started) * 1000)
        row("gRPC Produce (unary)", latency_result(latencies), f"n={requests}, 1 record, acks=all")
        written = warmup + requests
        rng = random.Random(1)
        latencies = []
        for index in range(warmup + requests):
            offset = rng.randrange(written)
            started = time.perf_counter()
            answer = stub.Consume(log_pb2.ConsumeRequest(offset=offset), timeout=GRPC_TIMEOUT_S)
            if index >= warmup:
                latencies.append((time.perf_counter() - started) * 1000)
            assert answer.record.offset == offset, (answer, offset)
        row("gRPC Consume (unary)", latency_result(latencies), f"n={requests}, random offset")

        def produce_stream(records: int, per_request: int) -> tuple[int, float]:
            """ProduceStream of `records` records; returns (first offset, seconds)."""

            def generate() -> Iterator[log_pb2.ProduceRequest]:
                left = records
                while left > 0:
                    count = min(per_request, left)
                    left -= count
                    if per_request == 1:
                        yield log_pb2.ProduceRequest(record=log_pb2.Record(value=value))
                    else:
                        yield log_pb2.ProduceRequest(
                            records=[log_pb2.Record(value=value) for _ in range(count)]
                        )

            started = time.perf_counter()
            first = expected = -1
            stream = stub.ProduceStream(generate(), timeout=STREAM_TIMEOUT_S)
            try:
                with Watchdog(stream) as watchdog:
                    for answer in stream:
                        watchdog.progress()
                        if first < 0:
                            first = expected = answer.offset
                        assert answer.offset == expected, (answer.offset, expected)
                        expected += min(per_request, records - (expected - first))
            except Stalled:
                raise Stalled(f"after {max(0, expected - first)} of {records} records") from None
            seconds = time.perf_counter() - started
            assert expected - first == records, (first, expected, records)
            return first, seconds

        def consume_stream(offset: int, records: int, max_records: int) -> float:
            """ConsumeStream of `records` records from `offset`; returns the seconds."""
            started = time.perf_counter()
            stream = stub.ConsumeStream(
                log_pb2.ConsumeRequest(offset=offset, max_records=max_records),
                timeout=STREAM_TIMEOUT_S,
            )
            expected = offset  # the offset the next response must start with
            try:
                with Watchdog(stream) as watchdog:
                    for answer in stream:
                        watchdog.progress()
                        got = answer.records if max_records else [answer.record]
                        assert got[0].offset == expected, (got[0].offset, expected)
                        expected = got[-1].offset + 1
                        if expected - offset >= records:
                            break
            except Stalled:
                raise Stalled(f"after {expected - offset} of {records} records") from None
            finally:
                stream.cancel()
            assert expected - offset == records, (expected, offset, records)
            return time.perf_counter() - started

        def stream_row(figure: str, how: str, records: int, run: Callable[[], R]) -> R | None:
            """Run one stream measurement and print its row; None when it stalled."""
            try:
                result = run()
            except Stalled as stall:
                row(figure, "STALLED", f"{how}: no response for {STALL_S:g} s {stall}")
                PROBLEMS.append(f"{figure} stalled {stall}")
                return None
            row(figure, rate_result(records, result[1]), how)
            return result

        records, per_request = arguments.records, arguments.records_per_request
        produced = stream_row(
            "gRPC ProduceStream",
            f"{records} records, {per_request} records/request, acks=all",
            records,
            lambda: produce_stream(records, per_request),
        )
        if produced is not None:
            first = produced[0]
            stream_row(
                "gRPC ConsumeStream",
                f"{records} records, max_records={arguments.max_records}",
                records,
                lambda: (first, consume_stream(first, records, arguments.max_records)),
            )
        single = arguments.single_records
        produced = stream_row(
            "gRPC ProduceStream, 1 rec/msg",
            f"{single} records, 1 record/request (`record`)",
            single,
            lambda: produce_stream(single, 1),
        )
        if produced is not None:
            first = produced[0]
            stream_row(
                "gRPC ConsumeStream, 1 rec/msg",
                f"{single} records, max_records=0",
                single,
                lambda: (first, consume_stream(first, single, 0)),
            )


# -- JSON API (HTTP/1.1) ---------------------------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection speaking JSON, one request at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._connection = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def request(self, method: str, target: str, data: bytes) -> object:
        """Send one request; returns the decoded JSON answer (which must be a 200)."""
        headers = [
            ("host", "bench"),
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
        ]
        send = self._connection.send
        out = send(h11.Request(method=method, target=target, headers=headers))
        out += send(h11.Data(data=data)) + send(h11.EndOfMessage())
        await self._stream.send_all(out)
        status, parts = 0, []
        while True:
            event = self._connection.next_event()
            if event is h11.NEED_DATA:
                self._connection.receive_data(await self._stream.receive_some(1 << 20))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._connection.start_next_cycle()
                answer = json.loads(b"".join(parts))
                assert status == 200, (status, answer)
                return answer

    async def aclose(self) -> None:
        await self._stream.aclose()


async def http_part(broker, value: bytes, arguments: argparse.Namespace) -> None:
    requests, warmup = arguments.requests, arguments.warmup
    text = value.decode()
    async with client.connect(broker.bootstrap) as cluster:
        await Admin(cluster).create_topic("rest", 1)
    http = await HttpConnection.open(broker.http_port)
    post = json.dumps({"record": {"value": text}}).encode()
    latencies = []
    for index in range(warmup + requests):
        started = time.perf_counter()
        await http.request("POST", "/", post)
        if index >= warmup:
            latencies.append((time.perf_counter() - started) * 1000)
    row("JSON POST / (WAL API)", latency_result(latencies), f"n={requests}, 1 record, acks=all")
    written = warmup + requests
    rng = random.Random(1)
    latencies = []
    for index in range(warmup + requests):
        offset = rng.randrange(written)
        body = json.dumps({"offset": offset}).encode()
        started = time.perf_counter()
        answer = await http.request("GET", "/", body)
        if index >= warmup:
            latencies.append((time.perf_counter() - started) * 1000)
        assert answer["record"]["offset"] == offset, (answer, offset)  # type: ignore[index]
    row("JSON GET / (WAL API)", latency_result(latencies), f"n={requests}, random offset")
    records, per_request = arguments.rest_records, arguments.rest_records_per_request
    sent = 0
    started = time.perf_counter()
    while sent < records:
        count = min(per_request, records - sent)
        body = json.dumps({"records": [{"value": text}] * count}).encode()
        answer = await http.request("POST", "/topics/rest/records", body)
        assert len(answer["offsets"]) == count  # type: ignore[index]
        sent += count
    row(
        "JSON POST /topics/{t}/records",
        rate_result(records, time.perf_counter() - started),
        f"{records} records, {per_request} records/request, acks=1",
    )
    await http.aclose()


# -- native client -----------------------------------------------------------------------------


async def native_part(bootstrap: str, value: bytes, arguments: argparse.Namespace) -> None:
    records = arguments.records
    async with client.connect(bootstrap) as cluster:
        await Admin(cluster).create_topic("native", 1)
        async with Producer(
            cluster, acks="all", linger_ms=2, batch_size=256 * 1024, buffer_bytes_max=8 << 20
        ) as producer:
            await (await producer.send("native", value)).wait()  # loads metadata
            sent = 0
            started = time.perf_counter()
            while sent < records:
                burst = 0
                try:
                    while burst < 1000 and sent + burst < records:
                        producer.send_nowait("native", value)
                        burst += 1
                except trio.WouldBlock:  # the buffer is full: wait for room
                    await producer.send("native", value)
                    burst += 1
                sent += burst
                await trio.lowlevel.checkpoint()
            await producer.flush()
            seconds = time.perf_counter() - started
            failed = producer.statistics().batches_failed
        assert not failed, f"{failed} batches failed"
        row(
            "native Producer",
            rate_result(records, seconds),
            f"{records} records, acks=all, linger 2 ms, batch 256 KiB",
        )
        consumer = Consumer(
            cluster,
            auto_offset_reset="earliest",
            partition_max_bytes=16 << 20,
            fetch_max_bytes=32 << 20,
        )
        await consumer.assign_topic("native")
        seen = 0
        started = time.perf_counter()
        while seen < records + 1:
            for batch in (await consumer.poll(timeout_ms=1000)).values():
                seen += len(batch)
        row("native Consumer", rate_result(seen, time.perf_counter() - started), f"{seen} records")
        async with Producer(cluster, acks="all", linger_ms=0) as producer:
            latencies = []
            for index in range(arguments.warmup + arguments.requests):
                started = time.perf_counter()
                await (await producer.send("native", value)).wait()
                if index >= arguments.warmup:
                    latencies.append((time.perf_counter() - started) * 1000)
        row(
            "native send (1 record)",
            latency_result(latencies),
            f"n={arguments.requests}, acks=all, linger 0, send().wait()",
        )


# -- the run ---------------------------------------------------------------------------------


async def with_broker(arguments: argparse.Namespace, part, **gateways: bool) -> None:
    """Run `part(broker)` against a fresh broker, stopped (by PID) afterwards."""
    with tempfile.TemporaryDirectory(prefix="dwal-bench-grpc-api-") as data_dir:
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(
                partial(run_broker, data_dir, "--fsync", arguments.fsync, **gateways)
            )
            await part(broker)
            nursery.cancel_scope.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="always")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--requests", type=int, default=2000, help="calls per latency figure")
    parser.add_argument("--warmup", type=int, default=200, help="calls left out before those")
    parser.add_argument("--records", type=int, default=500_000, help="records per stream run")
    parser.add_argument("--records-per-request", type=int, default=100)
    parser.add_argument("--max-records", type=int, default=1000)
    parser.add_argument("--single-records", type=int, default=30_000)
    parser.add_argument("--rest-records", type=int, default=200_000)
    parser.add_argument("--rest-records-per-request", type=int, default=1000)
    arguments = parser.parse_args()
    value = os.urandom(arguments.value_bytes // 2 + 1).hex()[: arguments.value_bytes].encode()
    print(
        f"DWAL API figures. machine: {os.cpu_count()} cores, {platform.platform()}; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"grpcio {metadata.version('grpcio')}, protobuf {metadata.version('protobuf')}, "
        f"trio {trio.__version__}; load average {os.getloadavg()[0]:.1f} at the start\n"
        f"A fresh broker process per API (its own data directory), fsync={arguments.fsync}, "
        f"{arguments.value_bytes}-byte values; one client process on 127.0.0.1, sharing the "
        "cores with the broker.\n"
        "latency p50/p99: one call at a time on one connection, from sending the request to "
        f"having the answer, over {arguments.requests} calls after {arguments.warmup} of "
        "warm-up.\n"
        "rec/s: records divided by the seconds from the first request sent to the answer for "
        "the last record (produce) or to the response holding it (consume).\n"
        "gRPC: one synchronous grpcio channel, topic wal partition 0, appends with acks=all. "
        "JSON: one keep-alive HTTP/1.1 connection (h11). native: the trio client library.",
        flush=True,
    )

    async def grpc(broker) -> None:
        await trio.to_thread.run_sync(grpc_part, broker.grpc_port, value, arguments)

    async def http(broker) -> None:
        await http_part(broker, value, arguments)

    async def native(broker) -> None:
        await native_part(broker.bootstrap, value, arguments)

    started = time.perf_counter()
    await with_broker(arguments, grpc, grpc=True)
    await with_broker(arguments, http, http=True)
    await with_broker(arguments, native)
    print(
        f"\n{'figure':<34} {'result':<30} how  "
        f"(fsync={arguments.fsync}, {arguments.value_bytes} B values, "
        f"cores={os.cpu_count()}, run took {time.perf_counter() - started:.0f} s, "
        f"load average {os.getloadavg()[0]:.1f} at the end)"
    )
    for figure, result, how in ROWS:
        print(f"{figure:<34} {result:<30} {how}")
    for problem in PROBLEMS:
        print(f"PROBLEM {problem}")
    if PROBLEMS:
        sys.exit(1)


if __name__ == "__main__":
    trio.run(main)
