"""What handlers share to answer requests: an exception's wire error, and waiting for the
first of several events (a long poll)."""

from __future__ import annotations

import trio

from broker.storage import (
    CorruptRecordError,
    InvalidProducerEpochError,
    InvalidRecordError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    RecordTooLargeError,
    StorageError,
)
from protocol import DwalError, ErrorCode


def error_of(error: BaseException) -> tuple[ErrorCode, str]:
    """The error code and message that answer a request failing with `error`; re-raises
    anything that is not a DwalError or a storage error (a bug must not become an answer)."""
    if isinstance(error, DwalError):
        return error.code, error.message
    if isinstance(error, CorruptRecordError):
        return ErrorCode.CORRUPT_MESSAGE, str(error)
    if isinstance(error, RecordTooLargeError):
        return ErrorCode.MESSAGE_TOO_LARGE, str(error)
    if isinstance(error, OffsetOutOfRangeError):
        return ErrorCode.OFFSET_OUT_OF_RANGE, str(error)
    if isinstance(error, InvalidRecordError):
        return ErrorCode.INVALID_RECORD, str(error)
    if isinstance(error, OutOfOrderSequenceError):
        return ErrorCode.OUT_OF_ORDER_SEQUENCE_NUMBER, str(error)
    if isinstance(error, InvalidProducerEpochError):
        return ErrorCode.INVALID_PRODUCER_EPOCH, str(error)
    if isinstance(error, (StorageError, OSError)):
        return ErrorCode.KAFKA_STORAGE_ERROR, f"storage error: {error}"
    raise error


async def wait_any(events: list[trio.Event]) -> None:
    """Return when any of `events` is set (never, when there are none)."""
    if not events:
        await trio.sleep_forever()
    if len(events) == 1:
        await events[0].wait()
        return
    async with trio.open_nursery() as nursery:

        async def wait_one(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in set(events):
            nursery.start_soon(wait_one, event)
