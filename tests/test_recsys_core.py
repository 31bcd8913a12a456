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


def _cycle_data(v=20, n_train=200, n_test=30, length=6, seed=0):
    """Sequences that walk the items in a cycle (next = previous + 1 mod v): learnable from the last click alone."""
    from aloe.recsys.data import SessionData

    rng = np.random.default_rng(seed)

    def pack(n):
        seqs = [(rng.integers(v) + np.arange(length)) % v for _ in range(n)]
        return np.concatenate(seqs).astype(np.int64), np.arange(n + 1, dtype=np.int64) * length

    train, test = pack(n_train), pack(n_test)
    return SessionData("cycle", v, np.arange(v), *train, *test, np.ones(n_test, np.int64))


@pytest.mark.parametrize("loss", ["bpr-max", "top1-max"])
@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_sampled_losses_learn_a_cycle(kind, loss):
    from aloe.recsys.train import TrainConfig, evaluate, train_model

    data = _cycle_data()
    torch.manual_seed(0)
    model = build_model(kind, data.n_items, hidden=24, embed_dim=12, matrix_dim=6, dropout=0.0)
    fit = train_model(model, data, TrainConfig(epochs=8, batch_size=32, lr=1e-2, loss=loss, negatives=16))
    assert np.isfinite(fit["losses"]).all()
    assert fit["losses"][-1] < 0.7 * fit["losses"][0]
    ev = evaluate(model, data, k=1)
    assert ev["recall@1"] > 0.5  # chance is 1/20


def test_sampled_negatives_follow_popularity_to_the_alpha():
    from scipy import stats

    from aloe.recsys.train import batch_columns, negative_probs

    counts = np.array([1, 2, 5, 10, 20, 50, 100, 400])
    targets = torch.tensor([3, 3, 1])
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(200):
        cols, where = batch_columns(targets, negative_probs(counts, 0.5), 100, rng)
        assert cols[:2].tolist() == [1, 3] and where.tolist() == [1, 1, 0]  # distinct in-batch targets first
        drawn.append(cols[2:].numpy())
    freq = np.bincount(np.concatenate(drawn), minlength=len(counts))
    assert stats.chisquare(freq, freq.sum() * np.sqrt(counts) / np.sqrt(counts).sum()).pvalue > 1e-3
    assert stats.chisquare(freq, freq.sum() * counts / counts.sum()).pvalue < 1e-6  # not plain popularity
    assert np.allclose(negative_probs(counts, 0.0), 1 / len(counts))


def test_sampled_loss_hand_computed():
    from aloe.recsys.train import sampled_loss

    # target item 7 (column 0) scores 2; negatives 5 (score 0) and 9 (score 1); the sampled column that repeats item 7
    # is not a negative
    columns, targets, where = torch.tensor([7, 5, 9, 7]), torch.tensor([7]), torch.tensor([0])
    scores = torch.tensor([[2.0, 0.0, 1.0, 2.0]])
    s0, s1 = torch.softmax(torch.tensor([0.0, 1.0]), 0).tolist()
    sig = torch.sigmoid
    bpr = -torch.log(s0 * sig(torch.tensor(2.0)) + s1 * sig(torch.tensor(1.0))) + 0.5 * s1 * 1.0**2
    top1 = s0 * (sig(torch.tensor(-2.0)) + sig(torch.tensor(0.0))) + s1 * (sig(torch.tensor(-1.0)) + sig(
        torch.tensor(1.0)))
    torch.testing.assert_close(sampled_loss(scores, columns, targets, where, "bpr-max", 0.5), bpr)
    torch.testing.assert_close(sampled_loss(scores, columns, targets, where, "top1-max"), top1)
    # a row whose every column is its own target has no negative and is left out
    assert sampled_loss(scores, torch.tensor([7, 7, 7, 7]), targets, where, "bpr-max").item() == 0.0


def test_default_training_is_the_full_softmax():
    from aloe.recsys.train import TrainConfig, train_model

    data = _cycle_data(n_train=40)
    runs = []
    for cfg in (TrainConfig(epochs=1), TrainConfig(epochs=1, loss="ce", negatives=0)):
        torch.manual_seed(0)
        model = build_model("vector", data.n_items, hidden=8, embed_dim=4, matrix_dim=3)
        runs.append(train_model(model, data, cfg)["losses"])
    assert runs[0] == runs[1] and runs[0][0] == pytest.approx(np.log(data.n_items), rel=0.2)


@pytest.mark.parametrize("option, message", [
    (dict(loss="hinge"), "unknown loss 'hinge'; choose one of ce, bpr-max, top1-max"),
    (dict(loss="bpr-max", negatives=-1), "--negatives must be at least 0, got -1"),
    (dict(negatives=10), "--negatives applies to the sampled losses"),
    (dict(loss="top1-max", sample_alpha=1.5), "--sample-alpha must be in [0, 1], got 1.5"),
    (dict(loss="bpr-max", bpreg=float("nan")), "--bpreg must be at least 0, got nan"),
])
def test_bad_loss_options_are_one_line_errors(option, message):
    from aloe.recsys.train import TrainConfig, train_model

    model = build_model("vector", 20, hidden=8, embed_dim=4, matrix_dim=3)
    with pytest.raises(AloeError) as err:
        train_model(model, _cycle_data(n_train=4), TrainConfig(**option))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_bad_loss_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from aloe.cli import main

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path / "cache"))
    assert main(["recsys", "train", "--data", "diginetica", "--model", "vector", "--loss", "hinge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["aloe: error: unknown loss 'hinge'; choose one of ce, bpr-max, top1-max"]
    assert main(["recsys", "train", "--data", "diginetica", "--model", "matrix", "--loss", "bpr-max",
                 "--negatives", "-5"]) == 2
    assert capsys.readouterr().err.strip() == "aloe: error: --negatives must be at least 0, got -5"
    assert not (tmp_path / "cache").exists()


def _with_eigenvalues(lams, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(lams), len(lams))))
    return q @ np.diag(lams) @ q.T


def test_positive_eigen_counts_on_known_spectra():
    from aloe.recsys.metrics import positive_eigen_counts

    spectra = [[3.0, -1.0, -2.0, -0.5], [2.0, 1.0, -1.0, -4.0], [5.0, 4.0, 0.5, -1.0], [1.0, 1.0, 1.0, 1.0],
               [-1.0, -2.0, -3.0, -4.0], [9.0, 1e-6, -1e-6, -2.0], [0.0, 0.0, 0.0, 0.0]]
    mats = np.stack([_with_eigenvalues(lam, i) for i, lam in enumerate(spectra)])
    assert positive_eigen_counts(mats).tolist() == [1, 2, 3, 4, 0, 1, 0]  # 1e-6 of 9 is below the tolerance
    assert positive_eigen_counts(torch.from_numpy(mats), rtol=0.0)[5] == 2
    assert positive_eigen_counts(mats, rtol=0.2).tolist() == [1, 2, 2, 4, 0, 1, 0]  # 0.5 < 0.2 * 5
    with pytest.raises(AloeError, match="square"):
        positive_eigen_counts(np.zeros((3, 4)))


def test_metrics_by_bucket_hand_computed():
    from aloe.recsys.metrics import bucket_labels, metrics_by_bucket, positive_eigen_counts

    spectra = [[1, -1, -1], [2, -1, -1], [1, 1, -1], [1, 1, 1], [-1, -1, -1], [3, 2, -1]]
    counts = positive_eigen_counts(np.stack([_with_eigenvalues(np.array(lam, float), i)
                                             for i, lam in enumerate(spectra)]))
    assert counts.tolist() == [1, 1, 2, 3, 0, 2]
    matrix = np.array([1, 30, 2, 4, 25, 1])
    vector = np.array([2, 1, 21, 1, 1, 5])
    rows = metrics_by_bucket(counts, {"matrix": matrix, "vector": vector}, edges=(1, 2, 3), k=20)
    assert [r["bucket"] for r in rows] == ["0", "1", "2", "3+"] and [r["n"] for r in rows] == [1, 2, 2, 1]
    assert rows[1]["models"]["matrix"] == {"recall@20": 0.5, "mrr@20": 0.5}
    assert rows[1]["models"]["vector"] == {"recall@20": 1.0, "mrr@20": pytest.approx(0.75)}
    assert rows[2]["models"]["matrix"] == {"recall@20": 1.0, "mrr@20": pytest.approx(0.75)}
    assert rows[2]["models"]["vector"] == {"recall@20": 0.5, "mrr@20": pytest.approx(0.1)}
    assert rows[0]["models"]["matrix"]["recall@20"] == 0.0 and rows[3]["models"]["vector"]["mrr@20"] == 1.0
    assert bucket_labels((1, 2, 3, 4, 6, 8)) == ["0", "1", "2", "3", "4-5", "6-7", "8+"]
    empty = metrics_by_bucket(counts, {"matrix": matrix}, edges=(1, 5))
    assert empty[2]["n"] == 0 and np.isnan(empty[2]["models"]["matrix"]["recall@20"])
    with pytest.raises(AloeError, match="increasing integers from 1"):
        metrics_by_bucket(counts, {"matrix": matrix}, edges=(2, 2))
    with pytest.raises(AloeError, match="5 ranks for 6 prefixes"):
        metrics_by_bucket(counts, {"vector": vector[:5]})


def test_holdout_splits_the_training_sequences_only():
    data = _cycle_data(n_train=50, n_test=7)
    split = data.holdout(0.2, seed=3)
    fit, val = split.train_sequences(), split.test_sequences()
    assert len(val) == 10 and len(fit) == 40
    assert split.test_first.tolist() == [1] * 10  # held-out sequences are scored whole
    # together they are exactly the training sequences; the test split is not in them
    seen = sorted(tuple(s) for s in fit + val)
    assert seen == sorted(tuple(s) for s in data.train_sequences())
    assert data.holdout(0.2, seed=3).test_items.tolist() == split.test_items.tolist()  # deterministic
    assert len(data.holdout(0.5, max_sequences=4).test_sequences()) == 4
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(AloeError, match="fraction"):
            data.holdout(bad)


def test_tuning_picks_the_best_learning_rate_and_epoch_on_held_out_sessions():
    from aloe.recsys.train import tune

    data = _cycle_data(n_train=120)
    kw = dict(lrs=(1e-6, 3e-2), max_epochs=3, fraction=0.25, batch_size=16, hidden=16, embed_dim=8, matrix_dim=4,
              k=1, seed=7)
    result = tune("cycle", "vector", data=data, **kw)
    assert result["budget_epochs"] == 6 and result["validation"]["validation_sequences"] == 30
    curves = {float(lr): c for lr, c in result["curves"].items()}
    assert set(curves) == {1e-6, 3e-2} and all(len(c) == 3 for c in curves.values())
    best = result["best"]
    # the best point is the argmax of the curves; a learning rate of 1e-6 cannot learn the cycle
    assert best["recall@1"] == max(max(c) for c in curves.values()) and best["lr"] == 3e-2
    assert best["recall@1"] > 0.5 and max(curves[1e-6]) < 0.3
    assert best["epochs"] == 1 + curves[3e-2].index(best["recall@1"])
    # the test split plays no part: the same tuning with another test split gives the same curves
    other = _cycle_data(n_train=120, n_test=5, seed=0)
    other.test_items = (other.test_items + 1) % other.n_items
    assert tune("cycle", "vector", data=other, **kw)["curves"] == result["curves"]
    with pytest.raises(AloeError, match="popularity"):
        tune("cycle", "pop", data=data, **kw)
    with pytest.raises(AloeError, match="positive"):
        tune("cycle", "vector", data=data, **{**kw, "lrs": (0.0,)})
