"""DWAL's wire protocol, sans-I/O: bytes in, typed values out, and back.

Nothing here opens a socket or a file or imports trio.
"""

from .api import (
    ACKS_ALL,
    ACKS_LEADER,
    ACKS_NONE,
    API_VERSIONS,
    EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
    ApiKey,
    check_request,
    check_response,
    check_tail_sizes,
)
from .errors import DwalError, ErrorCode, ProtocolError, ProtocolUsageError
from .frame import (
    FrameDecoder,
    Request,
    Response,
    encode_request,
    encode_response,
    frame_prefix,
    parse_request,
    parse_response,
    response_prefix,
)
from .kafka_records import decode_kafka_records, encode_kafka_batch
from .kafka_transcode import check_kafka_batches, to_kafka_batches
from .partitioning import partition_for_key
from .record_batch import (
    HEADER_BYTES,
    BatchHeader,
    Compression,
    Record,
    build_batch,
    complete_prefix_bytes,
    decode_records,
    encode_batch,
    encode_packed_batch,
    last_batch_header,
    parse_header,
    scan_batches,
)
from .topic_name import validate_topic_name

__all__ = [
    "ACKS_ALL",
    "ACKS_LEADER",
    "ACKS_NONE",
    "API_VERSIONS",
    "EARLIEST_TIMESTAMP",
    "LATEST_TIMESTAMP",
    "ApiKey",
    "check_request",
    "check_response",
    "check_tail_sizes",
    "DwalError",
    "ErrorCode",
    "ProtocolError",
    "ProtocolUsageError",
    "FrameDecoder",
    "Request",
    "Response",
    "encode_request",
    "encode_response",
    "frame_prefix",
    "parse_request",
    "parse_response",
    "response_prefix",
    "HEADER_BYTES",
    "BatchHeader",
    "Compression",
    "Record",
    "build_batch",
    "complete_prefix_bytes",
    "decode_records",
    "encode_batch",
    "encode_packed_batch",
    "last_batch_header",
    "parse_header",
    "scan_batches",
    "validate_topic_name",
    "decode_kafka_records",
    "encode_kafka_batch",
    "check_kafka_batches",
    "to_kafka_batches",
    "partition_for_key",
]
