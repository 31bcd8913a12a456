"""Secret randomness for the obfuscation keys.

Every secret (keys, permutations, noise) is drawn from a stream of AES-256-CTR keyed by HKDF-SHA256 from one
256-bit master seed that comes from the operating system's CSPRNG (:mod:`secrets`). Each component asks for its
own labelled child stream, so draws do not depend on the order in which components are converted, and the same
seed reproduces the same artifact. Nothing here uses :mod:`random` or a torch/numpy global seed.
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32


def new_seed() -> bytes:
    """A fresh 256-bit master seed from the OS CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


class SecureRandom:
    """Deterministic cryptographic stream (AES-256-CTR) with numpy-shaped draws in float64."""

    def __init__(self, seed: bytes, label: str = "root") -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"seed must be {SEED_BYTES} bytes")
        self._seed = seed
        self.label = label
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"aloe-obfuscation-v1",
                   info=label.encode()).derive(seed)
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()

    def child(self, label: str) -> SecureRandom:
        """An independent stream for a named component."""
        return SecureRandom(self._seed, f"{self.label}/{label}")

    def _words(self, n: int) -> np.ndarray:
        raw = self._enc.update(b"\x00" * (8 * n))
        return np.frombuffer(raw, dtype=np.uint64).copy()

    def uniform(self, shape, low: float = 0.0, high: float = 1.0) -> np.ndarray:
        """Uniform in [low, high) with 53 random bits per value."""
        n = int(np.prod(shape)) if shape != () else 1
        u = (self._words(n) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        return (low + (high - low) * u).reshape(shape)

    def normal(self, shape, std: float = 1.0) -> np.ndarray:
        """Standard normal by the Box-Muller transform."""
        n = int(np.prod(shape)) if shape != () else 1
        m = (n + 1) // 2
        u1 = 1.0 - self.uniform((m,))  # (0, 1]: log is finite
        u2 = self.uniform((m,))
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
        return (std * z).reshape(shape)

    def permutation(self, n: int) -> np.ndarray:
        """A uniformly random permutation of range(n) (Fisher-Yates with rejection-free 64-bit draws)."""
        perm = np.arange(n)
        if n < 2:
            return perm
        words = self._words(n - 1)
        for i in range(n - 1, 0, -1):
            j = int(words[n - 1 - i] % np.uint64(i + 1))  # bias <= (i+1)/2^64, negligible
            perm[i], perm[j] = perm[j], perm[i]
        return perm

    def orthogonal(self, n: int) -> np.ndarray:
        """A Haar-distributed orthogonal matrix (QR of a Gaussian matrix with the sign fix)."""
        q, r = np.linalg.qr(self.normal((n, n)))
        return q * np.sign(np.diag(r))
