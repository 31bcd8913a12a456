"""Popularity, the vector-embedding model (GRU4Rec-style) and the matrix-embedding model at equal parameter budget.

Every model exposes the same two halves so that retrieval is one maximum-inner-product search:
``queries(seqs)`` -- one query per position of each (padded) sequence, and ``item_features()`` -- one row per item;
the score of item v after a prefix is ``<query, item_features()[v]>``.

- vector: GRU state -> Linear -> w in R^n; item features = candidate embeddings e_v; score w^T e_v.
- matrix: GRU state -> Linear -> z in R^{n(n+1)/2} -> symmetric A; item features = phi(e_v); score e_v^T A e_v.
- matrix with ``augment``: the same over [e_v; 1] (contains the vector model).

Input ("trigger") embeddings and candidate embeddings are separate tables, as in the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from aloe import AloeError
from aloe.recsys.symmetric import augment, n_pairs, phi, sym_from_z

MODELS = ("pop", "vector", "matrix")


@dataclass
class ModelConfig:
    kind: str
    n_items: int
    embed_dim: int = 64
    hidden: int = 100
    out_dim: int = 16  # n: candidate-embedding size (the matrix is n x n, or (n+1) x (n+1) when augmented)
    augment: bool = False
    dropout: float = 0.25

    def as_dict(self) -> dict:
        return asdict(self)


class PopularityModel(nn.Module):
    """Scores every item by its training frequency, whatever the prefix."""

    def __init__(self, counts: np.ndarray):
        super().__init__()
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))
        self.config = ModelConfig(kind="pop", n_items=len(counts))

    def queries(self, seqs: torch.Tensor) -> torch.Tensor:
        return torch.ones(*seqs.shape, 1)

    def item_features(self) -> torch.Tensor:
        return self.counts[:, None]


class SessionModel(nn.Module):
    """Trigger embeddings -> dropout -> GRU -> linear head; the head's output size is what the kinds differ in."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.kind not in ("vector", "matrix"):
            raise AloeError(f"unknown trainable model {cfg.kind!r}; choose vector or matrix")
        self.config = cfg
        v = cfg.n_items
        self.embed = nn.Embedding(v + 1, cfg.embed_dim, padding_idx=v)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.embed_dim, cfg.hidden, batch_first=True)
        self.m = cfg.out_dim + (1 if cfg.kind == "matrix" and cfg.augment else 0)
        self.query_dim = n_pairs(self.m) if cfg.kind == "matrix" else cfg.out_dim
        self.head = nn.Linear(cfg.hidden, self.query_dim)
        self.candidates = nn.Parameter(torch.randn(v, cfg.out_dim) / cfg.out_dim**0.5)

    def states(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, T) padded item ids -> (B, T, hidden) GRU states (padding sits after the items, so it never leaks)."""
        return self.gru(self.drop(self.embed(seqs)))[0]

    def queries(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.head(self.states(seqs))

    def item_vectors(self) -> torch.Tensor:
        """e_v (or [e_v; 1] when augmented): the vectors the session matrix acts on."""
        e = self.candidates
        return augment(e) if self.config.kind == "matrix" and self.config.augment else e

    def item_features(self) -> torch.Tensor:
        return phi(self.item_vectors()) if self.config.kind == "matrix" else self.candidates

    def session_matrix(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.kind != "matrix":
            raise AloeError("only the matrix model has a session matrix")
        return sym_from_z(z, self.m)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def vector_dim_for_budget(matrix_cfg: ModelConfig) -> int:
    """The candidate size n_v that brings the vector model closest to the matrix model's parameter count (same
    trunk): head (hidden+1) * n_v + items * n_v against (hidden+1) * m(m+1)/2 + items * n."""
    m = matrix_cfg.out_dim + (1 if matrix_cfg.augment else 0)
    target = (matrix_cfg.hidden + 1) * n_pairs(m) + matrix_cfg.n_items * matrix_cfg.out_dim
    per_dim = matrix_cfg.hidden + 1 + matrix_cfg.n_items
    return max(1, int(round(target / per_dim)))


def build_model(kind: str, n_items: int, *, counts: np.ndarray | None = None, embed_dim: int = 64,
                hidden: int = 100, matrix_dim: int = 16, augment: bool = False,
                dropout: float = 0.25) -> nn.Module:
    """``kind`` in pop|vector|matrix. The matrix model uses n = ``matrix_dim``; the vector model gets the candidate
    size that matches the (plain) matrix model's parameter count with the same trunk."""
    if kind == "pop":
        if counts is None:
            raise AloeError("the popularity model needs the training item counts")
        return PopularityModel(counts)
    if kind not in MODELS:
        raise AloeError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
    mcfg = ModelConfig("matrix", n_items, embed_dim, hidden, matrix_dim, augment if kind == "matrix" else False,
                       dropout)
    if kind == "matrix":
        return SessionModel(mcfg)
    plain = ModelConfig("matrix", n_items, embed_dim, hidden, matrix_dim, False, dropout)
    return SessionModel(ModelConfig("vector", n_items, embed_dim, hidden, vector_dim_for_budget(plain), False,
                                    dropout))
