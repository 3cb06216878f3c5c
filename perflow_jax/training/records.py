"""One prepared training example as bytes: the ArrayRecord payload shared by ``prepare`` (writer) and ``data``
(reader).

A record is a little-endian uint32 header length, a JSON header ``[[name, dtype, shape], ...]`` and the arrays'
raw bytes in that order. It holds only numbers (no pickles); ``bfloat16`` is ml_dtypes' NumPy type.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
          "int64": np.dtype(np.int64), "int32": np.dtype(np.int32)}


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Arrays (of the dtypes in :data:`DTYPES`) → one record's bytes."""
    header, blobs = [], []
    for name, a in arrays.items():
        a = np.asarray(a)  # tobytes() is C order (ascontiguousarray would make a scalar 1-d)
        if a.dtype.name not in DTYPES:
            raise ValueError(f"record field {name!r} has dtype {a.dtype}; expected one of {sorted(DTYPES)}.")
        header.append([name, a.dtype.name, list(a.shape)])
        blobs.append(a.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode(data: bytes) -> dict[str, np.ndarray]:
    """One record's bytes → {name: array} (ValueError on a truncated or foreign record)."""
    try:
        (n,) = struct.unpack_from("<I", data, 0)
        header = json.loads(data[4:4 + n])
        out, pos = {}, 4 + n
        for name, dtype, shape in header:
            dt = DTYPES[dtype]
            size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if pos + size > len(data):
                raise ValueError("truncated")
            out[name] = np.frombuffer(data, dt, int(np.prod(shape, dtype=np.int64)), pos).reshape(shape)
            pos += size
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not a perflow-jax prepared record ({type(e).__name__}: {e}).") from e
    return out
