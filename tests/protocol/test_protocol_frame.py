"""Frames: requests and responses through FrameDecoder in any chunking, and hostile input."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import INT64_MIN, bodies, fast, msgpack_decoded_values, pack

import protocol
from protocol.frame import PREFIX

wire_ints = st.integers(INT64_MIN, 2**64 - 1)
tails = st.binary(max_size=300)

requests = st.builds(
    protocol.Request,
    api_key=wire_ints,
    api_version=wire_ints,
    correlation_id=wire_ints,
    client_id=st.none() | st.text(max_size=255),
    body=bodies,
    tail=tails,
)

responses = st.builds(
    protocol.Response,
    correlation_id=wire_ints,
    error_code=st.sampled_from(list(protocol.ErrorCode)),
    error_message=st.none() | st.text(max_size=40),
    body=bodies,
    tail=tails,
)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """Split `data` into chunks of the given sizes (cycled), the last one taking the rest."""
    chunks = []
    position = 0
    index = 0
    while position < len(data):
        size = sizes[index % len(sizes)] if sizes else len(data)
        chunks.append(data[position : position + size])
        position += size
        index += 1
    return chunks


def decode_stream(chunks: list[bytes], **limits) -> list[tuple[object, bytes]]:
    decoder = protocol.FrameDecoder(**limits)
    frames = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert decoder.next_frame() is None
    assert decoder.buffered_bytes == 0
    return frames


chunk_sizes = st.lists(st.integers(1, 64), min_size=1, max_size=8)


@given(request=requests, sizes=chunk_sizes)
@fast(200)
def test_request_round_trip_in_any_chunking(request, sizes):
    (frame,) = decode_stream(chunked(protocol.encode_request(request), sizes))
    assert protocol.parse_request(*frame) == request


@given(response=responses, sizes=chunk_sizes)
@fast(200)
def test_response_round_trip_in_any_chunking(response, sizes):
    (frame,) = decode_stream(chunked(protocol.encode_response(response), sizes))
    parsed = protocol.parse_response(*frame)
    assert parsed == response
    assert type(parsed.error_code) is protocol.ErrorCode


@given(
    items=st.lists(st.tuples(st.booleans(), requests, responses), min_size=1, max_size=6),
    sizes=chunk_sizes,
)
@fast(100)
def test_pipelined_frames_come_out_in_order(items, sizes):
    sent = [request if is_request else response for is_request, request, response in items]
    stream = b"".join(
        protocol.encode_request(message)
        if isinstance(message, protocol.Request)
        else protocol.encode_response(message)
        for message in sent
    )
    frames = decode_stream(chunked(stream, sizes))
    assert len(frames) == len(sent)
    for message, frame in zip(sent, frames):
        if isinstance(message, protocol.Request):
            assert protocol.parse_request(*frame) == message
        else:
            assert protocol.parse_response(*frame) == message


@given(request=requests)
@fast(100)
def test_feeding_bytes_wanted_completes_a_frame_exactly(request):
    encoded = protocol.encode_request(request)
    decoder = protocol.FrameDecoder()
    position = 0
    frame = None
    while frame is None:
        wanted = decoder.bytes_wanted()
        assert wanted >= 1
        decoder.feed(encoded[position : position + wanted])
        position += wanted
        frame = decoder.next_frame()
    assert position == len(encoded)
    assert protocol.parse_request(*frame) == request


def test_response_prefix_plus_tail_equals_encode_response():
    response = protocol.Response(
        correlation_id=7,
        error_code=protocol.ErrorCode.NONE,
        error_message=None,
        body={"topics": []},
        tail=b"batches",
    )
    prefix = protocol.response_prefix(7, protocol.ErrorCode.NONE, None, {"topics": []}, 7)
    assert prefix + b"batches" == protocol.encode_response(response)


@given(
    extra=st.integers(1, 10_000),
    frame_bytes_max=st.integers(16, 4096),
)
@fast(100)
def test_oversized_frame_is_rejected_once_its_length_arrives(extra, frame_bytes_max):
    request = protocol.Request(
        api_key=0, api_version=0, correlation_id=1, client_id=None, body={}, tail=b""
    )
    header_bytes = len(protocol.encode_request(request)) - 4
    tail = bytes(max(0, frame_bytes_max - header_bytes) + extra)
    encoded = protocol.encode_request(
        protocol.Request(
            api_key=0, api_version=0, correlation_id=1, client_id=None, body={}, tail=tail
        )
    )
    assert struct.unpack_from(">I", encoded)[0] > frame_bytes_max

    decoder = protocol.FrameDecoder(frame_bytes_max=frame_bytes_max)
    for byte in encoded[:3]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.feed(encoded[3:4])
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        decoder.next_frame()


def test_frame_of_exactly_the_limit_is_accepted():
    request = protocol.Request(
        api_key=3, api_version=0, correlation_id=9, client_id="c", body={}, tail=b"x" * 100
    )
    encoded = protocol.encode_request(request)
    frame_length = len(encoded) - 4

    (frame,) = decode_stream([encoded], frame_bytes_max=frame_length)
    assert protocol.parse_request(*frame) == request
    with pytest.raises(protocol.ProtocolError):
        decode_stream([encoded], frame_bytes_max=frame_length - 1)


def test_header_longer_than_its_limit_is_rejected():
    request = protocol.Request(
        api_key=3, api_version=0, correlation_id=9, client_id=None, body={"k": "v" * 100}
    )
    encoded = protocol.encode_request(request)
    header_length = struct.unpack_from(">I", encoded, 4)[0]
    (frame,) = decode_stream([encoded], header_bytes_max=header_length)
    assert protocol.parse_request(*frame) == request
    with pytest.raises(protocol.ProtocolError):
        decode_stream([encoded], header_bytes_max=header_length - 1)


@pytest.mark.parametrize(
    "prefix",
    [
        PREFIX.pack(0, 0),  # frame too short to hold header_length
        PREFIX.pack(3, 0),
        PREFIX.pack(10, 7),  # header longer than the frame allows
        PREFIX.pack(4, 0),  # empty header is not msgpack
    ],
)
def test_impossible_prefixes_are_rejected(prefix):
    decoder = protocol.FrameDecoder()
    decoder.feed(prefix + bytes(16))
    with pytest.raises(protocol.ProtocolError):
        decoder.next_frame()


def test_encoding_an_unpackable_body_is_a_usage_error():
    request = protocol.Request(
        api_key=0, api_version=0, correlation_id=1, client_id=None, body={"x": object()}
    )
    with pytest.raises(protocol.ProtocolUsageError):
        protocol.encode_request(request)
    with pytest.raises(protocol.ProtocolUsageError):
        protocol.response_prefix(2**64, 0, None, {})


def test_unknown_error_code_maps_to_unknown_server_error():
    header = [1, 31337, "odd", {}]
    response = protocol.parse_response(header, b"")
    assert response.error_code is protocol.ErrorCode.UNKNOWN_SERVER_ERROR
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_response([1, True, None, {}], b"")
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_response([1, "0", None, {}], b"")


def test_parse_request_checks_each_field():
    good = [0, 0, 1, "client", {}]
    assert protocol.parse_request(good, b"t").tail == b"t"
    for index, bad in [(0, "0"), (1, None), (2, True), (3, 5), (3, "c" * 256), (4, [])]:
        header = list(good)
        header[index] = bad
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_request(header, b"")
    for header in (good[:4], good + [None], tuple(good), {"a": 1}):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_request(header, b"")


# --- hostile input -----------------------------------------------------------------------------


def parse_both(frame: tuple[object, bytes]) -> None:
    for parse in (protocol.parse_request, protocol.parse_response):
        try:
            parse(*frame)
        except protocol.ProtocolError:
            pass


def feed_hostile(data: bytes, sizes: list[int], **limits) -> None:
    """Feed `data` in chunks; only ProtocolError may escape the decoder and the parsers."""
    decoder = protocol.FrameDecoder(**limits)
    try:
        for chunk in chunked(data, sizes):
            decoder.feed(chunk)
            assert decoder.bytes_wanted() >= 1
            while (frame := decoder.next_frame()) is not None:
                parse_both(frame)
    except protocol.ProtocolError:
        pass


@given(data=st.binary(max_size=500), sizes=chunk_sizes)
@fast(300)
def test_random_bytes_into_frame_decoder(data, sizes):
    feed_hostile(data, sizes, frame_bytes_max=1 << 16, header_bytes_max=1 << 12)


@given(
    frames=st.lists(
        st.tuples(st.integers(0, 600), st.integers(0, 600), st.binary(max_size=200)), max_size=4
    ),
    sizes=chunk_sizes,
)
@fast(300)
def test_plausible_prefixes_with_random_contents(frames, sizes):
    stream = b"".join(PREFIX.pack(length, header) + rest for length, header, rest in frames)
    feed_hostile(stream, sizes, frame_bytes_max=512)


@given(header=msgpack_decoded_values, tail=st.binary(max_size=20))
@fast(400)
def test_random_msgpack_headers_into_parsers(header, tail):
    packed = pack(header)
    frame = PREFIX.pack(4 + len(packed) + len(tail), len(packed)) + packed + tail
    decoder = protocol.FrameDecoder()
    decoder.feed(frame)
    decoded = decoder.next_frame()
    assert decoded is not None
    assert decoded[1] == tail
    parse_both(decoded)


@given(data=st.binary(max_size=200))
@fast(300)
def test_random_bytes_into_decode_header(data):
    try:
        header = protocol.frame.decode_header(data)
    except protocol.ProtocolError:
        return
    parse_both((header, b""))


# --- large frames: one buffer of the frame's size ----------------------------------------------


@given(
    items=st.lists(st.tuples(requests, st.binary(max_size=2000)), min_size=1, max_size=5),
    sizes=chunk_sizes,
    direct=st.lists(st.booleans(), min_size=1, max_size=8),
)
@fast(200)
def test_large_frames_assembled_in_place_in_any_mix_of_feed_and_direct_fill(items, sizes, direct):
    """With a low threshold every frame but the smallest takes the large-frame path; bytes
    arrive through feed() or are written straight into frame_buffer(), in any chunking."""
    sent = [
        protocol.Request(
            api_key=request.api_key,
            api_version=request.api_version,
            correlation_id=request.correlation_id,
            client_id=request.client_id,
            body=request.body,
            tail=tail,
        )
        for request, tail in items
    ]
    stream = b"".join(protocol.encode_request(request) for request in sent)
    decoder = protocol.FrameDecoder(frame_buffer_bytes_min=64)
    frames = []
    position = 0
    step = 0
    while position < len(stream):
        size = sizes[step % len(sizes)]
        buffer = decoder.frame_buffer()
        if buffer is not None and direct[step % len(direct)]:
            assert len(buffer) == decoder.bytes_wanted()
            count = min(size, len(buffer))
            buffer[:count] = stream[position : position + count]
            decoder.frame_buffer_filled(count)
        else:
            count = size
            decoder.feed(stream[position : position + count])
        position += count
        step += 1
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert decoder.buffered_bytes == 0
    assert decoder.frame_buffer() is None
    assert [protocol.parse_request(*frame) for frame in frames] == sent
    for _, tail in frames:
        if len(tail) >= 64:
            assert not tail.readonly  # a broker patches record batches in place


def test_a_large_frame_fed_in_many_chunks_is_held_once():
    """Peak memory while a 4 MiB frame arrives in 64 KiB reads stays near one frame: the
    bytes go into one buffer of the frame's size as they come (joining the chunks at the
    end would hold the frame twice)."""
    encoded = protocol.encode_request(
        protocol.Request(
            api_key=0,
            api_version=0,
            correlation_id=1,
            client_id=None,
            body={},
            tail=b"t" * (4 << 20),
        )
    )
    decoder = protocol.FrameDecoder()
    tracemalloc.start()
    try:
        for position in range(0, len(encoded), 65536):
            decoder.feed(encoded[position : position + 65536])  # a new bytes object, as a read
            frame = decoder.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frame is not None
    assert bytes(frame[1]) == b"t" * (4 << 20)
    assert not frame[1].readonly
    assert peak < len(encoded) + 4 * 65536, (peak, len(encoded))


def test_a_large_frame_is_checked_before_its_buffer_is_allocated():
    decoder = protocol.FrameDecoder(frame_bytes_max=1 << 20, frame_buffer_bytes_min=1024)
    decoder.feed(struct.pack(">I", (1 << 20) + 1))
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        decoder.next_frame()
    assert decoder.frame_buffer() is None

    decoder = protocol.FrameDecoder(frame_buffer_bytes_min=1024)
    decoder.feed(struct.pack(">I", 100_000))
    assert decoder.next_frame() is None
    buffer = decoder.frame_buffer()
    assert buffer is not None and len(buffer) == 100_000 == decoder.bytes_wanted()
    buffer[:4] = struct.pack(">I", 100_000)  # header length beyond the frame
    decoder.frame_buffer_filled(4)
    with pytest.raises(protocol.ProtocolError, match="header length"):
        decoder.next_frame()


def test_a_large_frame_buffer_is_allocated_only_when_wanted():
    """A broker reserves a frame's memory after next_frame() has seen its length and before
    it reads on: the buffer must not exist before it asks for it (or feeds more bytes)."""
    frame_length = 32 << 20
    for fill in ("frame_buffer", "feed"):
        decoder = protocol.FrameDecoder()
        tracemalloc.start()
        try:
            decoder.feed(struct.pack(">II", frame_length, 3))
            assert decoder.next_frame() is None
            assert decoder.next_frame() is None
            assert decoder.bytes_wanted() == frame_length - 4
            allocated_before, _ = tracemalloc.get_traced_memory()
            if fill == "frame_buffer":
                buffer = decoder.frame_buffer()
                assert buffer is not None and len(buffer) == frame_length - 4
            else:
                decoder.feed(b"\x93\x01\x02")
            allocated_after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert allocated_before < 1 << 20, allocated_before
        assert allocated_after > frame_length, allocated_after
