"""Vocabulary permutation tau, noise, embedding and LM head (section 2.2).

Weights are in Hugging Face layout (rows = tokens, n x d for both the embedding and the head). With the row-vector
convention of the paper, ``W~_embed = Pi W*_embed P`` and ``W~_head = Q W*_head Pi^T``, which in this layout reads:
row ``tau[i]`` of the obfuscated embedding is ``W*_embed[i] @ P`` and row ``tau[i]`` of the obfuscated head is
``W*_head[i] @ Q^T``. The logits come out permuted: ``logits~[tau[i]] == logits[i]``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from aloe.obfuscation.rng import SecureRandom


def vocab_permutation(rng: SecureRandom, n: int, fixed_ids: Iterable[int] = ()) -> np.ndarray:
    """tau as an array: ``tau[plain_id] = obfuscated_id``. Ids in ``fixed_ids`` (special and chat-template tokens,
    padding rows) map to themselves so the server's EOS stop and chat template keep working; all others are
    permuted uniformly among themselves."""
    fixed = sorted({int(i) for i in fixed_ids if 0 <= int(i) < n})
    movable = np.setdiff1d(np.arange(n), np.asarray(fixed, dtype=np.int64))
    tau = np.arange(n, dtype=np.int64)
    tau[movable] = movable[rng.permutation(len(movable))]
    return tau


def inverse_permutation(tau: np.ndarray) -> np.ndarray:
    inv = np.empty_like(tau)
    inv[tau] = np.arange(len(tau), dtype=tau.dtype)
    return inv


NOISE_SHAPES = ("entry", "row")


def noise_std(weight: np.ndarray, alpha: float, shape: str = "entry") -> np.ndarray:
    """Per-row standard deviation of the noise on an n x d table.

    ``entry`` (the paper): one sigma for every entry, the standard deviation of the whole table, so rows of small norm
    get relatively more noise than rows of large norm. ``row``: sigma_i = alpha * ||w_i|| / sqrt(d), the same
    signal-to-noise ratio for every row (the table's mean noise energy stays that of ``entry`` up to the spread of the
    row norms)."""
    if shape not in NOISE_SHAPES:
        raise ValueError(f"unknown noise shape {shape!r}; choose one of {NOISE_SHAPES}")
    n, d = weight.shape
    if shape == "entry":
        return np.full(n, alpha * float(weight.std()))
    return alpha * np.linalg.norm(weight, axis=1) / np.sqrt(d)


def add_noise(weight: np.ndarray, alpha: float, rng: SecureRandom, shape: str = "entry") -> np.ndarray:
    """``W* = W + alpha * N(0, sigma^2)``: with ``entry`` sigma is the standard deviation of W itself (i.i.d. per
    entry); with ``row`` it is each row's own RMS (see :func:`noise_std`)."""
    if alpha == 0:
        return weight
    return weight + rng.normal(weight.shape) * noise_std(weight, alpha, shape)[:, None]


def obfuscate_embedding(weight: np.ndarray, tau: np.ndarray, P: np.ndarray, alpha_e: float,
                        rng: SecureRandom, noise_shape: str = "entry") -> np.ndarray:
    """n x d plain embedding -> n x d' obfuscated embedding."""
    noised = add_noise(weight, alpha_e, rng, noise_shape)
    out = np.empty((weight.shape[0], P.shape[1]))
    out[tau] = noised @ P
    return out


def obfuscate_head(weight: np.ndarray, final_norm: np.ndarray, tau: np.ndarray, Q: np.ndarray, alpha_h: float,
                   rng: SecureRandom, noise_shape: str = "entry") -> np.ndarray:
    """n x d plain LM head (the final RMSNorm's gamma folded in first) -> n x d' obfuscated head."""
    folded = weight * final_norm[None, :]
    noised = add_noise(folded, alpha_h, rng, noise_shape)
    out = np.empty((weight.shape[0], Q.shape[0]))
    out[tau] = noised @ Q.T
    return out


CHUNK_BYTES = 32 << 20


def table_rows_f32(weight, tau: np.ndarray, key: np.ndarray, *, multiplier: np.ndarray | None = None,
                   alpha: float = 0.0, rng: SecureRandom | None = None, noise_shape: str = "entry",
                   chunk_bytes: int = CHUNK_BYTES):
    """The obfuscated embedding (``key`` = P, d x d') or head (``key`` = Q^T, d x d', with the final norm's
    ``multiplier`` folded in) in float32, yielded in blocks of output rows so that only the plain table (in its
    stored dtype) and one block are ever held. Row ``tau[i]`` of the result is row i of the plain table times the
    key, as :func:`obfuscate_embedding` / :func:`obfuscate_head` give it.

    With noise (``alpha`` > 0) the table is noised in float64 first, exactly as the float64 path does (the noise
    needs the whole table's statistics and draws), and that noised table is held instead."""
    import torch

    n = weight.shape[0]
    if alpha:
        plain = weight.double().numpy() if isinstance(weight, torch.Tensor) else weight
        if multiplier is not None:
            plain = plain * multiplier[None, :]
        weight = torch.from_numpy(add_noise(plain, alpha, rng, noise_shape)).float()
        multiplier = None
    K = torch.from_numpy(np.array(key, dtype=np.float32))
    m32 = None if multiplier is None else torch.from_numpy(multiplier).float()
    inv = torch.from_numpy(inverse_permutation(tau))
    step = max(1, chunk_bytes // (4 * (K.shape[0] + K.shape[1])))
    for a in range(0, n, step):
        rows = weight[inv[a:a + step]].float()
        if m32 is not None:
            rows = rows * m32[None, :]
        yield rows @ K
