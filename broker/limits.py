"""Every size, count and time limit of the broker, in one place, units in the names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Limits:
    frame_bytes_max: int = 64 * 1024 * 1024
    frame_header_bytes_max: int = 1024 * 1024
    inflight_requests_max: int = 64  # per connection; more stops reading from the socket
    connections_max: int = 10_000
    fetch_bytes_max: int = 64 * 1024 * 1024  # one fetch response, all partitions
    fetch_wait_ms_max: int = 60_000
    partitions_per_topic_max: int = 10_000
    topics_max: int = 100_000
    socket_receive_bytes: int = 256 * 1024
    # Once a frame's first byte has arrived, the rest must arrive within this time (time the
    # broker spends not reading, e.g. waiting for memory, does not count); past it the
    # connection is closed and the frame's memory reservation released (slow-loris bound).
    request_read_timeout_ms: int = 30_000
    # A native connection that has sent nothing and has had nothing to answer for this long
    # is closed (Kafka's connections.max.idle.ms); it holds no request memory meanwhile.
    connections_idle_ms_max: int = 10 * 60 * 1000
    # Bytes of requests being read or waiting to be handled, summed over every connection of
    # every listener (native frames and HTTP bodies); when spent, the broker stops reading.
    queued_request_bytes_max: int = 256 * 1024 * 1024
    http_body_bytes_max: int = 8 * 1024 * 1024  # larger: 413
    http_header_bytes_max: int = 16 * 1024  # request line plus headers; larger: 431
    http_receive_bytes: int = 64 * 1024  # one read from an HTTP connection
    http_connections_max: int = 1024  # more: answered 503 (or closed, see http_refusals_max)
    http_refusals_max: int = 64  # connections being answered 503 at once; more are just closed
    http_linger_bytes_max: int = 1024 * 1024  # drained from a client before closing on error
    http_fetch_records_max: int = 10_000
    # From waiting for a request (keep-alive idle time included) to its last byte; past it the
    # gateway answers 408 (or just closes an idle connection). Waiting for memory does not count.
    http_request_read_timeout_ms: int = 60_000
    http_response_write_timeout_ms: int = 60_000  # writing one response; past it: closed
    http_linger_timeout_ms: int = 2_000  # draining a client's unread bytes before closing
    http_produce_records_max: int = 10_000  # records in one HTTP produce body; more: 413
    # Bytes of batches one HTTP fetch reads (plus at most one batch); past it the answer ends
    # early and the client asks again from the next offset.
    http_fetch_bytes_max: int = 4 * 1024 * 1024
    http_append_timeout_ms: int = 30_000  # an HTTP produce waiting for its fsync; then an error
    http_query_fields_max: int = 16  # parameters in one query string; more: 400
    # The gRPC gateway. Messages larger than this (either way) are refused with
    # RESOURCE_EXHAUSTED (gRPC's usual default). grpcio reads a call's message whole before
    # the broker sees it, so requests hold at most about concurrent calls x 2 x this (a
    # stream's read-ahead is bounded by it too): 2 GiB with the defaults, in the worst case.
    grpc_message_bytes_max: int = 4 * 1024 * 1024
    grpc_concurrent_rpcs_max: int = 256  # calls at once (streams included); more: refused
    grpc_records_per_response_max: int = 10_000  # ConsumeRequest.max_records is capped here
    # ProduceStream requests read ahead of their answers, per stream (then it stops reading);
    # at most grpc_message_bytes_max bytes of them
    grpc_stream_requests_queued_max: int = 256
    grpc_append_timeout_ms: int = 30_000  # a Produce waiting for acks=all; then an error
    # How often the broker looks for logs whose periodic flush is due (fsync=interval's
    # flush.ms is honoured to within this).
    flush_check_interval_ms: int = 50
    # How often consumer groups are checked for members whose session expired and for topics
    # whose partition count changed; an expiry is noticed up to this late.
    group_expiry_check_interval_ms: int = 250
    # Under fsync=always/never, a log with new data is flushed and its recovery point recorded
    # this often, so a restart rescans little of it.
    recovery_point_interval_ms: int = 60_000
    # Distinct keys one compaction of a partition maps (~150 bytes each); a log with more is
    # compacted in several passes, each up to the offset where the map filled.
    cleaner_keys_max: int = 1_000_000
    # A segment file's cached descriptor unused this long is closed (after one to two such
    # intervals), so idle partitions hold no descriptor; reopened on the next use.
    open_files_idle_ms: int = 60_000
    # The cluster. An admin request (forwarded or in process) reaching the active controller
    # and, once decided, this broker's image applying the change.
    controller_request_timeout_ms: int = 30_000
    # A stopping broker's wait for the controller to take its controlled shutdown.
    controlled_shutdown_timeout_ms: int = 2_000
    # A connection to the controller port must show its first frame within this; else closed.
    controller_first_frame_timeout_ms: int = 10_000
    # The largest answer a broker accepts from the controller (they are small).
    controller_response_bytes_max: int = 16 * 1024 * 1024

    @property
    def largest_request_bytes(self) -> int:
        """The most one request reserves in the memory pool: a native frame with its 4-byte
        length prefix, or an HTTP body."""
        return max(self.frame_bytes_max + 4, self.http_body_bytes_max)

    def problems(self) -> list[str]:
        """What is wrong with these limits, as messages naming the setting (empty if fine)."""
        problems = []
        if not self.frame_bytes_max > self.frame_header_bytes_max >= 1024:
            problems.append(
                "limits.frame_header_bytes_max must be at least 1024 and below "
                "limits.frame_bytes_max"
            )
        if self.fetch_bytes_max < 1024:
            problems.append("limits.fetch_bytes_max must be at least 1024")
        if self.socket_receive_bytes < 4096:
            problems.append("limits.socket_receive_bytes must be at least 4096")
        if self.request_read_timeout_ms < 100:
            problems.append("limits.request_read_timeout_ms must be at least 100")
        if self.connections_idle_ms_max < 1000:
            problems.append("limits.connections_idle_ms_max must be at least 1000")
        if self.queued_request_bytes_max < self.largest_request_bytes:
            problems.append(
                "limits.queued_request_bytes_max must be at least limits.frame_bytes_max + 4 "
                "(a whole frame with its length prefix) and at least limits.http_body_bytes_max"
            )
        if self.http_header_bytes_max < 1024:
            problems.append("limits.http_header_bytes_max must be at least 1024")
        if self.http_receive_bytes < 4096:
            problems.append("limits.http_receive_bytes must be at least 4096")
        for name in ("http_request_read_timeout_ms", "http_response_write_timeout_ms"):
            if getattr(self, name) < 100:
                problems.append(f"limits.{name} must be at least 100")
        if self.http_fetch_bytes_max < 1024:
            problems.append("limits.http_fetch_bytes_max must be at least 1024")
        if self.http_append_timeout_ms < 100:
            problems.append("limits.http_append_timeout_ms must be at least 100")
        if self.grpc_message_bytes_max < 64 * 1024:
            problems.append("limits.grpc_message_bytes_max must be at least 65536")
        if self.grpc_append_timeout_ms < 100:
            problems.append("limits.grpc_append_timeout_ms must be at least 100")
        if self.flush_check_interval_ms < 10:
            problems.append("limits.flush_check_interval_ms must be at least 10")
        if self.group_expiry_check_interval_ms < 10:
            problems.append("limits.group_expiry_check_interval_ms must be at least 10")
        if self.recovery_point_interval_ms < 1000:
            problems.append("limits.recovery_point_interval_ms must be at least 1000")
        if self.open_files_idle_ms < 1000:
            problems.append("limits.open_files_idle_ms must be at least 1000")
        if self.cleaner_keys_max < 1000:
            problems.append("limits.cleaner_keys_max must be at least 1000")
        for name in (
            "controller_request_timeout_ms",
            "controlled_shutdown_timeout_ms",
            "controller_first_frame_timeout_ms",
        ):
            if getattr(self, name) < 100:
                problems.append(f"limits.{name} must be at least 100")
        if self.controller_response_bytes_max < 64 * 1024:
            problems.append("limits.controller_response_bytes_max must be at least 65536")
        return problems
