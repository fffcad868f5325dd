"""Split a byte stream into lines in linear time and bounded memory (sans-I/O).

Theory of operation
-------------------
Chunks of input go in; complete lines and `OversizeLine` events come out. Each chunk is
split once (in C, so short lines cost little); the unfinished tail of the stream is kept as
a list of pieces and joined only once, when its newline arrives, so every input byte is
scanned for a newline once and copied at most twice (into its piece, then into the line):
reading is linear in the input, whatever the line lengths.
The pieces hold at most `line_bytes_max` bytes: once an unfinished line grows past that,
it is dropped, one `OversizeLine` is returned at once, and the rest of that line is only
counted (never stored) until its newline.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class OversizeLine:
    """Line `line_number` (1-based) grew past the limit: it has at least `size_bytes_min`
    bytes (without its newline) and was dropped."""

    line_number: int
    size_bytes_min: int


class LineSplitter:
    """Bytes in, lines out. Lines come without their b"\\n"; a last line without a newline
    comes out of `finish()`. Not thread-safe; never blocks."""

    def __init__(self, line_bytes_max: int) -> None:
        assert line_bytes_max >= 0, line_bytes_max
        self.line_bytes_max = line_bytes_max
        self._pieces: list[bytes] = []  # the unfinished line, at most line_bytes_max bytes
        self._pieces_bytes = 0
        self._dropping = False  # the unfinished line went over the limit: skip to its end
        self._line_number = 1  # of the unfinished line

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the unfinished line held in memory (never more than `line_bytes_max`)."""
        return sum(map(len, self._pieces))

    def feed(self, chunk: bytes) -> list[bytes | OversizeLine]:
        """Return the lines `chunk` completes, with an `OversizeLine` in place of (and as
        soon as we know of) each line over the limit."""
        out: list[bytes | OversizeLine] = []
        lines: list = chunk.split(b"\n")  # one pass in C; the last part is not a whole line
        tail = lines.pop()
        if lines and (self._pieces or self._dropping):
            self._take(lines[0], out)  # completes the unfinished line
            self._end_line(out)
            del lines[0]
        if lines and max(map(len, lines)) > self.line_bytes_max:
            for line in lines:
                self._take(line, out)
                self._end_line(out)
        elif lines:  # the common case: every line fits, hand them over as they are
            self._line_number += len(lines)
            if out:
                out.extend(lines)
            else:
                out = lines
        self._take(tail, out)
        return out

    def finish(self) -> list[bytes]:
        """The end of the stream: return the last line if it had no newline (and was not
        dropped)."""
        out: list[bytes | OversizeLine] = []
        if self._pieces_bytes:
            self._end_line(out)
        self._pieces.clear()
        self._pieces_bytes = 0
        self._dropping = False
        return [line for line in out if isinstance(line, bytes)]

    def _take(self, part: bytes, out: list[bytes | OversizeLine]) -> None:
        """Add `part` of the unfinished line to the pieces (or drop it)."""
        if self._dropping or not part:
            return
        if self._pieces_bytes + len(part) > self.line_bytes_max:
            out.append(
                OversizeLine(
                    line_number=self._line_number,
                    size_bytes_min=self._pieces_bytes + len(part),
                )
            )
            self._pieces.clear()
            self._pieces_bytes = 0
            self._dropping = True
            return
        self._pieces.append(part)
        self._pieces_bytes += len(part)

    def _end_line(self, out: list[bytes | OversizeLine]) -> None:
        if not self._dropping:
            out.append(self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces))
        self._pieces.clear()
        self._pieces_bytes = 0
        self._dropping = False
        self._line_number += 1
