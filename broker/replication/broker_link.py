"""One connection from this broker to another broker's native port, for its replica fetcher.

Requests go one at a time (a fetcher sends its next fetch once the previous one is
answered), so there is no pipelining and no matching beyond checking the correlation id. A
broken connection, a malformed answer or a timeout closes it; the next request reconnects.
Answers are bounded by `frame_bytes_max` before any allocation (the leader bounds a fetch by
its `max_bytes`, this is the belt to those braces).
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

import trio

from protocol import DwalError, ErrorCode, ProtocolError
from protocol.api import ApiKey, check_response
from protocol.frame import FrameDecoder, Request, Response, encode_request, parse_response

RECEIVE_BYTES = 256 * 1024


class BrokerLinkError(Exception):
    """The request did not get an answer (connect failed, connection broke, timed out, bad
    frame). The connection is closed; the next request reconnects."""


class FetchLink(Protocol):
    """What a replica fetcher sends its requests over: a `BrokerLink`, or the cluster
    simulation's link over its in-memory network. `request` raises DwalError for an error
    answer and BrokerLinkError when there is none."""

    async def request(
        self,
        api_key: ApiKey,
        body: dict[str, Any],
        *,
        timeout_seconds: float,
        tail: bytes | memoryview = b"",
    ) -> Response: ...

    async def aclose(self) -> None: ...


class BrokerLink:
    def __init__(
        self,
        address: tuple[str, int],
        *,
        client_id: str,
        frame_bytes_max: int,
        connect_timeout_seconds: float = 2.0,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.frame_bytes_max = frame_bytes_max
        self.connect_timeout_seconds = connect_timeout_seconds
        self._stream: trio.SocketStream | None = None
        self._correlation = itertools.count(1)

    async def request(
        self,
        api_key: ApiKey,
        body: dict[str, Any],
        *,
        timeout_seconds: float,
        tail: bytes | memoryview = b"",
    ) -> Response:
        """Send one request and return its answer (body checked against the schema, tail
        as received). Raises DwalError for an error answer, BrokerLinkError when there is
        none. Safe to cancel (the connection is then closed)."""
        try:
            with trio.fail_after(timeout_seconds):
                response = await self._exchange(api_key, body, tail)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            await self.aclose()
            raise BrokerLinkError(f"{self.address[0]}:{self.address[1]}: {error}") from None
        except trio.TooSlowError:
            await self.aclose()
            raise BrokerLinkError(f"{self.address[0]}:{self.address[1]}: no answer in time")
        except ProtocolError as error:
            await self.aclose()
            raise BrokerLinkError(f"{self.address[0]}:{self.address[1]}: {error}") from None
        except BaseException:
            await self.aclose()
            raise
        if response.error_code != ErrorCode.NONE:
            raise DwalError(response.error_code, response.error_message)
        try:
            body = check_response(api_key, response.body)
        except ProtocolError as error:
            raise BrokerLinkError(f"bad {api_key.name} answer: {error}") from None
        return Response(
            correlation_id=response.correlation_id,
            error_code=response.error_code,
            error_message=response.error_message,
            body=body,
            tail=response.tail,
        )

    async def _exchange(
        self, api_key: ApiKey, body: dict[str, Any], tail: bytes | memoryview
    ) -> Response:
        if self._stream is None:
            with trio.move_on_after(self.connect_timeout_seconds):
                self._stream = await trio.open_tcp_stream(*self.address)
            if self._stream is None:
                raise OSError(f"cannot connect within {self.connect_timeout_seconds:g} s")
        stream = self._stream
        correlation_id = next(self._correlation)
        request = Request(
            api_key=int(api_key),
            api_version=0,
            correlation_id=correlation_id,
            client_id=self.client_id,
            body=body,
            tail=tail,
        )
        await stream.send_all(encode_request(request))
        decoder = FrameDecoder(frame_bytes_max=self.frame_bytes_max)
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                break
            # A large answer (a follower's fetch: megabytes) is received straight into its
            # frame's buffer, not in pieces copied there (that copy cost a follower broker
            # about 14% of its CPU per replicated megabyte).
            frame_buffer = decoder.frame_buffer()
            if frame_buffer is not None:
                count = await stream.socket.recv_into(frame_buffer)
                if not count:
                    raise trio.BrokenResourceError("the broker closed the connection")
                decoder.frame_buffer_filled(count)
                continue
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise trio.BrokenResourceError("the broker closed the connection")
            decoder.feed(data)
        if decoder.buffered_bytes:
            raise ProtocolError("bytes after the answer to a request sent alone")
        header, tail = frame
        response = parse_response(header, tail)
        if response.correlation_id != correlation_id:
            raise ProtocolError("the answer is for another request")
        return response

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()
