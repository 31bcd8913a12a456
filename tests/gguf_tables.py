"""A GGUF file's metadata and tensor table, read with struct.

gguf.GGUFReader builds one numpy view per vocabulary entry, too slow for Gemma 3's 262k tokens; the tests only
need the scalar metadata and where each tensor lies."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_tables(buf) -> tuple[dict, dict]:
    """Scalar/string metadata (arrays read as None) and name -> (dims as stored, ggml type, absolute offset)."""
    assert bytes(buf[:4]) == b"GGUF"
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return bytes(buf[pos - n:pos]).decode()

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if itype in SCALARS:
                pos += struct.calcsize(SCALARS[itype]) * n
            else:
                for _ in range(n):
                    value(itype)
            return None
        (v,) = struct.unpack_from(SCALARS[vtype], buf, pos)
        pos += struct.calcsize(SCALARS[vtype])
        return v

    meta = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        meta[key] = value(vtype)
    table = {}
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        table[name] = (dims, qtype, offset)
    align = meta.get("general.alignment") or 32
    start = -(-pos // align) * align
    return meta, {k: (d, q, start + o) for k, (d, q, o) in table.items()}


def read_gguf(path: Path) -> tuple[dict, dict, mmap.mmap]:
    """:func:`gguf_tables` of the file at ``path``, and the file mapped read-only."""
    fh = open(path, "rb")  # noqa: SIM115 (the map outlives this function)
    buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    fh.close()
    meta, tensors = gguf_tables(buf)
    return meta, tensors, buf


def gguf_f32(buf, entry, rows=None) -> np.ndarray:
    """A float32 tensor (or some of its rows) as stored, shape reversed to row-major."""
    dims, qtype, offset = entry
    assert qtype == 0  # F32
    shape = tuple(reversed(dims))
    if rows is None:
        return np.frombuffer(buf, np.float32, int(np.prod(shape)), offset).reshape(shape)
    return np.stack([np.frombuffer(buf, np.float32, shape[-1], offset + 4 * shape[-1] * r) for r in rows])
