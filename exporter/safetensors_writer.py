"""A streaming safetensors writer: the header first (from shapes and dtypes alone), then each
tensor's bytes in turn, so a checkpoint is written without holding it in memory.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(padded with spaces to a multiple of 8), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

_CODES = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
}
_BLOCK = 64 << 20  # bytes written per call


def dtype_code(dtype) -> str | None:
    """The safetensors code of a floating dtype this writer handles, else None."""
    return _CODES.get(np.dtype(dtype))


def write_safetensors(path: Path, tensors: Sequence[tuple[str, np.dtype, tuple[int, ...], Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write (name, dtype, shape, read) entries in order; `read()` is called once per tensor, when
    its bytes are due. Returns the bytes written."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in tensors:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, dtype, shape, read in tensors:
            arr = read()
            if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
                raise ValueError(f"{name}: read {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}{list(shape)}")
            flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # a view when already contiguous
            for start in range(0, flat.size, _BLOCK):
                f.write(memoryview(flat[start:start + _BLOCK]))
    return 8 + len(blob) + offset
