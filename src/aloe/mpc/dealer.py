"""The dealer's correlated randomness (paper (a): the random server RS with PRF seeds).

The dealer draws one AES-128 key per computing party with :func:`secrets.token_bytes` and hands each party its own
key once, over that party's channel. Everything a party needs that can be derived from its key is expanded locally
by AES in counter mode (``cryptography``), in the same order on the dealer and on that party, so only *correction
terms* (values depending on both keys) travel, always from the dealer to one party.

Training draws each epoch's stream from its own key, :func:`epoch_key` (HKDF-SHA256 of the party's key and the
epoch): an epoch's randomness does not depend on what earlier epochs drew, so a run resumed at an epoch from the
dealer's checkpointed keys replays exactly the stream an unbroken run draws there.
"""

from __future__ import annotations

import functools
import math
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aloe.mpc import kernels

KEY_BYTES = 16
_NO_POSITIONS = np.zeros(0, dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _mod_magic(m: int) -> tuple[int, int]:
    return kernels.division_magic(m, 16)


def small_mod(v: torch.Tensor, m: int) -> torch.Tensor:
    """``v mod m`` as int16 for integer tensors with ``-m^2 <= v < 2^16 - m^2`` and ``m <= 256``.

    The value is shifted by ``m^2`` (a multiple of m) into [0, 2^16) and divided by a multiply and a shift in one
    compiled pass, several times faster than a 64-bit division or a table gather on CPU (checked exhaustively over
    the whole range in the tests)."""
    if m > 256:
        raise ValueError("small_mod needs m <= 256")
    flat = v.to(torch.int16).reshape(-1).numpy()
    return torch.from_numpy(kernels.mod_16bit(flat, m, *_mod_magic(m))).reshape(v.shape)


_ZEROS = bytearray()


def _zeros(n: int) -> memoryview:
    """``n`` zero bytes, the plaintext of the CTR keystream (one buffer, grown as needed, never written)."""
    global _ZEROS
    if len(_ZEROS) < n:
        _ZEROS = bytearray(max(n, 2 * len(_ZEROS)))
    return memoryview(_ZEROS)[:n]


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def epoch_key(key: bytes, epoch: int) -> bytes:
    """The key of one training epoch's stream, derived from a party's key (HKDF-SHA256, the epoch in ``info``)."""
    if len(key) != KEY_BYTES:
        raise ValueError("PRG key must be 16 bytes")
    info = b"aloe mpc training epoch " + int(epoch).to_bytes(8, "big")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key)


class PRG:
    """A pseudo-random stream: AES-128-CTR keystream (zero IV) of a secret key, cut into tensors."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("PRG key must be 16 bytes")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
        self.bytes_drawn = 0

    def _bytes(self, n: int) -> np.ndarray:
        """The next ``n`` keystream bytes, encrypted straight into a new writable array (no copy)."""
        self.bytes_drawn += n
        out = np.empty(n + 15, dtype=np.uint8)  # CTR's update_into wants room for one more block
        self._enc.update_into(_zeros(n), out)
        return out[:n]

    def int64(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform elements of Z_2^64."""
        n = math.prod(shape)
        return torch.from_numpy(self._bytes(8 * n).view(np.int64)).reshape(shape)

    def bits(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform bits as uint8 0/1 (8 bits of keystream per byte)."""
        n = math.prod(shape)
        raw = self._bytes((n + 7) // 8)
        arr = np.unpackbits(raw, bitorder="little")[:n]
        return torch.from_numpy(arr).reshape(shape)

    def below(self, shape: tuple[int, ...], m: int, offset: int = 0) -> torch.Tensor:
        """Uniform elements of Z_m (``m`` < 2^62) as int64 (int16 for ``m`` < 256 not a power of two).

        Powers of two are masked words; ``m < 256`` is exact rejection sampling on 16-bit words (Lemire's
        multiply-and-reject; the dealer and the party draw the same stream, so they stay in step);
        larger ``m`` reduces 64-bit words (statistical distance <= m / 2^64). ``offset`` is added to every value."""
        n = math.prod(shape)
        if offset and not m < 256:
            return self.below(shape, m) + offset
        if m & (m - 1) == 0:
            if m <= 256:
                raw = np.frombuffer(self._bytes(n), dtype=np.uint8) & np.uint8(m - 1)
                return torch.from_numpy(raw.astype(np.int64) + offset).reshape(shape)
            return self.int64(shape) & (m - 1)
        if m < 256:
            # exact: Lemire's multiply-and-reject on 16-bit words (a word is rejected with probability
            # (2^16 mod m) / 2^16 < 0.4%); rejected positions are redrawn in order, the same on every party that
            # draws this stream
            out = np.empty(n, dtype=np.int16)
            bad = kernels.lemire_below(self._bytes(2 * n).view(np.uint16), m, offset, out, _NO_POSITIONS)
            while bad.size:
                bad = kernels.lemire_below(self._bytes(2 * bad.size).view(np.uint16), m, offset, out, bad)
            return torch.from_numpy(out).reshape(shape)
        arr = np.frombuffer(self._bytes(8 * n), dtype=np.uint64) % np.uint64(m)
        return torch.from_numpy(arr.astype(np.int64)).reshape(shape)

    def nonzero_below(self, shape: tuple[int, ...], m: int) -> torch.Tensor:
        """Elements of Z_m \\ {0}."""
        return self.below(shape, m - 1, offset=1)
