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
