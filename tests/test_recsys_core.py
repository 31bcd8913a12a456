"""Symmetric parameterisation, feature map, models at equal budget, metrics, retrieval and interests."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aloe import AloeError
from aloe.recsys.interests import session_interests
from aloe.recsys.metrics import mrr_at, recall_at, target_ranks
from aloe.recsys.models import build_model, count_params
from aloe.recsys.retrieval import (
    MipsIndex,
    eigen_topk,
    exact_topk,
    pruning_bound,
    recall_vs_exact,
    same_topk,
)
from aloe.recsys.symmetric import augment, n_pairs, phi, sym_from_z, z_from_sym

torch.set_num_threads(1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_symmetric_round_trip(n, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, n_pairs(n), generator=g, dtype=torch.float64)
    a = sym_from_z(z, n)
    assert torch.equal(a, a.transpose(-1, -2))
    assert torch.equal(z_from_sym(a), z)
    b = torch.randn(n, n, generator=g, dtype=torch.float64)
    b = b + b.T
    assert torch.equal(sym_from_z(z_from_sym(b), n), b)


def test_sym_from_z_rejects_wrong_size():
    with pytest.raises(ValueError):
        sym_from_z(torch.zeros(10), 5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_feature_map_identity(n, seed):
    """e^T A e == <z, phi(e)> for every session and item: scoring is one matmul Z @ phi(E)^T."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, n_pairs(n), generator=g, dtype=torch.float64)
    e = torch.randn(7, n, generator=g, dtype=torch.float64)
    quad = torch.einsum("vi,bij,vj->bv", e, sym_from_z(z, n), e)
    torch.testing.assert_close(z @ phi(e).T, quad, rtol=1e-12, atol=1e-12)


def test_augmentation_contains_the_vector_model():
    g = torch.Generator().manual_seed(1)
    n = 5
    e = torch.randn(9, n, generator=g, dtype=torch.float64)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = a + a.T
    w = torch.randn(n, generator=g, dtype=torch.float64)
    c = 0.7
    big = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    big[:n, :n], big[:n, n], big[n, :n], big[n, n] = a, w, w, c
    ea = augment(e)
    lhs = torch.einsum("vi,ij,vj->v", ea, big, ea)
    torch.testing.assert_close(lhs, torch.einsum("vi,ij,vj->v", e, a, e) + 2 * e @ w + c)
    # A = 0, c = 0: the augmented matrix model is exactly the vector model with w' = 2w
    big[:n, :n], big[n, n] = 0, 0
    torch.testing.assert_close(torch.einsum("vi,ij,vj->v", ea, big, ea), 2 * e @ w)


@pytest.mark.parametrize("aug", [False, True])
def test_matrix_model_scores_are_quadratic_forms(aug):
    torch.manual_seed(0)
    model = build_model("matrix", 30, matrix_dim=6, hidden=12, embed_dim=8, augment=aug).double().eval()
    seqs = torch.tensor([[1, 2, 3], [4, 5, 30]])
    z = model.queries(seqs)
    x = model.item_vectors()
    assert x.shape == (30, 7 if aug else 6)
    direct = torch.einsum("vi,btij,vj->btv", x, model.session_matrix(z), x)
    torch.testing.assert_close(z @ model.item_features().T, direct)


def test_equal_parameter_budget():
    for n_items in (300, 3000):
        vec = build_model("vector", n_items, matrix_dim=16)
        mat = build_model("matrix", n_items, matrix_dim=16)
        assert abs(count_params(vec) - count_params(mat)) / count_params(mat) < 0.01
        assert vec.gru.weight_hh_l0.shape == mat.gru.weight_hh_l0.shape
        assert vec.embed.weight.shape == mat.embed.weight.shape


def test_unknown_model_is_an_error():
    with pytest.raises(AloeError, match="unknown model"):
        build_model("mlp", 10)


def test_metrics_hand_computed():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.2],   # target 2 (0.3): one item above -> rank 2
                           [0.9, 0.1, 0.1, 0.1],   # target 0: rank 1
                           [0.4, 0.4, 0.4, 0.0],   # target 1 ties with two others -> pessimistic rank 3
                           [0.5, 0.6, 0.7, 0.1]])  # target 3: rank 4
    ranks = target_ranks(scores, torch.tensor([2, 0, 1, 3])).numpy()
    assert ranks.tolist() == [2, 1, 3, 4]
    assert recall_at(ranks, 1) == 0.25
    assert recall_at(ranks, 3) == 0.75
    assert mrr_at(ranks, 3) == pytest.approx((1 / 2 + 1 + 1 / 3 + 0) / 4)
    assert mrr_at(ranks, 20) == pytest.approx((1 / 2 + 1 + 1 / 3 + 1 / 4) / 4)
    assert mrr_at(ranks, 1) == 0.25


def _items_and_queries(seed=0, v=3000, n=12, q=40):
    rng = np.random.default_rng(seed)
    e = (rng.normal(size=(v, n)) / np.sqrt(n)).astype(np.float32)
    z = rng.normal(size=(q, n_pairs(n))).astype(np.float32)
    return e, z


def test_faiss_index_over_phi_equals_exact_topk():
    e, z = _items_and_queries()
    feats = phi(torch.from_numpy(e)).numpy()
    s_exact, i_exact = exact_topk(z, feats, 20)
    s_idx, i_idx = MipsIndex(feats, "flat").search(z, 20)
    assert same_topk(i_idx, s_idx, i_exact, s_exact).all()
    assert np.array_equal(i_idx, i_exact)
    # the exact reference itself agrees with a float64 full sort
    full = np.argsort(-(z.astype(np.float64) @ feats.astype(np.float64).T), axis=1, kind="stable")[:, :20]
    assert np.array_equal(i_exact, full)


def test_hnsw_recall_is_measured():
    e, z = _items_and_queries(seed=3)
    feats = phi(torch.from_numpy(e)).numpy()
    _, i_exact = exact_topk(z, feats, 20)
    _, i_h = MipsIndex(feats, "hnsw").search(z, 20)
    r = recall_vs_exact(i_h, i_exact)
    assert 0.5 <= r <= 1.0
    assert recall_vs_exact(i_exact[:, ::-1], i_exact) == 1.0
    assert recall_vs_exact(np.zeros_like(i_exact) - 1, i_exact) == 0.0


@pytest.mark.parametrize("case", ["random", "low-rank", "negative-definite", "augmented"])
def test_eigenvector_route_equals_exact_topk(case):
    rng = np.random.default_rng(7)
    e, z = _items_and_queries(seed=5, v=2000, n=10, q=6)
    if case == "augmented":
        e = np.concatenate([e, np.ones((len(e), 1), np.float32)], 1)
    n = e.shape[1]
    index = MipsIndex(e, "flat")
    for j in range(len(z)):
        if case in ("random", "augmented"):
            a = rng.normal(size=(n, n))
            a = a + a.T
        elif case == "low-rank":
            u = rng.normal(size=(n, 2))
            a = u @ u.T - 0.05 * np.eye(n)
        else:
            u = rng.normal(size=(n, n))
            a = -(u @ u.T)
        res = eigen_topk(a, e, 20, index)
        z_a = z_from_sym(torch.from_numpy(a)).numpy()[None]
        _, i_exact = exact_topk(z_a, phi(torch.from_numpy(e.astype(np.float64))).numpy(), 20)
        assert np.array_equal(res.ids, i_exact[0]), (case, j)
        assert res.scores[-1] >= res.bound or res.candidates == len(e)
    if case == "low-rank":
        assert res.candidates < len(e) // 2  # the bound prunes most of the catalogue


def test_pruning_bound_hand_computed():
    lam, t = np.array([1.0, 3.0]), np.array([2.0, 1.0])
    assert pruning_bound(lam, t, r2=100.0) == pytest.approx(3 * 1 + 1 * 4)  # norm not binding: sum lam t^2
    assert pruning_bound(lam, t, r2=2.0) == pytest.approx(3 * 1 + 1 * 1)  # largest eigenvalue filled first
    assert pruning_bound(lam, t, r2=0.5) == pytest.approx(3 * 0.5)


def test_interests_recover_known_eigenvectors():
    # items along the axes; A = diag(3, 1, -2): interests are axis 0 then axis 1, never axis 2
    x = np.zeros((9, 3))
    for i in range(9):
        x[i, i % 3] = 1.0 + i / 10
    interests = session_interests(np.diag([3.0, 1.0, -2.0]), x, top=3, per_interest=3)
    assert len(interests) == 2
    assert interests[0].eigenvalue == pytest.approx(3.0) and interests[1].eigenvalue == pytest.approx(1.0)
    assert interests[0].items.tolist() == [6, 3, 0]
    assert interests[1].items.tolist() == [7, 4, 1]
    assert interests[0].share == pytest.approx(0.75)
    with pytest.raises(AloeError):
        session_interests(np.eye(4), x)
