"""Interests: the eigenvectors of the session matrix with positive eigenvalues, and the items each one retrieves.

With A = sum_k lam_k u_k u_k^T the score splits into ``sum_k lam_k (u_k^T e)^2``; an interest u_k (lam_k > 0) pulls
up the items whose vectors point along +u_k or -u_k, so it retrieves the items with the largest ``|u_k^T e|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aloe import AloeError


@dataclass
class Interest:
    eigenvalue: float
    vector: np.ndarray
    items: np.ndarray  # dense item ids, best first
    strength: np.ndarray  # lam * (u^T e)^2 of those items
    share: float  # lam / sum of the positive eigenvalues


def session_interests(a, vectors, top: int = 3, per_interest: int = 10) -> list[Interest]:
    """The ``top`` positive eigenvectors of the symmetric matrix ``a`` (largest eigenvalue first) and the
    ``per_interest`` items of ``vectors`` (rows e_v) each retrieves."""
    a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    x = vectors.detach().cpu().double().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors,
                                                                                                     np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] != x.shape[1]:
        raise AloeError(f"session matrix {a.shape} does not match item vectors {x.shape}")
    lam, u = np.linalg.eigh((a + a.T) / 2)
    order = np.argsort(-lam)
    positive = [i for i in order if lam[i] > 0]
    total = float(lam[lam > 0].sum())
    out: list[Interest] = []
    for i in positive[:top]:
        proj = x @ u[:, i]
        strength = lam[i] * proj**2
        best = np.lexsort((np.arange(len(x)), -strength))[:per_interest]
        out.append(Interest(float(lam[i]), u[:, i].copy(), best, strength[best], float(lam[i]) / total))
    return out
