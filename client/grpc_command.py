"""`dwal grpc produce` and `dwal grpc consume`: the broker's gRPC API (api/v1/log.proto,
service log.v1.Log, served with `dwal broker --grpc-port N`) from the shell.

Theory of operation
-------------------
Both commands use grpcio's synchronous client on the main thread (no trio, no threads of
their own; grpcio runs a thread that takes the requests of a stream from an iterator).

- **produce** opens ONE ProduceStream. Its request iterator, run by grpcio's thread, reads
  stdin (`select` on stdin and a wake-up pipe, then `os.read`), splits it into lines with
  `LineSplitter` (bounded memory, `LINE_BYTES_MAX`), and sends the complete lines of each
  read at once, up to `--batch` lines (and `REQUEST_BYTES_MAX` bytes) per request in
  `records`: a line typed at a terminal is sent when it is typed, a file or pipe goes in
  large requests. Before yielding a request it notes its record count and last line number
  in `pending`; the main thread takes one note per answer (the broker answers in order) and
  prints one ``PARTITION OFFSET`` line per record. The stream ends with an error status at
  the first request that fails: the command prints one ``error:`` line with the status,
  its details and how many records were acknowledged, and exits 1.
- **consume** without `--follow` reads with unary Consume calls (`max_records` records at a
  time) from `--offset` until the next offset reaches the high watermark (each answer gives
  both: `next_offset`, `high_watermark`). With
  `--follow` it reads one ConsumeStream; when the stream ends with UNAVAILABLE (the broker
  stopped, or cannot be reached) it opens a new channel and stream from the offset after
  the last record printed, after a backoff doubling from `BACKOFF_S_INITIAL` to
  `BACKOFF_S_MAX`, printing one line on stderr per attempt; records below that offset are
  dropped, so nothing is printed twice or skipped.

Signals. The first SIGINT/SIGTERM stops `consume` (exit 0, as `dwal consume`) and makes
`produce` stop reading stdin: the records already sent are answered and printed, then it
exits 0. A second signal cancels `produce` at once (exit 1 if records were left without an
answer). grpcio waits in steps of 0.1 s, so the Python handler runs promptly; it raises
`_Interrupted` only while the main thread waits for the broker (`_Signals.waiting`), never in
the middle of writing output.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from client.line_splitter import LineSplitter, OversizeLine
from client.record_format import render_json
from client.topic_partition import TopicPartition
from protocol import Record

if TYPE_CHECKING:
    from protocol.grpc_api import log_pb2

T = TypeVar("T")

DEFAULT_ADDRESS = "127.0.0.1:9090"
DEFAULT_TOPIC = "wal"  # the API's default topic (an empty `topic` means it)
DEFAULT_BATCH = 100  # lines per ProduceRequest
# The broker refuses a request with more records than its limits.grpc_records_per_response_max
# (10 000 by default).
BATCH_MAX = 10_000
# Keys and values in one ProduceRequest: well below the default max.message.bytes (1 MiB), as
# the broker appends a request's records as one batch. A longer line goes alone.
REQUEST_BYTES_MAX = 512 * 1024
# A longer line is skipped (reported on stderr): the broker refuses a batch over the topic's
# max.message.bytes (default 1048588) anyway, and memory stays bounded.
LINE_BYTES_MAX = 1024 * 1024
STDIN_READ_BYTES = 1024 * 1024
RECORDS_PER_RESPONSE = 1000  # ConsumeRequest.max_records
RECEIVE_MESSAGE_BYTES_MAX = 64 * 1024 * 1024  # the broker sends at most 8 MiB by default
CONSUME_TIMEOUT_S = 60.0  # one unary Consume call
BACKOFF_S_INITIAL = 0.1  # `consume --follow`: wait before the first reconnection attempt
BACKOFF_S_MAX = 2.0  # ... doubling up to this
# A stream that lasted this long counts as having been connected: the next failure starts
# the backoff again from BACKOFF_S_INITIAL.
CONNECTED_AFTER_S = BACKOFF_S_MAX


# -- arguments ------------------------------------------------------------------------------


def _address(text: str) -> str:
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (e.g. 127.0.0.1:9090), not {text!r}")
    return text


def _partition(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a partition number (0, 1, ...), not {text!r}")
    return int(text)


def _offset(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an offset (0, 1, ...), not {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def _batch(text: str) -> int:
    value = _count(text)
    if value > BATCH_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {BATCH_MAX}, not {text!r}")
    return value


def add_grpc_commands(commands: Any) -> None:
    """Add `grpc produce` and `grpc consume` to the `dwal` subcommands `commands`."""
    grpc_parser = commands.add_parser(
        "grpc", help="produce and consume through the gRPC API (dwal broker --grpc-port)"
    )
    grpc_commands = grpc_parser.add_subparsers(dest="grpc_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = grpc_commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--address",
            "-a",
            type=_address,
            default=DEFAULT_ADDRESS,
            help=f"the broker's gRPC address host:port (default {DEFAULT_ADDRESS})",
        )
        sub.add_argument(
            "--topic", "-t", default=DEFAULT_TOPIC, help=f"topic (default {DEFAULT_TOPIC})"
        )
        return sub

    produce = command("produce", "send stdin lines as records over one ProduceStream")
    produce.add_argument(
        "--partition",
        "-p",
        type=_partition,
        help="partition (default: chosen by the broker from the key, else round-robin)",
    )
    produce.add_argument("--key", "-k", help="key of every record (default: no key)")
    produce.add_argument(
        "--batch",
        "-b",
        type=_batch,
        default=DEFAULT_BATCH,
        help=f"at most this many lines per request, 1 to {BATCH_MAX} (default {DEFAULT_BATCH})",
    )
    produce.add_argument(
        "--quiet", "-q", action="store_true", help="print no offsets (errors only)"
    )

    consume = command("consume", "print records, one per line")
    consume.add_argument(
        "--partition", "-p", type=_partition, default=0, help="partition (default 0)"
    )
    consume.add_argument(
        "--offset", "-o", type=_offset, default=0, help="first offset to read (default 0)"
    )
    consume.add_argument(
        "--follow",
        "-F",
        action="store_true",
        help="keep printing new records (reconnecting when the broker restarts) "
        "instead of stopping at the end",
    )
    consume.add_argument(
        "--count", "-n", type=_count, help="exit after this many records (at least 1)"
    )
    consume.add_argument(
        "--format",
        "-f",
        choices=["value", "json"],
        default="value",
        help="value: the value of each record (default); json: one JSON object per record",
    )


def run_grpc_command(args: argparse.Namespace) -> int:
    """Run `dwal grpc produce|consume`; returns the exit status. Errors are one ``error:``
    line on stderr (exit 1), never a traceback."""
    # grpcio's core logs errors of its own on stderr, also those a status reports: the
    # command says what went wrong itself, on one line. Set before grpcio is imported (it
    # reads it then); a GRPC_VERBOSITY of the user's is left alone.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    signals = _Signals(interrupt_at=2 if args.grpc_command == "produce" else 1)
    signals.install()
    try:
        if args.grpc_command == "produce":
            return _Produce(args, signals).run()
        return _Consume(args, signals).run()
    except _Interrupted:
        return 0
    except BrokenPipeError:  # stdout closed (`dwal grpc consume | head`): done
        _silence_stdout()
        return 0
    except _CommandError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1


class _CommandError(Exception):
    """The command failed; the message is the whole error line (without ``error: ``)."""


class _Interrupted(BaseException):
    """Raised by the signal handler while the main thread waits: stop now. A BaseException,
    so that no ``except Exception`` of grpcio's swallows it."""


class _Signals:
    """SIGINT/SIGTERM: counted; the `interrupt_at`-th one (and any later one) raises
    `_Interrupted` while the main thread waits in `wait`, or as soon as it waits again. Each
    also writes a byte to `wake_fd` (the produce request iterator watches it)."""

    def __init__(self, *, interrupt_at: int) -> None:
        self.count = 0
        self.interrupt_at = interrupt_at
        self.waiting = False
        self.wake_fd, self._wake_write_fd = os.pipe()
        os.set_blocking(self._wake_write_fd, False)

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def wake(self) -> None:
        try:
            os.write(self._wake_write_fd, b"!")
        except BlockingIOError:  # the pipe is full: the reader will wake up anyway
            pass

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        self.wake()
        if self.waiting and self.count >= self.interrupt_at:
            self.waiting = False
            raise _Interrupted()

    def wait(self, fn: Callable[[], T]) -> T:
        """`fn()` (a blocking grpcio call, or a sleep) that a signal may interrupt."""
        if self.count >= self.interrupt_at:
            raise _Interrupted()
        self.waiting = True
        try:
            return fn()
        finally:
            self.waiting = False


def _silence_stdout() -> None:
    """After stdout was closed: send what is left to /dev/null, so that the interpreter's own
    flush at exit does not print a BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _status_text(error: Any) -> str:
    """`grpc.RpcError` (a grpc.Call) as ``CODE: details``, on one line."""
    code = error.code()
    name = code.name if code is not None else "UNKNOWN"
    details = " ".join((error.details() or "no details").split())
    return f"{name}: {details}"


def _channel(address: str) -> Any:
    import grpc

    return grpc.insecure_channel(
        address,
        options=[("grpc.max_receive_message_length", RECEIVE_MESSAGE_BYTES_MAX)],
    )


def _records(count: int) -> str:
    return f"{count} record" if count == 1 else f"{count} records"


# -- produce ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sent:
    records: int
    last_line: int  # stdin line number of the request's last record


class _Produce:
    def __init__(self, args: argparse.Namespace, signals: _Signals) -> None:
        self.args = args
        self.signals = signals
        self.key = None if args.key is None else args.key.encode()
        self.pending: collections.deque[_Sent] = collections.deque()  # sent, not answered
        self.acknowledged = 0
        self.acknowledged_line = 0
        self.skipped = 0
        self.read_error: OSError | None = None

    def run(self) -> int:
        from protocol.grpc_api import log_pb2_grpc

        import grpc

        channel = _channel(self.args.address)
        stream = log_pb2_grpc.LogStub(channel).ProduceStream(self._requests())
        try:
            self._print_answers(stream)
        except grpc.RpcError as error:
            raise _CommandError(f"{_status_text(error)}; {self._acknowledged_text()}") from None
        except _Interrupted:
            stream.cancel()
            unanswered = sum(sent.records for sent in self.pending)
            if unanswered:
                raise _CommandError(
                    f"cancelled by a second signal: {self._acknowledged_text()}; "
                    f"{_records(unanswered)} sent without an answer (they may have been stored)"
                ) from None
            return 0
        finally:
            self.signals.wake()  # the request iterator may wait for stdin: let it end
            channel.close()
        if self.pending:  # the broker ended the stream without answering everything
            raise _CommandError(
                f"the broker ended the stream without answering "
                f"{_records(sum(sent.records for sent in self.pending))}; "
                f"{self._acknowledged_text()}"
            )
        if self.read_error is not None:
            raise _CommandError(
                f"cannot read stdin: {self.read_error}; {self._acknowledged_text()}"
            )
        if self.signals.count:
            print(
                f"note: stopped by signal: {self._acknowledged_text(later=False)}; "
                "input after that was not read",
                file=sys.stderr,
                flush=True,
            )
        return 1 if self.skipped else 0

    def _acknowledged_text(self, *, later: bool = True) -> str:
        if not self.acknowledged:
            return "0 records acknowledged"
        text = (
            f"{_records(self.acknowledged)} acknowledged (up to line {self.acknowledged_line} "
            "of stdin)"
        )
        return text + "; later lines were not acknowledged" if later else text

    def _print_answers(self, stream: Iterator[log_pb2.ProduceResponse]) -> None:
        out = sys.stdout.buffer
        while True:
            response = self.signals.wait(lambda: next(stream, None))
            if response is None:
                return
            if not self.pending:
                raise _CommandError(
                    f"the broker answered more requests than were sent; {self._acknowledged_text()}"
                )
            sent = self.pending.popleft()
            self.acknowledged += sent.records
            self.acknowledged_line = sent.last_line
            if not self.args.quiet:
                partition, first = response.partition, response.offset
                out.write(
                    b"".join(
                        b"%d %d\n" % (partition, offset)
                        for offset in range(first, first + sent.records)
                    )
                )
                out.flush()

    def _requests(self) -> Iterator[log_pb2.ProduceRequest]:
        """The stream's requests, from stdin (run by grpcio's request thread). Ends at the
        end of stdin, on a signal or `wake`, or on a read error (kept in `read_error`)."""
        splitter = LineSplitter(LINE_BYTES_MAX)
        line_number = 0
        try:
            descriptor = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):  # no stdin at all: no input
            return
        while not self.signals.count:
            try:
                ready, _, _ = select.select([descriptor, self.signals.wake_fd], [], [])
                if self.signals.wake_fd in ready:
                    return
                chunk = os.read(descriptor, STDIN_READ_BYTES)
            except InterruptedError:
                continue
            except OSError as error:
                self.read_error = error
                return
            lines: list[bytes | None] = []  # None: a skipped line
            for line in splitter.feed(chunk) if chunk else splitter.finish():
                line_number += 1
                if isinstance(line, OversizeLine):
                    self.skipped += 1
                    print(
                        f"error: line {line.line_number} of stdin has at least "
                        f"{line.size_bytes_min} bytes, over the limit of {LINE_BYTES_MAX}: "
                        "line skipped",
                        file=sys.stderr,
                        flush=True,
                    )
                    lines.append(None)
                else:
                    lines.append(line)
            yield from self._requests_of(lines, line_number - len(lines) + 1)
            if not chunk:
                return

    def _requests_of(
        self, lines: list[bytes | None], first_line_number: int
    ) -> Iterator[log_pb2.ProduceRequest]:
        """Requests for `lines` (line `first_line_number` first; None: skipped): at most
        `--batch` records and about REQUEST_BYTES_MAX bytes each."""
        from protocol.grpc_api import log_pb2

        batch: list[log_pb2.Record] = []
        size = 0
        line_number = first_line_number - 1
        for line in lines:
            line_number += 1
            if line is None:
                continue
            record_bytes = len(line) + len(self.key or b"")
            if batch and (len(batch) >= self.args.batch or size + record_bytes > REQUEST_BYTES_MAX):
                yield self._request(batch, line_number - 1)
                batch, size = [], 0
            record = log_pb2.Record(value=line)
            if self.key is not None:
                record.key = self.key
            batch.append(record)
            size += record_bytes
        if batch:
            yield self._request(batch, line_number)

    def _request(self, records: list, last_line: int) -> log_pb2.ProduceRequest:
        """The request for `records`, noted in `pending` (before grpcio sends it, so the
        note is there when its answer comes)."""
        from protocol.grpc_api import log_pb2

        request = log_pb2.ProduceRequest(topic=self.args.topic, records=records)
        if self.args.partition is not None:
            request.partition = self.args.partition
        self.pending.append(_Sent(len(records), last_line))
        return request


# -- consume ----------------------------------------------------------------------------


class _Consume:
    def __init__(self, args: argparse.Namespace, signals: _Signals) -> None:
        self.args = args
        self.signals = signals
        self.next_offset: int = args.offset
        self.printed = 0
        self.tp = TopicPartition(args.topic or DEFAULT_TOPIC, args.partition)

    @property
    def done(self) -> bool:
        return self.args.count is not None and self.printed >= self.args.count

    def run(self) -> int:
        import grpc

        try:
            if self.args.follow:
                self._follow()
            else:
                self._read_to_end()
        except grpc.RpcError as error:
            progress = ""
            if self.printed:
                progress = f" ({_records(self.printed)} printed; the next offset is "
                progress += f"{self.next_offset})"
            raise _CommandError(_status_text(error) + progress) from None
        return 0

    def _request(self, max_records: int) -> log_pb2.ConsumeRequest:
        from protocol.grpc_api import log_pb2

        return log_pb2.ConsumeRequest(
            topic=self.args.topic,
            partition=self.args.partition,
            offset=self.next_offset,
            max_records=max_records,
        )

    def _max_records(self) -> int:
        if self.args.count is None:
            return RECORDS_PER_RESPONSE
        return max(1, min(RECORDS_PER_RESPONSE, self.args.count - self.printed))

    def _read_to_end(self) -> None:
        """Unary Consume calls until the next offset reaches the high watermark (each
        answer with `max_records` says both)."""
        from protocol.grpc_api import log_pb2_grpc

        channel = _channel(self.args.address)
        try:
            stub = log_pb2_grpc.LogStub(channel)
            while not self.done:
                call = stub.Consume.future(
                    self._request(self._max_records()), timeout=CONSUME_TIMEOUT_S
                )
                try:
                    response = self.signals.wait(call.result)
                except _Interrupted:
                    call.cancel()
                    raise
                self._print(response.records)
                # past offsets that hold no record any more (compaction, markers)
                self.next_offset = max(self.next_offset, response.next_offset)
                if self.next_offset >= response.high_watermark:
                    return
        finally:
            channel.close()

    def _follow(self) -> None:
        """One ConsumeStream at a time; a new one from the next offset after UNAVAILABLE."""
        from protocol.grpc_api import log_pb2_grpc

        import grpc

        attempt = 0
        while not self.done:
            channel = _channel(self.args.address)
            stream = log_pb2_grpc.LogStub(channel).ConsumeStream(
                self._request(RECORDS_PER_RESPONSE)
            )
            started = time.monotonic()
            failure = "the stream ended"
            try:
                while not self.done:
                    response = self.signals.wait(lambda: next(stream, None))
                    if response is None:
                        break
                    if attempt:
                        print(
                            f"note: following again from offset {self.next_offset}",
                            file=sys.stderr,
                            flush=True,
                        )
                        attempt = 0
                    if response.records:
                        self._print(response.records)
                    elif response.HasField("record"):
                        self._print([response.record])
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                failure = _status_text(error)
            finally:
                stream.cancel()
                channel.close()
            if self.done:
                return
            if time.monotonic() - started >= CONNECTED_AFTER_S:
                attempt = 0
            attempt += 1
            delay = min(BACKOFF_S_MAX, BACKOFF_S_INITIAL * 2 ** (attempt - 1))
            print(
                f"note: {failure}; reconnecting from offset {self.next_offset} in "
                f"{delay:.1f} s (attempt {attempt})",
                file=sys.stderr,
                flush=True,
            )
            self.signals.wait(lambda: time.sleep(delay))

    def _print(self, records: Any) -> None:
        """Print `records` (log_pb2.Record) from the next offset on, up to --count."""
        chunks = []
        for message in records:
            if message.offset < self.next_offset:
                continue  # already printed (a stream resumed from an earlier offset)
            if self.done:
                break
            if self.args.format == "json":
                key = message.key if message.HasField("key") else None
                record = Record(
                    message.offset,
                    message.timestamp,
                    key,
                    message.value,
                    [(header.key, header.value) for header in message.headers],
                )
                chunks.append(render_json(self.tp, record))
            else:
                chunks.append(message.value + b"\n")
            self.next_offset = message.offset + 1
            self.printed += 1
        if chunks:
            out = sys.stdout.buffer
            out.write(b"".join(chunks))
            out.flush()
