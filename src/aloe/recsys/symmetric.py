"""The symmetric parameterisation of the session matrix and the pairwise-product feature map.

A vector ``z`` of ``n(n+1)/2`` numbers fills the upper triangle of A (row-major, i <= j) and is mirrored into the lower
one, so every symmetric n x n matrix has exactly one ``z``. With ``phi(e)_ij = c_ij e_i e_j`` (i <= j, c = 1 on the
diagonal, 2 off it), ``e^T A e = <z, phi(e)>``: scoring all items is one matmul ``Z @ phi(E)^T``.
"""

from __future__ import annotations

import torch


def n_pairs(n: int) -> int:
    return n * (n + 1) // 2


def triu_index(n: int, device: torch.device | None = None) -> torch.Tensor:
    """(2, n(n+1)/2) row/column indices of the upper triangle, row-major."""
    return torch.triu_indices(n, n, device=device)


def sym_from_z(z: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n(n+1)/2) -> (..., n, n) symmetric."""
    if z.shape[-1] != n_pairs(n):
        raise ValueError(f"expected {n_pairs(n)} entries for n={n}, got {z.shape[-1]}")
    r, c = triu_index(n, z.device)
    a = z.new_zeros(*z.shape[:-1], n, n)
    a[..., r, c] = z
    a[..., c, r] = z
    return a


def z_from_sym(a: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> (..., n(n+1)/2), the inverse of :func:`sym_from_z` on symmetric matrices."""
    n = a.shape[-1]
    r, c = triu_index(n, a.device)
    return a[..., r, c]


def pair_weights(n: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    r, c = triu_index(n, device)
    return torch.where(r == c, 1.0, 2.0).to(dtype)


def phi(e: torch.Tensor) -> torch.Tensor:
    """Pairwise-product feature map (..., n) -> (..., n(n+1)/2) with ``<z, phi(e)> = e^T sym_from_z(z) e``."""
    n = e.shape[-1]
    r, c = triu_index(n, e.device)
    return e[..., r] * e[..., c] * pair_weights(n, e.dtype, e.device)


def augment(e: torch.Tensor) -> torch.Tensor:
    """``[e; 1]``: with it ``e'^T A' e' = e^T A e + 2 a^T e + c`` contains the vector model's ``a^T e``."""
    return torch.cat([e, e.new_ones(*e.shape[:-1], 1)], dim=-1)
