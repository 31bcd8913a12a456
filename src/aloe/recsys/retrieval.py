"""Retrieval for the match stage: exact top-k, a faiss MIPS index over the item features, and the eigenvector route.

- :func:`exact_topk` scores every item (one matmul) and sorts; ties go to the lower item id.
- :class:`MipsIndex` is a faiss index over the item features (phi(e) for the matrix model, e for the vector model):
  ``flat`` is faiss's exact inner-product search, ``ivf`` an inverted file (k-means cells, ``nprobe`` of them
  searched) and ``hnsw`` its graph index (both approximate; measure their recall with :func:`recall_vs_exact`).
- :func:`exact_topk_chunked` is the same exact search for catalogues too large for one score matrix (torch, in
  chunks of queries; float32).
- :func:`eigen_candidates_topk` is the approximate, batched form of the eigenvector route: the top positive
  eigenvectors of each session matrix query any index over the item vectors for a fixed number of items per sign,
  and the union is re-ranked exactly (no bound, so its recall is measured).
- :func:`eigen_topk` answers one matrix query from an exact MIPS index over the item *vectors* e (dimension n, not
  n(n+1)/2). With A = sum_k lam_k u_k u_k^T, each positive eigenvector queries the index with +u_k and -u_k for its
  m best items; candidates are re-ranked exactly. An item outside every list has |u_k^T e| <= t_k (the m-th value of
  list k), so its score is at most ``sum_{lam_k > 0} lam_k t_k^2``; since also sum_k (u_k^T e)^2 <= |e|^2 <= R^2 (R
  the largest item norm), the bound tightens to the fractional knapsack ``max sum lam_k c_k`` over
  0 <= c_k <= t_k^2, sum c_k <= R^2 (fill the largest eigenvalues first). When the k-th best candidate reaches the
  bound the answer is exact, otherwise m doubles (at m = number of items it is exhaustive).

Multi-interest queries (ComiRec: the score of an item is the maximum of K inner products) are (Q, K, D) arrays:
:func:`exact_topk` and :func:`exact_topk_chunked` score them by that maximum, and :meth:`MipsIndex.search` runs one
search per interest and keeps each item's best score (:func:`merge_interest_lists`). The merge is exact for an exact
index: an item in the true top-k under the maximum, with its maximum at interest k, has fewer than k items above it in
interest k's list, so it is in that list with its true score. The eigenvector routes are for session matrices only.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from aloe import AloeError


def _f32(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def _sort_rows(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -scores), axis=-1) if scores.ndim == 1 else np.stack(
        [np.lexsort((i, -s)) for s, i in zip(scores, ids)])
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def _queries(queries) -> np.ndarray:
    q = _f32(queries)
    if q.ndim not in (2, 3):
        raise AloeError(f"queries must be (queries, dim) or (queries, interests, dim), got shape {q.shape}")
    return q


def max_inner_products(q: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(Q, D) or (Q, K, D) queries, (V, D) features -> (Q, V) scores: the inner product, or its maximum over K."""
    if q.ndim == 2:
        return q @ f.T
    scores = q[:, 0] @ f.T
    for j in range(1, q.shape[1]):
        np.maximum(scores, q[:, j] @ f.T, out=scores)
    return scores


def exact_topk(queries, features, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) queries -- or (Q, K, D) multi-interest queries, scored by the maximum over K -- and (V, D) item features
    -> (Q, k) scores and item ids, best first."""
    q, f = _queries(queries), _f32(features)
    k = min(k, len(f))
    scores = max_inner_products(q, f)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return _sort_rows(np.take_along_axis(scores, part, 1), part)


def exact_topk_chunked(queries, features, k: int, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_topk` for large catalogues: scores ``chunk`` queries at a time (a ``chunk x items`` float32 matrix)
    with torch's matmul and top-k; within the k results ties go to the lower item id. (Q, K, D) queries are scored
    by the maximum over K."""
    import torch

    q, f = torch.from_numpy(_queries(queries)), torch.from_numpy(_f32(features))
    k = min(k, len(f))
    out_s, out_i = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    for s in range(0, len(q), chunk):
        block = q[s:s + chunk]
        scores = block @ f.T if block.ndim == 2 else torch.from_numpy(max_inner_products(block.numpy(), f.numpy()))
        vals, ids = torch.topk(scores, k, dim=1)
        out_s[s:s + chunk], out_i[s:s + chunk] = _sort_rows(vals.numpy(), ids.numpy())
    return out_s, out_i


class MipsIndex:
    """A faiss maximum-inner-product index over item features."""

    def __init__(self, features, kind: str = "flat", hnsw_m: int = 32, ef_construction: int = 200,
                 ef_search: int = 128, nlist: int = 1024, nprobe: int = 16, train_size: int = 65_536,
                 seed: int = 0):
        f = _f32(features)
        if f.ndim != 2 or not len(f):
            raise AloeError("the index needs a non-empty (items, dim) feature matrix")
        self.kind, self.n, self.dim = kind, len(f), f.shape[1]
        if kind == "flat":
            self.index = faiss.IndexFlatIP(self.dim)
        elif kind == "ivf":
            if not 1 <= nlist <= len(f):
                raise AloeError(f"an IVF index needs 1 <= nlist <= items ({len(f)}), got {nlist}")
            self.quantizer = faiss.IndexFlatIP(self.dim)  # kept alive: the IVF index refers to it
            self.index = faiss.IndexIVFFlat(self.quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = f if len(f) <= train_size else f[np.sort(rng.choice(len(f), train_size, replace=False))]
            self.index.train(sample)
            self.index.nprobe = nprobe
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.hnsw.efSearch = ef_search
        else:
            raise AloeError(f"unknown index kind {kind!r}; choose flat, ivf or hnsw")
        self.index.add(f)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) queries -> (Q, k) scores and ids, best first. (Q, K, dim) multi-interest queries: one search per
        interest, merged by each item's best score (:func:`merge_interest_lists`; exact for a flat index)."""
        q = _queries(queries)
        if q.shape[-1] != self.dim:
            raise AloeError(f"queries of dimension {q.shape[-1]} for an index of dimension {self.dim}")
        if q.ndim == 3:
            scores, ids = self.search(q.reshape(-1, self.dim), k)
            return merge_interest_lists(scores.reshape(len(q), q.shape[1], -1), ids.reshape(len(q), q.shape[1], -1),
                                        min(k, self.n))
        scores, ids = self.index.search(q, min(k, self.n))
        return scores, ids.astype(np.int64)

    def set_search_effort(self, effort: int) -> None:
        """``nprobe`` of an IVF index, ``efSearch`` of an HNSW index (a flat index has no knob)."""
        if self.kind == "ivf":
            self.index.nprobe = int(effort)
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = int(effort)


def merge_interest_lists(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, K, m) per-interest search results -> (Q, k): every item's best score over the lists it is in, best first,
    ties to the lower id; ids < 0 (faiss's 'no result') are dropped and missing places are (-inf, -1)."""
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for r in range(len(ids)):
        i, s = ids[r].ravel(), scores[r].ravel().astype(np.float32)
        keep = i >= 0
        i, s = i[keep], s[keep]
        order = np.lexsort((-s, i))  # by id, its best score first
        i, s = i[order], s[order]
        first = np.ones(len(i), dtype=bool)
        first[1:] = i[1:] != i[:-1]
        i, s = i[first], s[first]
        top = np.lexsort((i, -s))[:k]
        out_s[r, :len(top)], out_i[r, :len(top)] = s[top], i[top]
    return out_s, out_i


def recall_vs_exact(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids that the index returned."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, exact_ids)]))


def same_topk(ids: np.ndarray, scores: np.ndarray, exact_ids: np.ndarray, exact_scores: np.ndarray,
              rtol: float = 1e-5) -> np.ndarray:
    """Per query: the index result equals the exact top-k -- same ids in the same order, except that items whose exact
    scores tie (within float32 rounding) may swap places."""
    out = np.zeros(len(ids), dtype=bool)
    for r, (a, sa, b, sb) in enumerate(zip(ids, scores, exact_ids, exact_scores)):
        tol = rtol * max(1.0, float(np.abs(sb).max()))
        # a swapped pair of ids is a tie: the k-th best scores must still agree position by position
        out[r] = bool(np.array_equal(a, b) or (len(a) == len(b) and np.allclose(sa, sb, rtol=0, atol=tol)))
    return out


@dataclass
class EigenResult:
    ids: np.ndarray
    scores: np.ndarray
    candidates: int  # items scored exactly
    rounds: int
    list_size: int  # final m per eigenvector and sign
    bound: float  # the score bound for every item outside the candidates


def pruning_bound(lam_pos: np.ndarray, t: np.ndarray, r2: float) -> float:
    """Largest ``sum lam_k c_k`` with ``0 <= c_k <= t_k^2`` and ``sum c_k <= r2`` (``lam_pos`` > 0)."""
    bound, budget = 0.0, float(r2)
    for j in np.argsort(-lam_pos):
        c = min(float(t[j]) ** 2, budget)
        bound += float(lam_pos[j]) * c
        budget -= c
        if budget <= 0:
            break
    return bound


def eigen_topk(a: np.ndarray, vectors: np.ndarray, k: int, index: MipsIndex | None = None,
               start: int | None = None, max_norm2: float | None = None) -> EigenResult:
    """Exact top-k of ``x^T A x`` over the rows x of ``vectors`` via the eigenvector route (see module doc).
    ``index`` must be an exact MIPS index over ``vectors`` (kind ``flat``); built here if not given."""
    a = np.asarray(a, dtype=np.float64)
    x = _f32(vectors)
    n_items = len(x)
    k = min(k, n_items)
    index = index or MipsIndex(x, "flat")
    if index.kind != "flat" or index.n != n_items:
        raise AloeError("the eigenvector route needs an exact (flat) index over the same item vectors")
    r2 = float((x.astype(np.float64) ** 2).sum(1).max()) * (1 + 1e-6) if max_norm2 is None else max_norm2
    lam, u = np.linalg.eigh((a + a.T) / 2)
    pos = lam > 0
    lam_p, u_p = lam[pos], u[:, pos]
    queries = np.concatenate([u_p.T, -u_p.T]).astype(np.float32)
    m = max(start or k, 1)
    rounds = 0
    while True:
        rounds += 1
        m = min(m, n_items)
        if len(queries):
            vals, ids = index.search(queries, m)
            cand = np.unique(ids[ids >= 0])
            p = len(lam_p)
            t = np.maximum(np.maximum(vals[:p, -1], vals[p:, -1]), 0.0).astype(np.float64)
            bound = pruning_bound(lam_p, t, r2)
        else:  # no positive eigenvalue: every score is <= 0
            cand, bound = np.arange(min(m, n_items)), 0.0
        xc = x[cand].astype(np.float64)
        sc = np.einsum("vi,ij,vj->v", xc, a, xc)
        top = np.lexsort((cand, -sc))[:k]
        exhaustive = len(cand) == n_items or m >= n_items
        if exhaustive or (len(top) == k and sc[top[-1]] >= bound):
            return EigenResult(cand[top], sc[top], int(len(cand)), rounds, int(m), bound)
        m *= 2


def eigen_candidates_topk(mats: np.ndarray, vectors: np.ndarray, k: int, index: MipsIndex, per_list: int,
                          eigenvectors: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Approximate top-k of ``x^T A x`` for a batch of session matrices ``mats`` (Q, n, n) over the rows x of
    ``vectors``: the ``eigenvectors`` largest positive eigenvalues of each A send +u and -u to ``index`` (any index
    over ``vectors``, exact or not) for ``per_list`` items each; the union (at most 2 x eigenvectors x per_list
    items) is scored exactly and its top-k returned, best first. Returns scores, ids (-1 where fewer than k
    candidates) and the number of distinct candidates per query."""
    a = np.asarray(mats, dtype=np.float64)
    a = (a + np.swapaxes(a, 1, 2)) / 2
    x = _f32(vectors)
    q_n, n = a.shape[0], a.shape[1]
    h = min(eigenvectors, n)
    lam, u = np.linalg.eigh(a)  # ascending
    lam, u = lam[:, -h:], u[:, :, -h:]  # the h largest
    dirs = np.swapaxes(u, 1, 2)  # (Q, h, n)
    queries = np.concatenate([dirs, -dirs], 1).reshape(-1, n)
    _, ids = index.search(queries, min(per_list, len(x)))
    positive = np.concatenate([lam > 0, lam > 0], 1)  # (Q, 2h): a non-positive eigenvalue brings no candidates
    ids = np.where(positive[:, :, None], ids.reshape(q_n, 2 * h, -1), -1).reshape(q_n, -1)
    ids = np.sort(ids, axis=1)
    dup = np.zeros_like(ids, dtype=bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    valid = (ids >= 0) & ~dup
    xc = x[np.maximum(ids, 0)].astype(np.float64)  # (Q, C, n)
    sc = (np.matmul(xc, a) * xc).sum(-1)
    sc = np.where(valid, sc, -np.inf)
    kk = min(k, ids.shape[1])
    order = np.lexsort((ids, -sc), axis=1)[:, :kk]
    top_s, top_i = np.take_along_axis(sc, order, 1), np.take_along_axis(ids, order, 1)
    top_i = np.where(np.isfinite(top_s), top_i, -1)
    return top_s.astype(np.float32), top_i, valid.sum(1)
