"""Full-ranking next-item metrics: Recall@k (= HR@k = P@k with one target) and MRR@k, overall and per bucket of the
number of positive eigenvalues of the matrix model's session matrix."""

from __future__ import annotations

import numpy as np
import torch

from aloe import AloeError


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items, ties counted against the target (pessimistic): rank = 1 + the
    number of *other* items scoring >= the target."""
    t = scores.gather(1, targets.view(-1, 1))
    return (scores >= t).sum(dim=1)


def recall_at(ranks: np.ndarray, k: int = 20) -> float:
    ranks = np.asarray(ranks)
    return float((ranks <= k).mean()) if len(ranks) else float("nan")


def mrr_at(ranks: np.ndarray, k: int = 20) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.where(ranks <= k, 1.0 / ranks, 0.0).mean()) if len(ranks) else float("nan")


def positive_eigen_counts(mats, rtol: float = 1e-3) -> np.ndarray:
    """Number of positive eigenvalues of each symmetric matrix in ``mats`` (..., n, n): an eigenvalue counts when it
    exceeds ``rtol`` times the matrix's largest absolute eigenvalue (the zero matrix has none)."""
    a = mats.detach().cpu().double().numpy() if isinstance(mats, torch.Tensor) else np.asarray(mats, np.float64)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise AloeError(f"expected square session matrices (..., n, n), got shape {a.shape}")
    if rtol < 0:
        raise AloeError(f"rtol must be at least 0, got {rtol}")
    lam = np.linalg.eigvalsh((a + np.swapaxes(a, -1, -2)) / 2)
    scale = np.abs(lam).max(axis=-1, keepdims=True)
    return ((lam > rtol * scale) & (scale > 0)).sum(axis=-1)


def bucket_labels(edges: tuple[int, ...]) -> list[str]:
    """Labels of the buckets [0, e_0), [e_0, e_1), ..., [e_last, inf): '0', '1', '4-5', '8+'."""
    bounds = [0, *edges]
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(bounds, bounds[1:])]
    return labels + [f"{bounds[-1]}+"]


def bucket_of(counts: np.ndarray, edges: tuple[int, ...]) -> np.ndarray:
    """Bucket index of each count: 0 for counts below ``edges[0]``, i for ``edges[i-1] <= count < edges[i]``."""
    edges = tuple(int(e) for e in edges)
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise AloeError(f"bucket edges must be increasing integers from 1, got {', '.join(map(str, edges)) or 'none'}")
    return np.searchsorted(np.asarray(edges), np.asarray(counts), side="right")


def metrics_by_bucket(counts: np.ndarray, ranks: dict[str, np.ndarray], edges: tuple[int, ...] = (1, 2, 3, 4),
                      k: int = 20) -> list[dict]:
    """Recall@k and MRR@k of every model in ``ranks`` (name -> per-prefix target ranks, all in the same prefix order)
    within the buckets of ``counts`` (the matrix model's positive eigenvalues per prefix, see
    :func:`positive_eigen_counts`): one row per bucket, with its label and number of prefixes."""
    counts = np.asarray(counts)
    for name, r in ranks.items():
        if len(r) != len(counts):
            raise AloeError(f"{name}: {len(r)} ranks for {len(counts)} prefixes")
    which = bucket_of(counts, edges)
    rows = []
    for b, lab in enumerate(bucket_labels(tuple(edges))):
        sel = which == b
        rows.append({"bucket": lab, "n": int(sel.sum()),
                     "models": {name: {f"recall@{k}": recall_at(np.asarray(r)[sel], k),
                                       f"mrr@{k}": mrr_at(np.asarray(r)[sel], k)} for name, r in ranks.items()}})
    return rows
