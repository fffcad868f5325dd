"""The bodies of `dwal consume` (alone or in a group) and `dwal verify`.

What an operator sees when things go wrong, on stderr (stdout carries only records):

- broker unreachable or partitions not ready: from the third failed poll in a row, or once
  polls have failed for 2 s (`cli_failed_polls_before_warning`, `cli_failing_s_before_warning`
  in client/limits.py; an unanswered fetch takes the request timeout, 30 s), one
  ``warning: ... retrying (attempt N)`` line per attempt (the consumer's backoff doubles up
  to 5 s, so at most one line every 5 s); once polls succeed
  again, one ``note: reading again after N failed attempts`` line. With ``--give-up-after
  SECONDS`` the command exits 1 once polls have failed for that long (the error names the
  last cause, typically NETWORK_EXCEPTION).
- one partition without a leader (its leader died, LEADER_NOT_AVAILABLE) or whose leader
  moved, while others are readable: the others are read and printed as usual; the same
  thresholds apply to that partition's failed attempts, with lines
  ``warning: ev-1: ... retrying (attempt N)`` and, once it is read again,
  ``note: ev-1 readable again after N failed attempts``. Its start offset (``--offset
  earliest|latest``) is resolved once it has a leader; ``--offset N`` is checked against
  its range only if it has a leader at the start (else a warning says so).
- a damaged record batch: the records before it are printed, then the command exits 1 with
  an error naming topic, partition and offsets; with ``--skip-corrupt`` it prints
  ``warning: skipped damaged record batch ...`` and goes on.
- stdout closed (``dwal consume t | head``): the command stops, exit 0, even while no
  records arrive.

Usage errors raise ConsumeUsageError, a ValueError, which the CLI reports with exit 2.
"""

from __future__ import annotations

import argparse
import select
import sys
from typing import Callable

import trio

from client.limits import LIMITS
from client.batch_damage import CorruptRecordError, PartitionVerification, verify_partition
from client.consumer import Consumer, TopicPartition, list_offsets_where_possible
from client.record_format import RecordFormat, compile_format, render
from protocol import EARLIEST_TIMESTAMP, LATEST_TIMESTAMP, DwalError, ErrorCode


class ConsumeUsageError(ValueError):
    pass


def check_consume_arguments(args: argparse.Namespace) -> None:
    """Refuse option combinations that make no sense; raises ConsumeUsageError."""
    if args.group is not None and not args.group.strip():
        raise ConsumeUsageError("--group needs a group id (it is empty)")
    if args.instance_id is not None and args.group is None:
        raise ConsumeUsageError("--instance-id only applies with --group")
    if args.instance_id is not None and not args.instance_id.strip():
        raise ConsumeUsageError("--instance-id needs an id (it is empty)")
    if args.group is not None and (args.partition or args.offset != "earliest"):
        raise ConsumeUsageError(
            "--group takes its partitions and offsets from the group: "
            "use 'dwal group reset-offsets' to move them"
        )
    _compile(args.format)


def _compile(text: str) -> RecordFormat:
    try:
        return compile_format(text)
    except ValueError as error:
        raise ConsumeUsageError(str(error)) from None


def _consumer_options(args: argparse.Namespace) -> dict:
    give_up = args.give_up_after
    return {
        "auto_offset_reset": "earliest",
        "give_up_after_ms": None if give_up is None else int(give_up * 1000),
        "skip_corrupt": args.skip_corrupt,
    }


async def consume_command(cluster, args: argparse.Namespace, stop: trio.Event) -> int:
    check_consume_arguments(args)
    fmt = _compile(args.format)
    consumer = Consumer(cluster, **_consumer_options(args))
    info = await cluster.topic(args.topic)
    partitions = args.partition if args.partition else [p.partition for p in info.partitions]
    for partition in partitions:
        if not 0 <= partition < len(info.partitions):
            raise ConsumeUsageError(f"topic {args.topic} has no partition {partition}")
    consumer.assign([TopicPartition(args.topic, p) for p in partitions])
    await apply_start_offset(consumer, args.offset)
    with trio.CancelScope() as following:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until, stop, following)
            await print_records(consumer, fmt, args.num, exit_at_end=args.exit_at_end)
            nursery.cancel_scope.cancel()
    return 0


async def _until(stop: trio.Event, scope: trio.CancelScope) -> None:
    await stop.wait()
    scope.cancel()


class _FailureReport:
    """Turns the consumer's count of failed polls, and of each partition's failed attempts,
    into warning and recovery lines."""

    def __init__(self) -> None:
        self.reported = 0
        self.warned = False
        self.partitions_reported: dict[TopicPartition, int] = {}
        self.partitions_warned: set[TopicPartition] = set()

    def after_poll(self, consumer: Consumer) -> None:
        self._after_poll(consumer)
        self._partitions_after_poll(consumer)

    def _partitions_after_poll(self, consumer: Consumer) -> None:
        """Per partition set aside while the poll itself works (when every partition fails,
        the poll's own lines say so)."""
        statistics = consumer.statistics()
        failing = statistics.failing_partitions
        now = trio.current_time()
        for tp, failure in sorted(failing.items()):
            long_enough = now - failure.failing_since_s >= LIMITS.cli_failing_s_before_warning
            if (
                not statistics.failed_polls
                and (failure.attempts >= LIMITS.cli_failed_polls_before_warning or long_enough)
                and failure.attempts > self.partitions_reported.get(tp, 0)
            ):
                name = f"{tp.topic}-{tp.partition}"
                error = failure.last_error
                message = (
                    error.message
                    if error.message.startswith(name)
                    else (f"{name}: {error.message}")
                )
                _warn(
                    f"warning: {message} ({error.code.name}); retrying (attempt {failure.attempts})"
                )
                self.partitions_warned.add(tp)
            self.partitions_reported[tp] = failure.attempts
        for tp in sorted(self.partitions_warned - set(failing)):
            attempts = self.partitions_reported.get(tp, 0)
            _warn(
                f"note: {tp.topic}-{tp.partition} readable again after {attempts} failed attempts"
            )
            self.partitions_warned.discard(tp)
        for tp in set(self.partitions_reported) - set(failing):
            del self.partitions_reported[tp]

    def _after_poll(self, consumer: Consumer) -> None:
        statistics = consumer.statistics()
        failed, error = statistics.failed_polls, statistics.last_error
        since = statistics.failing_since_s
        long_enough = (
            since is not None and trio.current_time() - since >= LIMITS.cli_failing_s_before_warning
        )
        if (
            (failed >= LIMITS.cli_failed_polls_before_warning or long_enough)
            and failed > self.reported
            and error
        ):
            cause = "broker unreachable: " if error.code == ErrorCode.NETWORK_EXCEPTION else ""
            _warn(
                f"warning: {cause}{error.message} ({error.code.name}); retrying (attempt {failed})"
            )
            self.warned = True
        elif not failed and self.warned:
            _warn(f"note: reading again after {self.reported} failed attempts")
            self.warned = False
        self.reported = failed


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def print_records(
    consumer: Consumer,
    fmt: RecordFormat,
    num: int | None,
    printed: dict[TopicPartition, int] | None = None,
    *,
    exit_at_end: bool = False,
) -> None:
    """Print polled records until `num` are printed (forever when None), every assigned
    partition is at its end (`exit_at_end`), or stdout is closed. Records in `printed` the
    next offset per partition after each write (and past skipped damage), for group commits.
    Raises DwalError (CorruptRecordError with a hint) when the consumer gives up."""
    remaining = num
    out = sys.stdout.buffer
    failures = _FailureReport()
    while remaining is None or remaining > 0:
        try:
            batches = await consumer.poll(timeout_ms=LIMITS.cli_poll_timeout_ms)
        except CorruptRecordError as error:
            raise DwalError(
                error.code,
                f"{error.message}; the records before it were printed "
                "(--skip-corrupt skips damaged batches)",
            ) from None
        failures.after_poll(consumer)
        _report_skipped(consumer, printed)
        chunks = []
        done: dict[TopicPartition, int] = {}
        for tp, records in batches.items():
            if remaining is not None:
                records = records[:remaining]
                remaining -= len(records)
            if records:
                done[tp] = records[-1].offset + 1
            if fmt.value_only:
                chunks.append(b"".join([(r.value or b"") + b"\n" for r in records]))
            else:
                chunks.extend(render(fmt, tp, r) for r in records)
        if chunks:
            out.write(b"".join(chunks))
            out.flush()
        if printed is not None:
            printed.update(done)
        if (exit_at_end and _at_end(consumer)) or _stdout_closed():
            return


def _report_skipped(consumer: Consumer, printed: dict[TopicPartition, int] | None) -> None:
    for error in consumer.take_skipped():
        _warn(f"warning: skipped {error.message}")
        tp = TopicPartition(error.topic, error.partition)
        if printed is not None and error.last_offset is not None:
            printed[tp] = max(printed.get(tp, 0), error.last_offset + 1)


def _at_end(consumer: Consumer) -> bool:
    """Every assigned partition's position has reached its last fetched high watermark."""
    assignment = consumer.assignment()
    if not assignment:
        return False
    for tp in assignment:
        position, high_watermark = consumer.position(tp), consumer.high_watermark(tp)
        if position is None or high_watermark is None or position < high_watermark:
            return False
    return True


def _stdout_closed() -> bool:
    """True once nobody reads stdout any more (the reader of a pipe exited), which a
    consumer that writes nothing would otherwise only learn at its next record."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # error and hang-up conditions only
        events = poller.poll(0)
    except (OSError, ValueError, AttributeError):
        return False
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in events)


async def group_consume_command(cluster, args: argparse.Namespace, stop: trio.Event) -> int:
    """Consume as a group member. Commits exactly what was printed: every second, when the
    group takes partitions away, and when stopped (SIGINT/SIGTERM, --num, --exit-at-end,
    stdout closed), then leaves."""
    check_consume_arguments(args)
    await cluster.topic(args.topic)  # an unknown topic is an error, not an empty group
    fmt = _compile(args.format)
    printed: dict[TopicPartition, int] = {}
    committed: dict[TopicPartition, int] = {}

    async def commit(partitions=None) -> None:
        due = {
            tp: o
            for tp, o in printed.items()
            if committed.get(tp) != o and (partitions is None or tp in partitions)
        }
        if due:
            await consumer.commit(due)
            committed.update(due)

    async def on_revoked(partitions) -> None:
        # Also run by close(). A commit refused here (the group moved on while the broker
        # was away) is a warning: those records will be read again, never lost.
        try:
            await commit(partitions)
        except DwalError as error:
            _warn(f"warning: commit of revoked partitions failed: {error.message}")
        for tp in partitions:
            printed.pop(tp, None)

    consumer = Consumer(
        cluster,
        group_id=args.group,
        group_instance_id=args.instance_id,
        enable_auto_commit=False,
        on_revoked=on_revoked,
        **_consumer_options(args),
    )
    async with consumer:
        consumer.subscribe([args.topic])
        try:
            with trio.CancelScope() as following:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until, stop, following)
                    nursery.start_soon(_commit_periodically, commit, consumer)
                    await print_records(
                        consumer, fmt, args.num, printed, exit_at_end=args.exit_at_end
                    )
                    nursery.cancel_scope.cancel()
        finally:  # also on an error (damaged batch, giving up): what was printed is done
            with trio.CancelScope(shield=True):  # commit before leaving: the group is ours
                try:
                    await commit()
                except DwalError as error:
                    _warn(f"warning: final commit failed: {error.message}")
    return 0


async def _commit_periodically(commit: Callable, consumer: Consumer) -> None:
    while True:
        await trio.sleep(LIMITS.cli_commit_interval_s)
        if consumer.statistics().failed_polls:
            continue  # the poll loop already says the broker is away
        try:
            await commit()
        except DwalError as error:
            _warn(f"warning: commit failed: {error.message}")


async def apply_start_offset(consumer: Consumer, offset: str) -> None:
    if offset == "earliest":
        await consumer.seek_to_beginning()
    elif offset == "latest":
        await consumer.seek_to_end()
    elif offset.isdigit():
        assignment = consumer.assignment()
        starts, failed = await list_offsets_where_possible(
            consumer.cluster, assignment, EARLIEST_TIMESTAMP
        )
        ends, failed_end = await list_offsets_where_possible(
            consumer.cluster, [tp for tp in assignment if tp not in failed], LATEST_TIMESTAMP
        )
        failed.update(failed_end)
        for tp in assignment:
            error = failed.get(tp)
            if error is not None:
                if not error.retriable:
                    raise error
                _warn(
                    f"warning: {tp.topic}-{tp.partition}: cannot check offset {offset} against "
                    f"its range now ({error.code.name}); reading from it once it has a leader "
                    "(from its earliest offset if it is out of range)"
                )
                consumer.seek(tp, int(offset))
                continue
            if not starts[tp] <= int(offset) <= ends[tp]:
                raise DwalError(
                    ErrorCode.OFFSET_OUT_OF_RANGE,
                    f"offset {offset} is outside {tp.topic}-{tp.partition}'s range "
                    f"[{starts[tp]}, {ends[tp]}]",
                )
            consumer.seek(tp, int(offset))
    else:
        raise ConsumeUsageError("--offset must be earliest, latest or a non-negative offset")


async def verify_command(cluster, args: argparse.Namespace) -> int:
    """Check every batch's CRC in the topic's partitions; print one row per partition and
    one line per damaged range. Raises DwalError (CORRUPT_MESSAGE, exit 1) on damage."""
    info = await cluster.topic(args.topic)
    partitions = args.partition if args.partition else [p.partition for p in info.partitions]
    for partition in partitions:
        if not 0 <= partition < len(info.partitions):
            raise ConsumeUsageError(f"topic {args.topic} has no partition {partition}")
    print(
        f"{'PARTITION':>9} {'LOG-START':>12} {'HIGH-WATERMARK':>15} "
        f"{'BATCHES':>9} {'RECORDS':>12}  STATUS"
    )
    reports: list[PartitionVerification] = []
    for partition in partitions:
        report = await verify_partition(cluster, TopicPartition(args.topic, partition))
        reports.append(report)
        status = f"damaged ({len(report.damaged)})" if report.damaged else "ok"
        print(
            f"{partition:>9} {report.start_offset:>12} {report.end_offset:>15} "
            f"{report.batches:>9} {report.records:>12}  {status}",
            flush=True,
        )
    damaged = [(r.partition, d) for r in reports for d in r.damaged]
    for tp, damage in damaged:
        offsets = (
            f"offsets {damage.first_offset}..{damage.last_offset}"
            if damage.last_offset is not None
            else f"from offset {damage.first_offset} (the rest of the partition was not read)"
        )
        print(f"damaged: {tp.topic}-{tp.partition} {offsets}: {damage.reason}")
    if damaged:
        raise DwalError(
            ErrorCode.CORRUPT_MESSAGE,
            f"{len(damaged)} damaged batch(es) in topic {args.topic}",
        )
    return 0
