"""Frames of the native protocol: ``u32 frame_length | u32 header_length | header | tail``.

`frame_length` counts every byte after itself; the header is msgpack; the tail is raw bytes
(record batches) that never pass through msgpack, so a broker can send it with sendfile and a
client can hand it to the batch codec untouched.

Requests:  header = [api_key, api_version, correlation_id, client_id, body]
Responses: header = [correlation_id, error_code, error_message, body]

`FrameDecoder` is sans-I/O: bytes in, frames out. Sizes are checked before any allocation.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ErrorCode, ProtocolError, ProtocolUsageError, error_code_from_wire

PREFIX = struct.Struct(">II")
PREFIX_BYTES = PREFIX.size
FRAME_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
HEADER_BYTES_MAX_DEFAULT = 1024 * 1024
# Frames at least this large (prefix included) are assembled in one buffer of their size.
FRAME_BUFFER_BYTES_MIN_DEFAULT = 64 * 1024
CLIENT_ID_CHARS_MAX = 255


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    body: dict[str, Any]
    tail: bytes | memoryview = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    correlation_id: int
    error_code: ErrorCode
    error_message: str | None
    body: dict[str, Any]
    tail: bytes | memoryview = b""


def _pack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise ProtocolUsageError(f"cannot encode frame header: {error}") from None


def frame_prefix(header: Any, tail_bytes: int) -> bytes:
    """Return length prefix plus packed header; the caller sends `tail_bytes` raw bytes after."""
    packed = _pack(header)
    return PREFIX.pack(4 + len(packed) + tail_bytes, len(packed)) + packed


def encode_request(request: Request) -> bytes:
    header = [
        request.api_key,
        request.api_version,
        request.correlation_id,
        request.client_id,
        request.body,
    ]
    return frame_prefix(header, len(request.tail)) + request.tail


def response_prefix(
    correlation_id: int,
    error_code: int,
    error_message: str | None,
    body: dict[str, Any],
    tail_bytes: int = 0,
) -> bytes:
    return frame_prefix([correlation_id, int(error_code), error_message, body], tail_bytes)


def encode_response(response: Response) -> bytes:
    prefix = response_prefix(
        response.correlation_id,
        response.error_code,
        response.error_message,
        response.body,
        len(response.tail),
    )
    return prefix + response.tail


class FrameDecoder:
    """Split a byte stream into (header, tail) pairs.

    `feed()` adds bytes; `next_frame()` returns the next complete frame or None. A frame
    larger than `frame_bytes_max` raises ProtocolError as soon as its prefix arrives.

    Small frames: received chunks are kept as they came, and a frame that lies within one
    chunk is returned as a read-only view of it (no copy); one that spans chunks is joined
    into writable memory (one copy). Many small frames per read thus cost no copies.

    Large frames (at least `frame_buffer_bytes_min` with their prefix) are assembled in one
    buffer of the frame's size. Once `next_frame()` has returned None for such a frame (its
    length checked), the buffer is allocated when the caller asks for it with
    `frame_buffer()` (to fill it straight from a socket, then `frame_buffer_filled(count)`)
    or feeds more bytes of the frame, never before: a broker reserves the frame's memory
    between the two. A large frame is so never held twice, and its tail is writable (a
    broker patches record batches in place).
    """

    def __init__(
        self,
        *,
        frame_bytes_max: int = FRAME_BYTES_MAX_DEFAULT,
        header_bytes_max: int = HEADER_BYTES_MAX_DEFAULT,
        frame_buffer_bytes_min: int = FRAME_BUFFER_BYTES_MIN_DEFAULT,
    ) -> None:
        assert frame_bytes_max > PREFIX_BYTES
        assert frame_buffer_bytes_min > PREFIX_BYTES
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes of _chunks[0] already consumed
        self._buffered = 0  # bytes received and not yet returned, frame buffer included
        self._frame: bytearray | None = None  # the large frame being assembled, if any
        self._frame_pending = False  # the head frame is large: allocate _frame when wanted
        self._frame_filled = 0  # bytes of _frame received (the rest of _buffered: _chunks)
        self._frame_bytes_max = frame_bytes_max
        self._header_bytes_max = header_bytes_max
        self._frame_buffer_bytes_min = frame_buffer_bytes_min

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def bytes_wanted(self) -> int:
        """How many more bytes complete the current frame (at least 1)."""
        if self._frame is not None:
            return max(1, len(self._frame) - self._frame_filled)
        if self._buffered < 4:
            return 4 - self._buffered
        (length,) = struct.unpack(">I", self._peek(4))
        return max(1, 4 + length - self._buffered)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._frame_pending:
            self._allocate_frame()
        self._buffered += len(data)
        if self._frame is not None:
            view = memoryview(data)
            count = min(len(view), len(self._frame) - self._frame_filled)
            self._frame[self._frame_filled : self._frame_filled + count] = view[:count]
            self._frame_filled += count
            if count < len(view):  # the start of the frames after this one
                self._chunks.append(bytes(view[count:]))
            return
        self._chunks.append(bytes(data) if type(data) is not bytes else data)

    def frame_buffer(self) -> memoryview | None:
        """The unfilled rest of the large frame being assembled (a writable view), or None
        when there is none (then bytes go through `feed()`). Allocates the frame's buffer if
        not done yet. Valid until the next call of any other method; call
        `frame_buffer_filled(count)` after writing `count` bytes to its start."""
        if self._frame_pending:
            self._allocate_frame()
        if self._frame is None:
            return None
        return memoryview(self._frame)[self._frame_filled :]

    def frame_buffer_filled(self, count: int) -> None:
        """`count` bytes were written to the start of the last `frame_buffer()`."""
        assert self._frame is not None
        assert 0 <= count <= len(self._frame) - self._frame_filled, count
        self._frame_filled += count
        self._buffered += count

    def next_frame(self) -> tuple[Any, memoryview] | None:
        if self._frame_pending:
            return None
        if self._frame is not None:
            return self._next_large_frame()
        if self._buffered < PREFIX_BYTES:
            if self._buffered >= 4:
                self._check_length(struct.unpack(">I", self._peek(4))[0])
                self._frame_pending = self._is_large()
            return None
        frame_length, header_length = PREFIX.unpack(self._peek(PREFIX_BYTES))
        self._check_length(frame_length)
        self._check_header_length(frame_length, header_length)
        total = 4 + frame_length
        if self._buffered < total:
            self._frame_pending = self._is_large()
            return None
        return _split(self._take(total), header_length)

    def _next_large_frame(self) -> tuple[Any, memoryview] | None:
        frame = self._frame
        assert frame is not None
        if self._frame_filled >= PREFIX_BYTES:
            frame_length, header_length = PREFIX.unpack_from(frame)
            self._check_header_length(frame_length, header_length)
        if self._frame_filled < len(frame):
            return None
        self._frame = None
        self._frame_filled = 0
        self._buffered -= len(frame)
        return _split(memoryview(frame), PREFIX.unpack_from(frame)[1])

    def _is_large(self) -> bool:
        """Whether the incomplete frame at the head (its length checked) is a large one."""
        return 4 + struct.unpack(">I", self._peek(4))[0] >= self._frame_buffer_bytes_min

    def _allocate_frame(self) -> None:
        """Move the buffered bytes of the large frame at the head into a buffer of its size;
        it is then filled in place."""
        total = 4 + struct.unpack(">I", self._peek(4))[0]
        assert self._buffered < total
        self._frame_pending = False
        frame = bytearray(total)
        filled = 0
        for index, chunk in enumerate(self._chunks):
            piece = memoryview(chunk)[self._offset :] if index == 0 else chunk
            frame[filled : filled + len(piece)] = piece
            filled += len(piece)
        self._chunks.clear()
        self._offset = 0
        self._frame = frame
        self._frame_filled = filled

    def _peek(self, count: int) -> bytes:
        first = self._chunks[0]
        if len(first) - self._offset >= count:
            return first[self._offset : self._offset + count]
        data = bytearray()
        for chunk in self._chunks:
            data += chunk[self._offset :] if chunk is first else chunk
            if len(data) >= count:
                break
        return bytes(data[:count])

    def _take(self, count: int) -> memoryview:
        """Remove and return the next `count` buffered bytes (which must be there)."""
        first = self._chunks[0]
        self._buffered -= count
        if len(first) - self._offset >= count:
            view = memoryview(first)[self._offset : self._offset + count]
            self._offset += count
            if self._offset == len(first):
                self._chunks.popleft()
                self._offset = 0
            return view
        parts = []
        needed = count
        while needed:
            chunk = self._chunks[0]
            available = len(chunk) - self._offset
            if available <= needed:
                parts.append(memoryview(chunk)[self._offset :])
                self._chunks.popleft()
                self._offset = 0
                needed -= available
            else:
                parts.append(memoryview(chunk)[self._offset : self._offset + needed])
                self._offset += needed
                needed = 0
        # One copy into writable memory: a broker may patch record batches in place.
        return memoryview(bytearray().join(parts))

    def _check_length(self, frame_length: int) -> None:
        if frame_length > self._frame_bytes_max:
            raise ProtocolError(
                f"frame of {frame_length} bytes exceeds the limit of {self._frame_bytes_max}"
            )
        if frame_length < 4:
            raise ProtocolError(f"frame length {frame_length} is too small")

    def _check_header_length(self, frame_length: int, header_length: int) -> None:
        if header_length > frame_length - 4 or header_length > self._header_bytes_max:
            raise ProtocolError(f"frame header length {header_length} is invalid")


def _split(frame: memoryview, header_length: int) -> tuple[Any, memoryview]:
    """A whole frame (prefix included) as its decoded header and its tail."""
    header = decode_header(frame[PREFIX_BYTES : PREFIX_BYTES + header_length])
    return header, frame[PREFIX_BYTES + header_length :]


def decode_header(data: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=len(data),
            max_bin_len=len(data),
            max_array_len=len(data),
            max_map_len=len(data),
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"frame header is not valid msgpack: {error}") from None


def _is_int(value: Any) -> bool:
    return type(value) is int


def parse_request(header: Any, tail: bytes | memoryview) -> Request:
    """Turn a decoded frame header into a Request; raises ProtocolError when malformed."""
    if type(header) is not list or len(header) != 5:
        raise ProtocolError("request header must be a 5-element array")
    api_key, api_version, correlation_id, client_id, body = header
    if not (_is_int(api_key) and _is_int(api_version) and _is_int(correlation_id)):
        raise ProtocolError("api_key, api_version and correlation_id must be integers")
    if client_id is not None and (
        type(client_id) is not str or len(client_id) > CLIENT_ID_CHARS_MAX
    ):
        raise ProtocolError("client_id must be a string of at most 255 characters")
    if type(body) is not dict:
        raise ProtocolError("request body must be a map")
    return Request(
        api_key=api_key,
        api_version=api_version,
        correlation_id=correlation_id,
        client_id=client_id,
        body=body,
        tail=tail,
    )


def parse_response(header: Any, tail: bytes | memoryview) -> Response:
    """Turn a decoded frame header into a Response; raises ProtocolError when malformed."""
    if type(header) is not list or len(header) != 4:
        raise ProtocolError("response header must be a 4-element array")
    correlation_id, error_code, error_message, body = header
    if not _is_int(correlation_id):
        raise ProtocolError("correlation_id must be an integer")
    if error_message is not None and type(error_message) is not str:
        raise ProtocolError("error_message must be a string or nil")
    if type(body) is not dict:
        raise ProtocolError("response body must be a map")
    return Response(
        correlation_id=correlation_id,
        error_code=error_code_from_wire(error_code),
        error_message=error_message,
        body=body,
        tail=tail,
    )
