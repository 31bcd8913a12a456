"""Popularity, the vector-embedding model (GRU4Rec-style), the matrix-embedding model and a ComiRec-SA multi-interest
baseline, the trained ones at equal parameter budget.

Every model exposes the same parts: ``queries(seqs)`` -- one query per position of each (padded) sequence, of shape
(B, T, *query_shape); ``item_features()`` -- one row per item; and ``scores(queries, features)`` -- the (rows x items)
score matrix of a batch of queries (N, *query_shape) against feature rows, which training and evaluation call.

- vector: GRU state -> Linear -> w in R^n; item features = candidate embeddings e_v; score w^T e_v.
- matrix: GRU state -> Linear -> z in R^{n(n+1)/2} -> symmetric A; item features = phi(e_v); score e_v^T A e_v.
- matrix with ``augment``: the same over [e_v; 1] (contains the vector model).
- comirec: GRU states -> causal self-attentive extractor -> K interests u_1..u_K in R^n per position; item features
  = e_v; score max_k u_k^T e_v (see :class:`ComiRecModel`).

For pop, vector and matrix the score is one inner product ``<query, item_features()[v]>`` (``interests == 1``), so
retrieval is one maximum-inner-product search; for comirec it is the maximum over ``interests`` inner products (one
search per interest, best score per item).

Input ("trigger") embeddings and candidate embeddings are separate tables, as in the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from aloe import AloeError
from aloe.recsys.symmetric import augment, n_pairs, phi, sym_from_z

MODELS = ("pop", "vector", "matrix", "comirec")
DEFAULT_INTERESTS = 4  # ComiRec's K


@dataclass
class ModelConfig:
    kind: str
    n_items: int
    embed_dim: int = 64
    hidden: int = 100
    out_dim: int = 16  # n: candidate-embedding size (the matrix is n x n, or (n+1) x (n+1) when augmented)
    augment: bool = False
    dropout: float = 0.25
    interests: int = DEFAULT_INTERESTS  # comirec: K interest vectors per position
    attn_dim: int = 0  # comirec: d_a of the attention (0: 4 * out_dim)

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.kind != "comirec":  # the comirec fields are left out of the other models' configs
            d.pop("interests")
            d.pop("attn_dim")
        return d


class Recommender(nn.Module):
    """Scoring shared by every model: one inner product per item unless a model overrides :meth:`scores`."""

    interests = 1  # inner products per score (the score is their maximum)

    def scores(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(N, D) queries, (C, D) feature rows -> (N, C) scores ``queries @ features.T``."""
        return queries @ features.T


class PopularityModel(Recommender):
    """Scores every item by its training frequency, whatever the prefix."""

    def __init__(self, counts: np.ndarray):
        super().__init__()
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))
        self.config = ModelConfig(kind="pop", n_items=len(counts))

    def queries(self, seqs: torch.Tensor) -> torch.Tensor:
        return torch.ones(*seqs.shape, 1)

    def item_features(self) -> torch.Tensor:
        return self.counts[:, None]


class GRUTrunk(Recommender):
    """Trigger embeddings -> dropout -> GRU: the trunk every trained model shares (same sizes at the same settings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        v = cfg.n_items
        self.embed = nn.Embedding(v + 1, cfg.embed_dim, padding_idx=v)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.embed_dim, cfg.hidden, batch_first=True)

    def states(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, T) padded item ids -> (B, T, hidden) GRU states (padding sits after the items, so it never leaks)."""
        return self.gru(self.drop(self.embed(seqs)))[0]


class SessionModel(GRUTrunk):
    """The GRU trunk -> linear head; the head's output size is what the kinds (vector, matrix) differ in."""

    def __init__(self, cfg: ModelConfig):
        if cfg.kind not in ("vector", "matrix"):
            raise AloeError(f"unknown trainable model {cfg.kind!r}; choose vector or matrix")
        super().__init__(cfg)
        v = cfg.n_items
        self.m = cfg.out_dim + (1 if cfg.kind == "matrix" and cfg.augment else 0)
        self.query_dim = n_pairs(self.m) if cfg.kind == "matrix" else cfg.out_dim
        self.head = nn.Linear(cfg.hidden, self.query_dim)
        self.candidates = nn.Parameter(torch.randn(v, cfg.out_dim) / cfg.out_dim**0.5)

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


def causal_attention(logits: torch.Tensor, values: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """Per position t and head k, the softmax over positions s <= t of ``logits[:, s, k]`` applied to ``values``:
    (B, T, K) logits, (B, T, n) values -> (B, T, K, n). Later positions get weight exactly 0, so nothing after t (a
    later item or padding) reaches position t. Query positions go in blocks of at most ``max_elements`` weights."""
    b, t, k = logits.shape
    step = max(1, max_elements // max(1, b * t * k))
    out = []
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        future = torch.arange(t1, device=logits.device)[None, :] > torch.arange(t0, t1, device=logits.device)[:, None]
        w = logits[:, None, :t1, :].expand(b, t1 - t0, t1, k).masked_fill(future[None, :, :, None], float("-inf"))
        out.append(torch.einsum("bcsk,bsn->bckn", torch.softmax(w, dim=2), values[:, :t1]))
    return torch.cat(out, 1)


class ComiRecModel(GRUTrunk):
    """ComiRec-SA (Cen et al., KDD 2020) on the shared GRU trunk.

    The trunk (trigger embeddings -> dropout -> GRU) is the one the vector and matrix models use, at the same sizes,
    so the comparison differs only in the session representation and its score. From the GRU states H (T x hidden)
    the self-attentive extractor computes K interest vectors per position:

        A = softmax over positions of W2 tanh(W1 H^T)      (W1: d_a x hidden, W2: K x d_a, no biases, as in the paper)
        U = A H W_p^T + b_p                                 (K x n: the interests, projected to the candidate size n)

    causally: the interests at position t attend only to positions s <= t, so the one-pass prefix augmentation of
    training and evaluation is exact and neither a later item nor padding reaches position t. (The projection is
    applied to H before the attention; the two orders are equal because each row of A sums to 1.) The score of item
    v after a prefix is ``max_k u_k^T e_v``, ComiRec's retrieval rule, used here for training as well: the full
    softmax (or a sampled loss) runs over these max-scores. (The paper trains each example with the single interest
    closest to its target instead.) Candidate embeddings e_v are a separate table of size n, as in the other models.
    """

    def __init__(self, cfg: ModelConfig):
        if cfg.kind != "comirec":
            raise AloeError(f"a ComiRec model needs kind 'comirec', got {cfg.kind!r}")
        check_interests(cfg.interests)
        super().__init__(cfg)
        self.interests = int(cfg.interests)
        self.attn_dim = cfg.attn_dim or 4 * cfg.out_dim
        self.w1 = nn.Linear(cfg.hidden, self.attn_dim, bias=False)
        self.w2 = nn.Linear(self.attn_dim, cfg.interests, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.out_dim)
        self.candidates = nn.Parameter(torch.randn(cfg.n_items, cfg.out_dim) / cfg.out_dim**0.5)

    def queries(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, T) padded item ids -> (B, T, K, n): the K interests after each prefix."""
        h = self.states(seqs)
        return causal_attention(self.w2(torch.tanh(self.w1(h))), self.proj(h))

    def item_vectors(self) -> torch.Tensor:
        return self.candidates

    def item_features(self) -> torch.Tensor:
        return self.candidates

    def scores(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(N, K, n) interests, (C, n) feature rows -> (N, C) scores ``max_k <u_k, e>``. Without gradients the maximum
        is kept in place (two N x C buffers); with them the K products are stacked. Both give the same values."""
        if queries.ndim != 3 or queries.shape[1] != self.interests:
            raise AloeError(f"ComiRec queries must be (rows, {self.interests}, n), got {tuple(queries.shape)}")
        ft = features.T
        if torch.is_grad_enabled() and (queries.requires_grad or features.requires_grad):
            return torch.stack([queries[:, k] @ ft for k in range(self.interests)]).amax(0)
        out = queries[:, 0] @ ft
        for k in range(1, self.interests):
            torch.maximum(out, queries[:, k] @ ft, out=out)
        return out


def check_interests(interests: int) -> None:
    """A one-line error unless ``interests`` (ComiRec's K) is an integer of at least 1."""
    if isinstance(interests, bool) or not isinstance(interests, (int, np.integer)) or interests < 1:
        raise AloeError(f"--interests must be at least 1, got {interests}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def vector_dim_for_budget(matrix_cfg: ModelConfig) -> int:
    """The candidate size n_v that brings the vector model closest to the matrix model's parameter count (same
    trunk): head (hidden+1) * n_v + items * n_v against (hidden+1) * m(m+1)/2 + items * n."""
    m = matrix_cfg.out_dim + (1 if matrix_cfg.augment else 0)
    target = (matrix_cfg.hidden + 1) * n_pairs(m) + matrix_cfg.n_items * matrix_cfg.out_dim
    per_dim = matrix_cfg.hidden + 1 + matrix_cfg.n_items
    return max(1, int(round(target / per_dim)))


def comirec_params_beyond_trunk(n: int, hidden: int, n_items: int, interests: int, attn_dim: int = 0) -> int:
    """Parameters of the ComiRec model outside the trunk at candidate size ``n``: W1 (d_a x hidden), W2 (K x d_a),
    the projection (hidden + 1) x n and the candidate table items x n, with d_a = ``attn_dim`` or 4n."""
    d_a = attn_dim or 4 * n
    return d_a * hidden + interests * d_a + (hidden + 1) * n + n_items * n


def comirec_dim_for_budget(matrix_cfg: ModelConfig, interests: int = DEFAULT_INTERESTS, attn_dim: int = 0) -> int:
    """The candidate size n_c that brings the ComiRec model (K = ``interests``, d_a = ``attn_dim`` or 4 n_c) closest
    to the matrix model's parameter count with the same trunk (ties go to the smaller n_c)."""
    m = matrix_cfg.out_dim + (1 if matrix_cfg.augment else 0)
    target = (matrix_cfg.hidden + 1) * n_pairs(m) + matrix_cfg.n_items * matrix_cfg.out_dim
    best, n = 1, 1
    while True:
        extra = comirec_params_beyond_trunk(n, matrix_cfg.hidden, matrix_cfg.n_items, interests, attn_dim)
        best_extra = comirec_params_beyond_trunk(best, matrix_cfg.hidden, matrix_cfg.n_items, interests, attn_dim)
        if abs(extra - target) < abs(best_extra - target):
            best = n
        if extra >= target:
            return best
        n += 1


def build_model(kind: str, n_items: int, *, counts: np.ndarray | None = None, embed_dim: int = 64,
                hidden: int = 100, matrix_dim: int = 16, augment: bool = False,
                dropout: float = 0.25, interests: int = DEFAULT_INTERESTS, attn_dim: int = 0) -> nn.Module:
    """``kind`` in pop|vector|matrix|comirec. The matrix model uses n = ``matrix_dim``; the vector and ComiRec models
    get the candidate size that matches the (plain) matrix model's parameter count with the same trunk. ComiRec
    has K = ``interests`` interests and attention size d_a = ``attn_dim`` (0: 4 x its candidate size, the paper's
    d_a = 4d)."""
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
    if kind == "comirec":
        check_interests(interests)
        if attn_dim < 0:
            raise AloeError(f"the attention size must be at least 1 (0: 4 x the candidate size), got {attn_dim}")
        n_c = comirec_dim_for_budget(plain, interests, attn_dim)
        return ComiRecModel(ModelConfig("comirec", n_items, embed_dim, hidden, n_c, False, dropout, int(interests),
                                        attn_dim or 4 * n_c))
    return SessionModel(ModelConfig("vector", n_items, embed_dim, hidden, vector_dim_for_budget(plain), False,
                                    dropout))


def model_from_config(cfg: ModelConfig, counts: np.ndarray | None = None) -> nn.Module:
    """An untrained model of the kind and sizes in ``cfg`` (e.g. to load saved weights into)."""
    if cfg.kind == "pop":
        if counts is None:
            raise AloeError("the popularity model needs the training item counts")
        return PopularityModel(counts)
    return ComiRecModel(cfg) if cfg.kind == "comirec" else SessionModel(cfg)
