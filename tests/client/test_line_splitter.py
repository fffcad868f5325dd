"""LineSplitter: the CLI's stdin line reader (sans-I/O, linear, bounded memory)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from client.line_splitter import LineSplitter, OversizeLine


def split_all(data: bytes, cuts: list[int], line_bytes_max: int) -> list[bytes | OversizeLine]:
    splitter = LineSplitter(line_bytes_max)
    out: list[bytes | OversizeLine] = []
    start = 0
    for cut in sorted(cuts) + [len(data)]:
        out += splitter.feed(data[start:cut])
        assert splitter.buffered_bytes <= line_bytes_max
        start = max(start, cut)
    return out + list(splitter.finish())


def expected(data: bytes, line_bytes_max: int) -> list[bytes | OversizeLine]:
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # a final newline ends the last line; it does not start an empty one
    return [
        line if len(line) <= line_bytes_max else OversizeLine(line_number=n, size_bytes_min=-1)
        for n, line in enumerate(lines, 1)
    ]


def normalized(events: list[bytes | OversizeLine]) -> list[bytes | OversizeLine]:
    return [
        OversizeLine(line_number=e.line_number, size_bytes_min=-1)
        if isinstance(e, OversizeLine)
        else e
        for e in events
    ]


@given(
    st.lists(st.sampled_from([b"a", b"b", b"\n"]), max_size=200).map(b"".join),
    st.lists(st.integers(0, 200), max_size=10),
    st.integers(0, 12),
)
def test_same_lines_as_split_for_any_chunking(data, cuts, line_bytes_max):
    events = split_all(data, cuts, line_bytes_max)
    assert normalized(events) == expected(data, line_bytes_max)


@given(st.lists(st.sampled_from([b"xy", b"\n", b"abc\n", b"z" * 7]), max_size=40))
def test_lines_from_small_pieces(pieces):
    data = b"".join(pieces)
    splitter = LineSplitter(5)
    events: list[bytes | OversizeLine] = []
    for piece in pieces:
        events += splitter.feed(piece)
    events += splitter.finish()
    assert normalized(events) == expected(data, 5)


def test_oversize_line_is_reported_once_as_soon_as_it_is_over_the_limit():
    splitter = LineSplitter(10)
    assert splitter.feed(b"ok\n123456") == [b"ok"]
    assert splitter.feed(b"7890") == []  # exactly 10 bytes: still fine
    assert splitter.feed(b"X") == [OversizeLine(line_number=2, size_bytes_min=11)]
    assert splitter.buffered_bytes == 0
    assert splitter.feed(b"more of the same long line" * 100) == []
    assert splitter.buffered_bytes == 0
    assert splitter.feed(b"tail\nnext\nlast") == [b"next"]
    assert splitter.finish() == [b"last"]


def test_a_line_of_exactly_the_limit_and_empty_lines():
    splitter = LineSplitter(3)
    assert splitter.feed(b"abc\n\n") == [b"abc", b""]
    assert splitter.feed(b"abcd\n") == [OversizeLine(line_number=3, size_bytes_min=4)]
    assert splitter.finish() == []
    assert splitter.feed(b"x") == [] and splitter.finish() == [b"x"]


def test_an_oversize_last_line_without_newline_is_not_returned_by_finish():
    splitter = LineSplitter(2)
    assert splitter.feed(b"abc") == [OversizeLine(line_number=1, size_bytes_min=3)]
    assert splitter.finish() == []
