"""Full-ranking next-item metrics: Recall@k (= HR@k = P@k with one target) and MRR@k."""

from __future__ import annotations

import numpy as np
import torch


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
