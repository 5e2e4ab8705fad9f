"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

# tempfile.mkstemp names a file prefix + 8 characters of [a-z0-9_] + suffix; ours are `.<name>.XXXXXXXX.tmp`.
_TEMP_PART = r"[a-z0-9_]{8}"


def open_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file next to path, `.<name>.XXXXXXXX.tmp` (a write killed mid-way leaves it behind)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def is_temporary_of(filename: str, name: str) -> bool:
    """Whether filename is a temporary that write_atomic made for a file called name (and nothing else)."""
    return re.fullmatch(re.escape(f".{name}.") + _TEMP_PART + re.escape(".tmp"), filename) is not None


def _naming(err: OSError, path: Path) -> OSError:
    """The same error (same errno, so the same OSError subclass) with the written file as its filename."""
    return OSError(err.errno, err.strerror, str(path)) if err.errno is not None else err


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: POSIX has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write bytes through a temporary file in the same folder, fsync'ed, then os.replace'd."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the path of a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = open_temporary(path)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it; mkstemp's file is 0600 whatever the umask
        os.replace(tmp, path)
    except OSError as err:  # a full disk's write names no file: name the one being written
        Path(tmp).unlink(missing_ok=True)
        raise _naming(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def serialize(obj: Any) -> bytes:
    """torch.save into bytes (so one serialization can be written to several files)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_atomic(obj: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """torch.save obj to path atomically; with overwrite=False an existing file is refused, not replaced."""
    path = Path(path)
    if not overwrite and path.exists() and not path.is_dir():  # a directory: write_atomic says so
        raise FileExistsError(f"{path} exists; refusing to overwrite it (choose another path, or --force)")
    write_atomic(serialize(obj), path)
    return path
