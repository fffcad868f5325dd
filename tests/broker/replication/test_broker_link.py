"""BrokerLink against a scripted peer on 127.0.0.1: answers small and large (received
straight into the frame's buffer), sent in pieces, arrive whole and byte for byte; a peer
that closes mid-answer or answers another request is a BrokerLinkError, and the next
request reconnects."""

from __future__ import annotations

import functools

import pytest
import trio

from broker.replication.broker_link import BrokerLink, BrokerLinkError
from protocol import ApiKey, ErrorCode
from protocol.frame import FrameDecoder, parse_request, response_prefix

pytestmark = pytest.mark.timeout(30)

FETCH_BODY = {"max_wait_ms": 0, "min_bytes": 1, "max_bytes": 1 << 24, "topics": []}


async def serve_script(nursery: trio.Nursery, answers: list) -> tuple[str, int]:
    """A peer that answers the n-th request (over all connections) with answers[n]: a
    callable (correlation id) -> bytes, sent in 1,000-byte pieces, or a pair (callable,
    "close") to close the connection once they are sent."""
    served = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal served
        decoder = FrameDecoder(frame_bytes_max=1 << 20)
        async with stream:
            while True:
                frame = decoder.next_frame()
                if frame is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    decoder.feed(data)
                    continue
                request = parse_request(*frame)
                answer = answers[served]
                served += 1
                close = isinstance(answer, tuple)
                data = (answer[0] if close else answer)(request.correlation_id)
                for start in range(0, len(data), 1000):
                    await stream.send_all(data[start : start + 1000])
                    await trio.sleep(0)
                if close:
                    return

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return "127.0.0.1", listeners[0].socket.getsockname()[1]


def fetch_answer(tail: bytes, *, correlation_offset: int = 0):
    def build(correlation_id: int) -> bytes:
        body = {"topics": [{"topic": "t", "partitions": [{"partition": 0, "error_code": 0}]}]}
        prefix = response_prefix(correlation_id + correlation_offset, 0, None, body, len(tail))
        return prefix + tail

    return build


async def test_small_and_large_answers_arrive_whole(nursery):
    small = bytes(range(256)) * 4  # 1 KiB: through feed()
    large = bytes(range(251)) * 12_000  # ~3 MB: received into the frame's own buffer
    address = await serve_script(nursery, [fetch_answer(small), fetch_answer(large)])
    link = BrokerLink(address, client_id="test", frame_bytes_max=1 << 24)
    try:
        first = await link.request(ApiKey.FETCH, FETCH_BODY, timeout_seconds=10)
        second = await link.request(ApiKey.FETCH, FETCH_BODY, timeout_seconds=10)
    finally:
        await link.aclose()
    assert bytes(first.tail) == small and first.error_code == ErrorCode.NONE
    assert bytes(second.tail) == large
    assert second.body["topics"][0]["topic"] == "t"


async def test_a_peer_closing_mid_answer_or_answering_another_request_fails_the_request(
    nursery,
):
    large = b"x" * 500_000

    def cut(correlation_id: int) -> bytes:
        return fetch_answer(large)(correlation_id)[:200_000]  # then the peer closes

    address = await serve_script(
        nursery,
        [(cut, "close"), fetch_answer(b"", correlation_offset=7), fetch_answer(large)],
    )
    link = BrokerLink(address, client_id="test", frame_bytes_max=1 << 24)
    try:
        with pytest.raises(BrokerLinkError, match="closed the connection"):
            await link.request(ApiKey.FETCH, FETCH_BODY, timeout_seconds=10)
        with pytest.raises(BrokerLinkError, match="another request"):
            await link.request(ApiKey.FETCH, FETCH_BODY, timeout_seconds=10)
        answer = await link.request(ApiKey.FETCH, FETCH_BODY, timeout_seconds=10)  # reconnects
    finally:
        await link.aclose()
    assert bytes(answer.tail) == large
