"""Durable writes: after a crash at any point a file holds its old content or its new one, never a
torn mix. The new bytes go to a temporary file in the same folder, are fsynced, renamed over the
old file, and the folder is fsynced so the rename itself survives (a rename that only reached the
page cache can be lost, leaving the old file, or on some file systems an empty one)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder: what makes a rename inside it durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file written by someone else (pandas, numpy) before it is renamed into place."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def replace_durably(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename a written, fsynced `tmp` over `dst` and fsync their folder."""
    os.replace(tmp, dst)
    fsync_dir(Path(dst).parent)


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> Path:
    """Write `data` to `path` durably (created with `mode`, e.g. 0o600 for a secret, which it has
    from its first byte: the temporary file is opened with it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
