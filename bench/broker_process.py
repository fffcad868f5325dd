"""A `dwal broker` process for a benchmark, started with `nursery.start(run_broker, ...)`.

The broker binds port 0 (and its HTTP and gRPC gateways port 0 when asked for them) and names
the ports it bound in its `broker_started` line on stderr. `run_broker` reads stderr for as
long as the broker runs, so the broker never blocks writing its log, and keeps the end of it
for the error raised if the broker exits on its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import trio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The whole line (up to its newline), so that a port is never read from a partial chunk;
# http_port and grpc_port are absent when their gateway is disabled.
STARTED = re.compile(rb"event=broker_started [^\n]*? port=(\d+)(?: http_port=(\d+))?[^\n]*\n")
GRPC_PORT = re.compile(rb" grpc_port=(\d+)")
OUTPUT_KEPT_BYTES = 64 * 1024  # the end of the broker's log, for the error if it exits
STOP_TIMEOUT_S = 10  # after SIGTERM, then SIGKILL


@dataclass(frozen=True, kw_only=True, slots=True)
class StartedBroker:
    pid: int
    port: int
    http_port: int | None  # None when the HTTP gateway is disabled
    grpc_port: int | None = None  # None when the gRPC gateway is disabled

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


async def run_broker(
    data_dir: str,
    *options: str,
    http: bool = False,
    grpc: bool = False,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `dwal broker` on `data_dir` until cancelled; reports a `StartedBroker` once started.

    `options` are further `dwal broker` options (`"--fsync", "never"`, `"--config", path`);
    `http` and `grpc` enable the HTTP and gRPC gateways on free ports (pass them with
    `functools.partial`). Raises RuntimeError, with the end of the broker's log, if the broker
    exits before it is cancelled. On cancellation the broker gets SIGTERM, then SIGKILL after
    STOP_TIMEOUT_S, and is reaped either way.
    """
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "client.cli", "broker", "--port", "0"]
        + ["--http-port", "0" if http else "-1", "--grpc-port", "0" if grpc else "-1"]
        + ["--data-dir", data_dir]
        + list(options),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert process.stderr is not None
        output = bytearray()
        started = False
        while chunk := await process.stderr.receive_some(65536):
            output += chunk
            if not started and (match := STARTED.search(output)):
                started = True
                http_port = None if match.group(2) is None else int(match.group(2))
                grpc_match = GRPC_PORT.search(match.group(0))
                task_status.started(
                    StartedBroker(
                        pid=process.pid,
                        port=int(match.group(1)),
                        http_port=http_port,
                        grpc_port=None if grpc_match is None else int(grpc_match.group(1)),
                    )
                )
            del output[:-OUTPUT_KEPT_BYTES]
        raise RuntimeError("broker exited:\n" + output.decode(errors="replace"))
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
