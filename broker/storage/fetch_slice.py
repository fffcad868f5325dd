"""A byte range of one segment file handed to a fetch, ready for `os.sendfile`; or, from an
in-memory log (`MemoryPartitionLog`), the bytes themselves."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .file_descriptor_cache import process_cache


@dataclass(frozen=True, kw_only=True)
class FetchSlice:
    """`length` bytes at `position` of the file open as `fd`.

    `fd` is a duplicate of the segment's descriptor, so deleting the segment (or the
    process's descriptor cache evicting its descriptor) meanwhile cannot close it under a
    reader or a `sendfile`; the receiver must call `close()` (or use `with`). Until then the
    duplicate counts as borrowed from the descriptor cache, which keeps one fewer. An empty slice
    has fd -1 and length 0. The slice starts at a batch boundary; its last batch may be cut
    short (readers ignore a partial trailing batch).

    An in-memory slice (`of_bytes`) holds its bytes in `data`, with fd -1, position 0 and
    length len(data): it cannot be sent with `os.sendfile` (which fails on fd -1), only read
    with `read_bytes`.
    """

    fd: int
    position: int
    length: int
    data: bytes | None = field(default=None, repr=False)
    _open: list[bool] = field(default_factory=lambda: [True], repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fd >= 0:
            process_cache().borrow()

    @classmethod
    def empty(cls) -> FetchSlice:
        return cls(fd=-1, position=0, length=0)

    @classmethod
    def of_bytes(cls, data: bytes) -> FetchSlice:
        """An in-memory slice holding `data`."""
        return cls(fd=-1, position=0, length=len(data), data=data)

    def read_bytes(self) -> bytes:
        """Return the slice's bytes (fewer if the file is shorter). Raises OSError."""
        assert self._open[0]
        if self.data is not None:
            return self.data
        parts = []
        position, remaining = self.position, self.length
        while remaining > 0:
            data = os.pread(self.fd, remaining, position)
            if not data:
                break
            parts.append(data)
            position += len(data)
            remaining -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        """Release the descriptor; later calls do nothing."""
        if self._open[0]:
            self._open[0] = False
            if self.fd >= 0:
                os.close(self.fd)
                process_cache().give_back()

    def __enter__(self) -> FetchSlice:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()
