"""Operating errors of the storage layer.

Programmer errors are assertions; these are conditions a caller must handle: a damaged or
oversize batch from a producer, a fetch outside the log, a failing disk.
"""

from __future__ import annotations


class StorageError(Exception):
    """A partition log cannot do what was asked; the message says why."""


class CorruptRecordError(StorageError):
    """A record batch is damaged (length, magic, CRC) or otherwise malformed."""


class RecordTooLargeError(StorageError):
    """A record batch, or a whole append, exceeds a configured size limit."""


class OffsetOutOfRangeError(StorageError):
    """A requested offset lies outside [log_start_offset, high_watermark]."""


class InvalidRecordError(StorageError):
    """A batch breaks a rule of appends (Kafka's INVALID_RECORD): an idempotent batch that is
    not alone in its append, or lacks an epoch or a sequence. Nothing was written."""


class OutOfOrderSequenceError(StorageError):
    """An idempotent producer's batch does not follow its last one: a sequence was skipped,
    or a new epoch does not start at 0 (OUT_OF_ORDER_SEQUENCE_NUMBER). Nothing was written."""


class InvalidProducerEpochError(StorageError):
    """A batch from an older epoch of its producer id: that producer was fenced
    (INVALID_PRODUCER_EPOCH). Nothing was written."""
