"""Retrieval routes for the match stage on a 10^4-item catalogue: each route's recall@20 against exact search."""

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.recsys.retrieval import (
    MipsIndex,
    eigen_candidates_topk,
    exact_topk,
    exact_topk_chunked,
    recall_vs_exact,
)
from aloe.recsys.symmetric import phi, z_from_sym

torch.set_num_threads(1)
ITEMS, N, K = 10_000, 8, 20


def _catalogue(seed=0):
    """Clustered items: 100 centres, each item a centre plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(100, N))
    e = centres[rng.integers(0, 100, ITEMS)] + 0.4 * rng.normal(size=(ITEMS, N))
    return (e / np.sqrt(N)).astype(np.float32)


def _matrices(kind, q=24, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(q):
        if kind == "two-interests":  # two dominant positive eigenvalues, a small indefinite rest
            u = rng.normal(size=(N, 2))
            b = rng.normal(size=(N, N))
            a = u @ np.diag([3.0, 2.0]) @ u.T + 0.05 * (b + b.T)
        else:
            b = rng.normal(size=(N, N))
            a = b + b.T
        out.append(a)
    return np.stack(out)


def _exact(mats, e):
    z = z_from_sym(torch.from_numpy(mats)).numpy().astype(np.float32)
    feats = phi(torch.from_numpy(e)).numpy()
    return z, feats, exact_topk(z, feats, K)


def test_chunked_exact_equals_exact():
    e = _catalogue()
    z, feats, (s_ex, i_ex) = _exact(_matrices("random"), e)
    s_ch, i_ch = exact_topk_chunked(z, feats, K, chunk=7)
    assert np.array_equal(i_ch, i_ex)
    np.testing.assert_allclose(s_ch, s_ex, rtol=1e-5, atol=1e-5)


def test_ivf_over_phi_recall_against_exact():
    e = _catalogue()
    z, feats, (_, i_ex) = _exact(_matrices("random"), e)
    ivf = MipsIndex(feats, "ivf", nlist=64, nprobe=64)
    assert recall_vs_exact(ivf.search(z, K)[1], i_ex) == 1.0  # every cell searched: exhaustive
    ivf.set_search_effort(16)
    mid = recall_vs_exact(ivf.search(z, K)[1], i_ex)
    ivf.set_search_effort(1)
    low = recall_vs_exact(ivf.search(z, K)[1], i_ex)
    assert 0.9 <= mid <= 1.0 and low <= mid
    with pytest.raises(AloeError, match="nlist"):
        MipsIndex(feats[:10], "ivf", nlist=64)


def test_eigenvector_candidates_recall_against_exact():
    e = _catalogue()
    flat = MipsIndex(e, "flat")
    # every eigenvector and every item: each item is a candidate, so the answer is exact
    mats = _matrices("random", q=4)
    _, _, (_, i_ex) = _exact(mats, e)
    _, ids, cand = eigen_candidates_topk(mats, e, K, flat, per_list=ITEMS, eigenvectors=N)
    assert recall_vs_exact(ids, i_ex) == 1.0 and (cand == ITEMS).all()
    # two dominant interests: both signs of the top two eigenvectors find the top-20 from a few hundred items
    mats = _matrices("two-interests")
    _, _, (_, i_ex) = _exact(mats, e)
    _, ids, cand = eigen_candidates_topk(mats, e, K, flat, per_list=100, eigenvectors=2)
    assert recall_vs_exact(ids, i_ex) >= 0.95 and (cand <= 400).all()
    # the same through an approximate (IVF) index over the item vectors
    ivf = MipsIndex(e, "ivf", nlist=32, nprobe=8)
    _, ids_ivf, _ = eigen_candidates_topk(mats, e, K, ivf, per_list=100, eigenvectors=2)
    assert recall_vs_exact(ids_ivf, i_ex) >= 0.9
    # one eigenvector is not enough for two interests
    _, ids_one, _ = eigen_candidates_topk(mats, e, K, flat, per_list=100, eigenvectors=1)
    assert recall_vs_exact(ids_one, i_ex) < recall_vs_exact(ids, i_ex)


def test_eigenvector_candidates_of_a_negative_definite_matrix_are_empty():
    e = _catalogue()
    b = np.random.default_rng(2).normal(size=(N, N))
    _, ids, cand = eigen_candidates_topk(-(b @ b.T)[None], e, K, MipsIndex(e, "flat"), per_list=50)
    assert (ids == -1).all() and cand.tolist() == [0]
