"""Every size, count and time limit of the client, in one place, units in the names.

`LIMITS` holds the defaults the client's classes and commands use: a keyword argument of the
same meaning (`Producer(buffer_bytes_max=...)`, `connect(request_timeout_ms=...)`) overrides
one for one object; the others are fixed. Time units follow the public argument each default
belongs to (`_s` where the API takes seconds, `_ms` where it takes milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ClientLimits:
    # -- one connection to a broker (client/connection.py)
    # A response frame announcing more is a protocol error: the connection is closed.
    response_frame_bytes_max: int = 128 * 1024 * 1024
    receive_bytes: int = 256 * 1024  # one read from a broker's socket
    inflight_requests_max: int = 32  # per connection; further requests wait for a slot
    connect_timeout_s: float = 10.0  # past it: ConnectionFailed
    # Writing one frame once its first byte is written; past it the connection is closed.
    # The cluster uses its request timeout instead.
    send_timeout_s: float = 30.0

    # -- the cluster handle (client/cluster.py)
    # A request without an answer this long fails (retriable, outcome unknown).
    request_timeout_ms: int = 30_000

    # -- the producer (client/producer.py)
    producer_linger_ms: float = 5  # a batch waits this long for more records
    producer_batch_bytes: int = 64 * 1024  # `batch_size`: a batch this full is sent at once
    producer_retries: int = 5  # counted retries of a failed batch
    producer_retry_backoff_ms: int = 100
    # Records buffered and unanswered; when full, `send` waits for room (backpressure).
    producer_buffer_bytes_max: int = 64 * 1024 * 1024
    producer_request_bytes_max: int = 8 * 1024 * 1024  # batches in one produce request
    producer_request_timeout_ms: int = 30_000  # one produce request, acks included
    producer_inflight_requests_per_partition_max: int = 5  # `max_in_flight_per_partition`
    # Its largest value with idempotence: a broker recognises a resent batch among the last 5
    # batches of a producer in a partition (Kafka's number): a larger value raises ValueError.
    producer_idempotent_inflight_requests_per_partition_max: int = 5
    # A record not delivered this long after `send` fails (retries included).
    producer_delivery_timeout_ms: int = 120_000
    # How long past its request timeout a produce request is still awaited before the
    # connection is deemed stuck.
    producer_answer_margin_s: float = 5.0
    # A record larger than this is refused when the broker does not say its own
    # max.message.bytes (Kafka's default, plus a batch's record overhead).
    producer_message_bytes_max_unknown: int = 1024 * 1024 + 12
    # The murmur2 hashes of this many recent keys, each at most this long, are remembered (a
    # pure-Python hash costs about a microsecond); the memory is forgotten whole when full.
    producer_key_hash_cache_keys_max: int = 16_384
    producer_key_hash_cache_key_bytes_max: int = 128

    # -- the consumer (client/consumer.py, client/group_membership.py)
    consumer_fetch_bytes_max: int = 32 * 1024 * 1024  # `fetch_max_bytes`: one fetch response
    consumer_partition_bytes_max: int = 4 * 1024 * 1024  # `partition_max_bytes`
    consumer_fetch_wait_ms_max: int = 500  # `max_wait_ms`: a fetch's long-poll
    consumer_fetch_bytes_min: int = 1  # `min_bytes`
    consumer_auto_commit_interval_ms: int = 5_000
    consumer_rebalance_timeout_ms: int = 60_000  # time to give up partitions in a rebalance
    consumer_retry_backoff_ms: int = 200  # first backoff after a failed poll
    consumer_retry_backoff_ms_max: int = 5_000
    consumer_skipped_batches_max: int = 1000  # reports kept for take_skipped(); older dropped
    group_retry_backoff_s: float = 0.2  # between failed group requests (x10 when unreachable)
    verify_fetch_bytes: int = 4 * 1024 * 1024  # per Fetch of `verify_partition`

    # -- the command line (client/cli.py, client/consume_command.py)
    cli_stdin_read_bytes: int = 1024 * 1024  # one read from standard input
    cli_progress_interval_s: float = 2.0  # `dwal produce` progress lines
    # The CLI producer's buffer_bytes_max; a batch (--batch-size) must fit.
    cli_produce_buffer_bytes: int = 64 * 1024 * 1024
    cli_line_bytes_max_unknown: int = 8 * 1024 * 1024  # line limit if the broker gives none
    cli_poll_timeout_ms: int = 500  # one poll of `dwal consume`
    # `dwal consume` warns from this many failed polls in a row (one blip is silent) ...
    cli_failed_polls_before_warning: int = 3
    cli_failing_s_before_warning: float = 2.0  # ... or once polls have failed this long
    cli_commit_interval_s: float = 1.0  # `dwal consume --group` commits this often


LIMITS = ClientLimits()
