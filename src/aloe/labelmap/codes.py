"""ECOC output codes (Dietterich & Bakiri 1995): one L-bit codeword per class, one sigmoid output per bit."""

from __future__ import annotations

import math

import numpy as np

from aloe import AloeError


def _check(n_classes: int, length: int) -> None:
    if n_classes < 2:
        raise AloeError(f"need at least 2 classes, got {n_classes}")
    need = math.ceil(math.log2(n_classes))
    if length < need:
        raise AloeError(f"an ECOC code for {n_classes} classes needs at least {need} bits, got {length}")


def random_code(n_classes: int, length: int, *, seed: int = 0) -> np.ndarray:
    """Uniform random 0/1 codewords (N, L) with no two classes sharing a codeword."""
    _check(n_classes, length)
    rng = np.random.default_rng(seed)
    code = rng.integers(0, 2, size=(n_classes, length), dtype=np.int8)
    for _ in range(100):
        _, first, counts = np.unique(code, axis=0, return_index=True, return_counts=True)
        if counts.max() == 1:
            return code
        keep = np.zeros(n_classes, dtype=bool)
        keep[first] = True
        redo = ~keep
        code[redo] = rng.integers(0, 2, size=(int(redo.sum()), length), dtype=np.int8)
    raise AloeError(f"could not draw {n_classes} distinct random codewords of {length} bits")


def hadamard_code(n_classes: int, length: int, *, seed: int = 0) -> np.ndarray:
    """Punctured Sylvester-Hadamard code: bit l of class y is ``parity(popcount(y & c_l))``.

    Row y of the Sylvester-Hadamard matrix H_{2^q} (2^q >= N) is the codeword over all 2^q columns; with ``length``
    below 2^q - 1 the code keeps the q unit columns (so codewords stay distinct) and ``length - q`` other nonzero
    columns drawn at random. With all 2^q - 1 nonzero columns every pair of codewords is at distance 2^(q-1).
    """
    _check(n_classes, length)
    q = max(1, math.ceil(math.log2(n_classes)))
    while (1 << q) - 1 < length:
        q += 1
    total = (1 << q) - 1
    units = [1 << b for b in range(q)]
    others = np.array([c for c in range(1, total + 1) if c & (c - 1)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    extra = rng.choice(others, size=length - q, replace=False) if length > q else np.zeros(0, dtype=np.int64)
    cols = np.concatenate([np.array(units, dtype=np.int64), np.sort(extra)])
    y = np.arange(n_classes, dtype=np.int64)[:, None]
    return (np.bitwise_count(y & cols[None, :]) & 1).astype(np.int8)


CODES = {"random": random_code, "hadamard": hadamard_code}
