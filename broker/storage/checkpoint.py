"""Small files replaced atomically: write a temporary file, fsync it, rename, fsync the dir.

A reader sees either the old content or the new one, never a torn mix, even after a power
cut: the rename is durable only once the directory itself is fsynced.
"""

from __future__ import annotations

import os
import pathlib

TEMPORARY_SUFFIX = ".tmp"
OFFSET_CHECKPOINT_VERSION = 0
OFFSET_CHECKPOINT_BYTES_MAX = 64


def fsync_directory(directory: pathlib.Path) -> None:
    """Make creations, renames and removals of entries in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Replace `path` with `data` durably. Raises OSError. Blocking: call from a thread."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fsync_directory(path.parent)


def write_offset_checkpoint(path: pathlib.Path, offset: int) -> None:
    """Durably record one offset in `path`. Raises OSError."""
    assert offset >= 0
    write_atomically(path, f"{OFFSET_CHECKPOINT_VERSION}\n{offset}\n".encode("ascii"))


def read_offset_checkpoint(path: pathlib.Path) -> int | None:
    """Return the offset recorded in `path`, or None if it is missing or unreadable."""
    try:
        with open(path, "rb") as file:
            data = file.read(OFFSET_CHECKPOINT_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    lines = data.split(b"\n")
    if len(data) > OFFSET_CHECKPOINT_BYTES_MAX or len(lines) != 3 or lines[2] != b"":
        return None
    if lines[0] != str(OFFSET_CHECKPOINT_VERSION).encode() or not lines[1].isdigit():
        return None
    return int(lines[1])
