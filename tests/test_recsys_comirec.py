"""ComiRec-SA baseline: causal interests, max-over-interests scores, equal budget, training, evaluation, retrieval."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.recsys.models import (
    ComiRecModel,
    ModelConfig,
    build_model,
    causal_attention,
    comirec_params_beyond_trunk,
    count_params,
    model_from_config,
)
from aloe.recsys.retrieval import MipsIndex, exact_topk, exact_topk_chunked, merge_interest_lists, same_topk

torch.set_num_threads(1)


def _tiny(n_items=30, interests=3, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return build_model("comirec", n_items, hidden=12, embed_dim=8, matrix_dim=4, interests=interests,
                       dropout=dropout).double().eval()


def _sharpen(model, factor=20.0):
    """Sharper attention than at initialisation (where it is near uniform), so that the K interests differ."""
    with torch.no_grad():
        model.w2.weight.mul_(factor)
    return model


def _data(v=20, n_train=200, n_test=30, length=6, seed=0, firsts=None):
    """Sequences that walk the items in a cycle (next = previous + 1 mod v), test sequences of varied length."""
    from aloe.recsys.data import SessionData

    rng = np.random.default_rng(seed)

    def pack(n, lengths):
        seqs = [(rng.integers(v) + np.arange(n_len)) % v for n_len in lengths]
        return np.concatenate(seqs).astype(np.int64), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    test_lengths = rng.integers(2, 9, n_test)
    first = np.ones(n_test, np.int64) if firsts is None else np.minimum(firsts, test_lengths - 1)
    return SessionData("cycle", v, np.arange(v), *pack(n_train, [length] * n_train), *pack(n_test, test_lengths),
                       first)


def test_interests_are_causal():
    model = _tiny()
    a = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    b = torch.tensor([[1, 2, 3, 9, 11, 0, 17]])  # the same first three items
    with torch.no_grad():
        qa, qb = model.queries(a), model.queries(b)
        feats = model.item_features()
        sa, sb = model.scores(qa[0], feats), model.scores(qb[0], feats)
    assert qa.shape == (1, 7, 3, model.config.out_dim)
    assert torch.equal(qa[0, :3], qb[0, :3]) and torch.equal(sa[:3], sb[:3])
    assert (sa[3:] - sb[3:]).abs().amax(1).min() > 1e-3  # later positions do see their own items
    # padding after the items, alone or beside a longer sequence, leaves the scores of the real positions alone
    pad = model.config.n_items
    short = torch.tensor([[1, 2, 3]])
    padded = torch.tensor([[1, 2, 3, pad, pad, pad, pad], [4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        qs, qp = model.queries(short), model.queries(padded)
    torch.testing.assert_close(qp[0, :3], qs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.scores(qp[0, :3], feats), model.scores(qs[0], feats), rtol=1e-12, atol=1e-12)


def test_causal_attention_in_blocks_equals_one_block():
    g = torch.Generator().manual_seed(0)
    logits, values = torch.randn(3, 11, 4, generator=g), torch.randn(3, 11, 5, generator=g)
    whole = causal_attention(logits, values)
    for budget in (1, 7, 3 * 4 * 11 * 5):
        torch.testing.assert_close(causal_attention(logits, values, max_elements=budget), whole)
    # position 0 attends only to itself; the last position is a softmax over all of them
    torch.testing.assert_close(whole[:, 0], values[:, :1].expand(3, 4, 5))
    w = torch.softmax(logits, dim=1)
    torch.testing.assert_close(whole[:, -1], torch.einsum("bsk,bsn->bkn", w, values))


def test_interests_and_scores_match_a_direct_computation():
    model = _sharpen(_tiny(interests=4))
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        q = model.queries(seq)[0]  # (T, K, n)
        h = model.states(seq)[0]  # (T, hidden)
        w1, w2 = model.w1.weight, model.w2.weight
        wp, bp = model.proj.weight, model.proj.bias
        for t in range(seq.shape[1]):
            a = torch.softmax(w2 @ torch.tanh(w1 @ h[:t + 1].T), dim=1)  # (K, t+1), softmax over positions
            torch.testing.assert_close(q[t], a @ h[:t + 1] @ wp.T + bp, rtol=1e-10, atol=1e-12)
        e = model.item_features().detach()
        got = model.scores(q, e)
    brute = np.array([[max(float(np.dot(q[t, k].numpy(), e[v].numpy())) for k in range(4)) for v in range(len(e))]
                      for t in range(len(q))])
    np.testing.assert_allclose(got.numpy(), brute, rtol=1e-12, atol=1e-12)
    # the best interest differs between items: the maximum is not one fixed interest's score
    each = torch.stack([q[:, k] @ e.T for k in range(4)])  # (K, T, V)
    assert len(torch.unique(each.argmax(0))) > 1
    gap = (each.amax(0) - each[0]).amax(1)  # per position: how far the maximum rises above interest 0's score
    assert gap[0] == 0 and (gap[1:] > 0.01).all()  # position 0 has one item to attend to: all interests coincide
    # the gradient path (stacked products) gives the very same scores
    qg = q.clone().requires_grad_(True)
    assert torch.equal(model.scores(qg, e), got)
    with pytest.raises(AloeError, match=r"ComiRec queries must be \(rows, 4, n\)"):
        model.scores(q[:, 0], e)


@pytest.mark.parametrize("n_items", [300, 3000, 20_000])
def test_parameter_budget_matches_the_matrix_model(n_items):
    mat = build_model("matrix", n_items, matrix_dim=16)
    com = build_model("comirec", n_items, matrix_dim=16)
    assert isinstance(com, ComiRecModel) and com.interests == 4
    assert abs(count_params(com) - count_params(mat)) / count_params(mat) < 0.01
    assert com.gru.weight_hh_l0.shape == mat.gru.weight_hh_l0.shape
    assert com.embed.weight.shape == mat.embed.weight.shape
    n = com.config.out_dim
    assert com.config.attn_dim == 4 * n and com.w1.weight.shape == (4 * n, 100) and com.w2.weight.shape == (4, 4 * n)
    trunk = count_params(mat) - (101 * 136 + n_items * 16)
    assert count_params(com) == trunk + comirec_params_beyond_trunk(n, 100, n_items, 4)
    # no other candidate size comes closer to the matrix model's count
    off = [abs(trunk + comirec_params_beyond_trunk(m, 100, n_items, 4) - count_params(mat)) for m in (n - 1, n, n + 1)]
    assert off[1] <= min(off[0], off[2])


def test_more_interests_or_a_fixed_attention_size_keep_the_budget():
    mat = count_params(build_model("matrix", 500, matrix_dim=16))
    for kw in (dict(interests=1), dict(interests=16), dict(attn_dim=8)):
        com = build_model("comirec", 500, matrix_dim=16, **kw)
        assert abs(count_params(com) - mat) / mat < 0.01, kw
    assert build_model("comirec", 500, matrix_dim=16, attn_dim=8).w1.weight.shape[0] == 8
    assert build_model("comirec", 500, interests=16).w2.weight.shape[0] == 16


@pytest.mark.parametrize("loss, loss_ratio, recall", [("ce", 0.3, 0.8), ("bpr-max", 0.85, 0.4),
                                                    ("top1-max", 0.9, 0.4)])
def test_training_learns_a_cycle(loss, loss_ratio, recall):
    """The full softmax over max-scores learns the cycle; the sampled losses train through the same scores (more
    slowly here: their score penalty meets the maximum of K products)."""
    from aloe.recsys.train import TrainConfig, evaluate, train_model

    data = _data()
    torch.manual_seed(0)
    model = build_model("comirec", data.n_items, hidden=24, embed_dim=12, matrix_dim=6, dropout=0.0, interests=3)
    before = evaluate(model, data, k=1)["recall@1"]
    fit = train_model(model, data, TrainConfig(epochs=10, batch_size=32, lr=2e-2, loss=loss,
                                               negatives=0 if loss == "ce" else 16))
    assert np.isfinite(fit["losses"]).all()
    assert fit["losses"][-1] < loss_ratio * fit["losses"][0]
    after = evaluate(model, data, k=1)["recall@1"]
    assert after > recall and after > before + 0.3  # chance is 1/20


def test_evaluation_ranks_equal_a_brute_force_computation():
    from aloe.recsys.metrics import mrr_at, recall_at
    from aloe.recsys.train import evaluate

    data = _data(v=25, n_train=4, n_test=12, seed=3, firsts=np.array([1, 3, 2, 1, 4, 1, 2, 1, 5, 1, 1, 3]))
    model = build_model("comirec", data.n_items, hidden=10, embed_dim=6, matrix_dim=4, interests=3).double().eval()
    _sharpen(model)
    ev = evaluate(model, data, k=5, chunk=7)
    ranks, first_only = [], []
    e = model.item_features().detach().numpy()
    with torch.no_grad():
        for prefix, target in data.prefix_examples("test"):
            u = model.queries(torch.from_numpy(prefix)[None])[0, -1].numpy()  # (K, n), the prefix alone
            scores = np.array([max(u[k] @ e[v] for k in range(len(u))) for v in range(len(e))])
            ranks.append(int((scores >= scores[target]).sum()))
            first_only.append(int((e @ u[0] >= e[target] @ u[0]).sum()))
    assert len(ranks) == ev["n_test"] == data.n_examples("test") > 12
    assert ev["ranks"].tolist() == ranks
    assert first_only != ranks  # the interests differ enough for the maximum to matter
    assert ev["recall@5"] == recall_at(np.array(ranks), 5) and ev["mrr@5"] == mrr_at(np.array(ranks), 5)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_interest_counts_are_one_line_errors(bad):
    for make in (lambda: build_model("comirec", 10, interests=bad),
                 lambda: ComiRecModel(ModelConfig("comirec", 10, interests=bad))):
        with pytest.raises(AloeError) as err:
            make()
        assert str(err.value) == f"--interests must be at least 1, got {bad}"
    model = build_model("comirec", 10, interests=np.int64(2))  # a numpy integer is an integer
    assert model.interests == 2 and json.dumps(model.config.as_dict())


def test_cli_bad_interests_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from aloe.cli import main

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exc:       # refused by the parser
        main(["recsys", "train", "--data", "diginetica", "--model", "comirec", "--interests", "0"])
    assert exc.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == \
        "aloe recsys train: error: argument --interests: 0 is not positive"
    assert main(["recsys", "train", "--data", "diginetica", "--model", "vector", "--interests", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["aloe: error: --interests applies to the comirec model"]
    assert not (tmp_path / "cache").exists()


def test_config_round_trip_and_model_folder():
    from aloe.recsys.train import model_dir

    model = _tiny(interests=2)
    cfg = json.loads(json.dumps(model.config.as_dict()))
    assert cfg["kind"] == "comirec" and cfg["interests"] == 2 and cfg["attn_dim"] == 4 * cfg["out_dim"]
    again = model_from_config(ModelConfig(**cfg)).double().eval()
    again.load_state_dict(model.state_dict())
    seq = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again.queries(seq), model.queries(seq))
    assert "interests" not in build_model("vector", 10).config.as_dict()  # the other configs are as before
    assert model_dir(Path("/c"), "ml100k", "comirec", False, 1, interests=2).name == "ml100k-comirec-k2-seed1"
    assert model_dir(Path("/c"), "ml100k", "vector", False, 1).name == "ml100k-vector-seed1"


def _multi_interest_case(seed=0, v=2000, k=4, n=8, q=10):
    rng = np.random.default_rng(seed)
    e = (rng.normal(size=(v, n)) / np.sqrt(n)).astype(np.float32)
    u = rng.normal(size=(q, k, n)).astype(np.float32)
    return u, e


def test_exact_topk_of_multi_interest_queries_is_the_max_over_interests():
    u, e = _multi_interest_case()
    s, ids = exact_topk(u, e, 20)
    full = (u.astype(np.float64) @ e.astype(np.float64).T).max(1)  # (Q, V)
    ref = np.argsort(-full, axis=1, kind="stable")[:, :20]
    assert np.array_equal(ids, ref)
    np.testing.assert_allclose(s, np.take_along_axis(full, ref, 1), rtol=1e-5)
    assert not np.array_equal(ids, exact_topk(u[:, 0], e, 20)[1])  # not the first interest alone
    s_ch, i_ch = exact_topk_chunked(u, e, 20, chunk=3)
    assert np.array_equal(i_ch, ids)
    np.testing.assert_allclose(s_ch, s, rtol=1e-6)
    # one interest is the ordinary inner-product search
    assert np.array_equal(exact_topk(u[:, :1], e, 20)[1], exact_topk(u[:, 0], e, 20)[1])


def test_index_search_per_interest_equals_exact():
    u, e = _multi_interest_case(seed=1)
    s_ex, i_ex = exact_topk(u, e, 20)
    s_f, i_f = MipsIndex(e, "flat").search(u, 20)
    assert s_f.shape == (len(u), 20) and same_topk(i_f, s_f, i_ex, s_ex).all()
    with pytest.raises(AloeError, match="queries of dimension 5 for an index of dimension 8"):
        MipsIndex(e, "flat").search(u[..., :5], 20)
    with pytest.raises(AloeError, match="queries must be"):
        exact_topk(u[None], e, 20)


def test_merge_interest_lists_hand_computed():
    # one query, two interests: item 1 is in both lists (best 0.3, from the second), items 2 and 7 tie at 0.5 (the
    # lower id first); -1 is faiss's empty place
    scores = np.array([[[0.9, 0.5, 0.1], [0.5, 0.3, -1e30]]], np.float32)
    ids = np.array([[[4, 7, 1], [2, 1, -1]]])
    s, i = merge_interest_lists(scores, ids, 3)
    assert i.tolist() == [[4, 2, 7]] and s[0].tolist() == pytest.approx([0.9, 0.5, 0.5])
    s, i = merge_interest_lists(scores, ids, 6)
    assert i.tolist() == [[4, 2, 7, 1, -1, -1]] and s[0, 3] == pytest.approx(0.3) and np.isinf(s[0, -2:]).all()
