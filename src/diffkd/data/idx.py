"""Reader for the idx format of (Fashion-)MNIST: big-endian header, then raw uint8 data."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import torch

IMAGES_MAGIC = 2051  # 0x00000803: uint8 data, 3 dimensions (N, H, W)
LABELS_MAGIC = 2049  # 0x00000801: uint8 data, 1 dimension (N,)


def read_idx(path: str | Path, magic: int) -> torch.Tensor:
    """Read an idx file (raw or .gz) into a uint8 tensor; a wrong magic or size is a ValueError."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = bytearray(f.read())
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: corrupt gzip stream ({err})") from err
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "none (file shorter than 4 bytes)" if found is None else f"{found} (0x{found:08x})"
        raise ValueError(f"{path}: bad idx magic number {shown}, expected {magic} (0x{magic:08x})")
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header ({len(data)} of {header} bytes)")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected, payload = math.prod(shape), len(data) - header
    if payload != expected:
        problem = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {problem}: header says shape {tuple(shape)} = {expected} bytes of data, "
            f"file holds {payload}"
        )
    return torch.frombuffer(data, dtype=torch.uint8, offset=header, count=expected).view(shape)
