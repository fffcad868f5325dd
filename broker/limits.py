"""Every size and count limit of the broker, in one place, units in the names."""

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
    http_body_bytes_max: int = 8 * 1024 * 1024
    http_connections_max: int = 1024
    http_fetch_records_max: int = 10_000

    def validate(self) -> None:
        assert self.frame_bytes_max > self.frame_header_bytes_max > 0
        assert self.inflight_requests_max >= 1
        assert self.connections_max >= 1
        assert self.fetch_bytes_max >= 1024
