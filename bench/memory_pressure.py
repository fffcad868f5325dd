"""Broker memory while many connections send large frames at once.

Starts a fresh `dwal broker` with the given `[limits]`, opens N connections, and on each sends
all but the last byte of one large frame (an ApiVersions request whose raw tail the broker
ignores). Once the senders have pushed for `--seconds`, it records the broker's resident
memory, sends the last bytes, reads every answer and records the peak resident memory of the
whole run (VmHWM of /proc/PID/status). Prints one line:

    dwal_memory_pressure connections=N frame_mib=F budget_mib=B sent_mib_while_stalled=S
        rss_while_stalled_mib=R rss_peak_mib=P answered=A seconds_to_answer_all=T

Without the shared budget the broker would buffer about N x F MiB; with it, the peak stays
near the budget plus the interpreter's own footprint. Linux only (reads /proc).
Usage: python bench/memory_pressure.py [--connections N] [--frame-mib F] [--budget-mib B]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.broker_process import run_broker  # noqa: E402
from protocol import ApiKey, FrameDecoder, Request, encode_request, parse_response  # noqa: E402

MIB = 1024 * 1024


def memory_mib(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status (VmRSS: now, VmHWM: peak), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


async def send_frame(port: int, frame: memoryview, go_on: trio.Event, sent: list[int]) -> bool:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        position = 0
        while position < len(frame) - 1:  # keep the last byte back until told
            piece = frame[position : min(position + MIB, len(frame) - 1)]
            await stream.send_all(piece)
            position += len(piece)
            sent[0] += len(piece)
        await go_on.wait()
        await stream.send_all(frame[-1:])
        decoder = FrameDecoder()
        while (answer := decoder.next_frame()) is None:
            data = await stream.receive_some(65536)
            if not data:
                return False
            decoder.feed(data)
        return parse_response(*answer).correlation_id == 1


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--frame-mib", type=int, default=60)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0, help="time the senders push")
    args = parser.parse_args()
    frame_bytes_max = 64 * MIB
    assert args.frame_mib * MIB < frame_bytes_max
    frame = memoryview(
        encode_request(
            Request(
                api_key=ApiKey.API_VERSIONS,
                api_version=0,
                correlation_id=1,
                client_id="bench",
                body={},
                tail=b"t" * (args.frame_mib * MIB),
            )
        )
    )
    with tempfile.TemporaryDirectory() as directory:
        config_path = os.path.join(directory, "dwal.toml")
        with open(config_path, "w") as config:
            config.write(
                f"[limits]\nframe_bytes_max = {frame_bytes_max}\n"
                f"queued_request_bytes_max = {args.budget_mib * MIB}\n"
            )
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(run_broker, directory + "/data", "--config", config_path)
            go_on = trio.Event()
            sent = [0]
            answered = [0]

            async def sender() -> None:
                ok = await send_frame(broker.port, frame, go_on, sent)
                answered[0] += ok

            async with trio.open_nursery() as senders:
                for _ in range(args.connections):
                    senders.start_soon(sender)
                await trio.sleep(args.seconds)
                stalled_mib = memory_mib(broker.pid, "VmRSS")
                sent_while_stalled = sent[0]
                started = time.perf_counter()
                go_on.set()
            elapsed = time.perf_counter() - started
            peak_mib = memory_mib(broker.pid, "VmHWM")
            nursery.cancel_scope.cancel()
    print(
        f"dwal_memory_pressure connections={args.connections} frame_mib={args.frame_mib} "
        f"budget_mib={args.budget_mib} sent_mib_while_stalled={sent_while_stalled / MIB:.0f} "
        f"rss_while_stalled_mib={stalled_mib:.0f} rss_peak_mib={peak_mib:.0f} "
        f"answered={answered[0]} seconds_to_answer_all={elapsed:.1f}"
    )


if __name__ == "__main__":
    trio.run(main)
