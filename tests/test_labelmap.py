import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.labelmap import decode
from aloe.labelmap.codes import hadamard_code, random_code
from aloe.labelmap.harness import Method, train
from aloe.labelmap.maps import (
    LabelMap,
    choose_moduli,
    crt,
    information_theoretic_map,
    mach_map,
    map_report,
    number_theoretic_map,
    pairwise_coprime,
)
from aloe.labelmap.model import IndependentHeadsNet, heads_loss
from aloe.labelmap.tasks import (
    CJK_FONT_PACKAGES,
    chars_task,
    gb2312_characters,
    missing_cjk_font_packages,
    pairs_task,
    synthetic_task,
    words_task,
)

ALOE = [sys.executable, "-m", "aloe.cli"]
torch.set_num_threads(1)


def _pair_separations(table: np.ndarray) -> np.ndarray:
    """Brute force: number of heads separating each unordered pair of labels."""
    n = table.shape[1]
    i, j = np.triu_indices(n, 1)
    return (table[:, i] != table[:, j]).sum(0)


# ------------------------------------------------------------------------------------------------------ maps
@pytest.mark.parametrize("n,units,order", [(300, 60, None), (300, 60, 2), (1000, 150, 3), (97, 40, None)])
def test_number_theoretic_separation_guarantee(n, units, order):
    lmap = number_theoretic_map(n, n_units=units, order=order)
    k = lmap.sizes
    r = lmap.info["order"]
    assert pairwise_coprime(k) and sum(k) <= units
    assert math.prod(sorted(k)[:r]) >= n
    seps = _pair_separations(lmap.table)
    assert seps.min() >= len(k) - r + 1 == lmap.info["guaranteed_separation"]
    rep = map_report(lmap)
    assert rep["min_separation"] == seps.min()
    assert rep["mean_separation"] == pytest.approx(seps.mean(), rel=1e-12)


def test_guarantee_is_tight_and_noncoprime_rejected():
    # 7 * 11 >= 60 so r = 2: some pair differing by a multiple of 7 collides on exactly one head of three
    lmap = number_theoretic_map(60, [7, 11, 13])
    assert lmap.info["order"] == 2 and _pair_separations(lmap.table).min() == 2
    with pytest.raises(AloeError, match="not pairwise coprime"):
        number_theoretic_map(60, [6, 9, 13])
    with pytest.raises(AloeError, match="too small"):
        choose_moduli(10_000, 150, order=2)


@pytest.mark.parametrize("weights", [None, "zipf"])
def test_information_theoretic_map_is_balanced_and_near_independent(weights):
    n, sizes = 3000, [13, 17, 19, 23, 29]
    w = None if weights is None else 1.0 / np.arange(1, n + 1)
    lmap = information_theoretic_map(n, sizes, weights=w, seed=3)
    for i, k in enumerate(sizes):
        counts = np.bincount(lmap.table[i], minlength=k)
        assert counts.min() == n // k and counts.max() == -(-n // k)  # floor/ceil balance
    assert len(np.unique(lmap.table[:3].T, axis=0)) == n  # 13*17*19 >= 3000: the first block identifies labels
    rng = np.random.default_rng(0)  # independent uniformly random balanced maps of the same sizes
    rand = LabelMap("random", sizes, np.stack([rng.permutation(n) % k for k in sizes]))
    rep, rep_rand = map_report(lmap, weights=w), map_report(rand, weights=w)
    if weights is None:
        assert min(rep["balance"]) > 0.999
        assert rep["mean_mutual_information"] < 0.5 * rep_rand["mean_mutual_information"]
    else:  # under a Zipf law: more even bucket masses and less dependence than random maps
        assert min(rep["balance"]) > min(rep_rand["balance"]) + 0.01
        assert rep["mean_mutual_information"] < rep_rand["mean_mutual_information"] - 0.05


def test_map_report_on_known_maps():
    k1, k2 = 6, 7
    y = np.arange(k1 * k2)
    product = LabelMap("product", [k1, k2], np.stack([y // k2, y % k2]))
    rep = map_report(product)
    assert rep["max_mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert rep["min_separation"] == 1 and rep["balance"] == pytest.approx([1.0, 1.0])
    twins = LabelMap("twins", [k2, k2, k1], np.stack([y % k2, y % k2, y // k2]))
    rep = map_report(twins)
    assert rep["mutual_information"][0][1] == pytest.approx(math.log(k2))
    assert rep["min_separation"] == 1


def test_mach_map_hashes():
    lmap = mach_map(5000, 32, 6, seed=1)
    assert lmap.sizes == [32] * 6 and lmap.table.min() >= 0 and lmap.table.max() < 32
    assert not np.array_equal(lmap.table[0], lmap.table[1])
    with pytest.raises(AloeError):
        mach_map(5000, 4, 2)


# -------------------------------------------------------------------------------------------------------- CRT
def test_crt_round_trip():
    moduli = [3, 4, 5, 7]
    y = np.arange(math.prod(moduli))
    assert np.array_equal(crt(np.stack([y % k for k in moduli], 1), moduli), y)
    big = [1000003, 1000033, 1000037, 999983]  # product ~1e24: exact Python-integer path
    rng = np.random.default_rng(0)
    vals = [int(v) for v in rng.integers(0, 2**62, size=20)]
    res = np.array([[v % k for k in big] for v in vals])
    assert list(crt(res, big)) == vals
    lmap = number_theoretic_map(10_000, n_units=400)
    assert np.array_equal(crt(lmap.table.T, lmap.sizes), np.arange(10_000))


def test_crt_decode_corrects_head_errors():
    lmap = number_theoretic_map(1000, [31, 33, 35, 37, 41, 43])  # r = 2, corrects 2 wrong heads
    assert lmap.info["order"] == 2 and lmap.info["correctable_head_errors"] == 2
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, size=64)
    logps = []
    wrong = np.array([rng.choice(6, size=2, replace=False) for _ in labels])
    for i, k in enumerate(lmap.sizes):
        z = rng.normal(size=(64, k))
        target = lmap.table[i, labels].copy()
        bad = (wrong == i).any(1)
        target[bad] = (target[bad] + rng.integers(1, k, size=bad.sum())) % k
        z[np.arange(64), target] += 10.0
        logps.append(torch.log_softmax(torch.tensor(z), 1))
    assert np.array_equal(decode.crt_decode(logps, lmap), labels)


# --------------------------------------------------------------------------------------------------- decoders
def _brute_scores(logps, table, mean=False):
    n = table.shape[1]
    b = logps[0].shape[0]
    out = np.zeros((b, n))
    for y in range(n):
        for i, lp in enumerate(logps):
            v = lp[:, table[i, y]].numpy().astype(np.float64)
            out[:, y] += np.exp(v) if mean else v
    return out / len(logps) if mean else out


@pytest.mark.parametrize("kind", ["nt", "it"])
def test_soft_decoders_match_brute_force(kind):
    n = 400
    lmap = number_theoretic_map(n, [7, 9, 11, 13]) if kind == "nt" else information_theoretic_map(n, [5, 8, 12, 9])
    g = torch.Generator().manual_seed(0)
    logps = [torch.log_softmax(torch.randn(6, k, generator=g, dtype=torch.float64), 1) for k in lmap.sizes]
    for mean, fn in [(False, decode.topk_sum_logprob), (True, decode.topk_mean_prob)]:
        full = _brute_scores(logps, lmap.table, mean)
        want = np.argsort(-full, 1)[:, :10]
        for chunk in (None, 37, 1):
            vals, idx = fn(logps, lmap, 10, chunk=chunk)
            assert np.array_equal(idx.numpy(), want)
            assert np.allclose(vals.numpy(), np.take_along_axis(full, want, 1))


def test_sum_logprob_exact_at_one_million_classes_in_bounded_chunks():
    n = 1_000_000
    lmap = number_theoretic_map(n, [997, 1009, 1013, 1019])
    g = torch.Generator().manual_seed(1)
    logps = [torch.log_softmax(torch.randn(3, k, generator=g), 1) for k in lmap.sizes]
    vals, idx = decode.topk_sum_logprob(logps, lmap, 5, chunk=50_000)
    table = torch.from_numpy(lmap.table)
    full = sum(lp.double()[:, table[i]] for i, lp in enumerate(logps))
    top = full.topk(5, 1)
    assert torch.equal(idx, top.indices)
    assert torch.allclose(vals.double(), top.values, atol=1e-5)


@pytest.mark.parametrize("hamming", [False, True])
def test_ecoc_decoding_matches_brute_force(hamming):
    code = torch.from_numpy(random_code(300, 16, seed=2)).double()
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if hamming:
        bits = (z > 0).double()
        full = (bits[:, None, :] == code[None]).double().sum(2)
    else:  # minus the BCE loss of each codeword
        full = -torch.nn.functional.binary_cross_entropy_with_logits(
            z[:, None, :].expand(-1, 300, -1), code[None].expand(5, -1, -1), reduction="none").sum(2)
    vals, idx = decode.topk_linear_code(z, code, 300, hamming=hamming, chunk=41)
    assert torch.allclose(vals, full.gather(1, idx))
    assert torch.allclose(vals, full.sort(1, descending=True).values)
    if not hamming:
        assert torch.equal(idx[:, :5], full.topk(5, 1).indices)


def test_ecoc_codes():
    full = hadamard_code(16, 15)  # all nonzero columns of H_16: every pair at distance 8
    d = (full[:, None, :] != full[None, :, :]).sum(2)
    assert (d[~np.eye(16, dtype=bool)] == 8).all()
    punct = hadamard_code(1000, 24, seed=1)
    assert punct.shape == (1000, 24) and len(np.unique(punct, axis=0)) == 1000
    rnd = random_code(2000, 12, seed=0)
    assert len(np.unique(rnd, axis=0)) == 2000
    with pytest.raises(AloeError, match="at least 11 bits"):
        random_code(2000, 10)


# ------------------------------------------------------------------------------------------ model and training
def test_heads_loss_is_sum_of_cross_entropies():
    sizes = [3, 5, 4]
    logits = torch.randn(7, 12)
    t = torch.stack([torch.randint(0, k, (7,)) for k in sizes], 1)
    want = sum(torch.nn.functional.cross_entropy(z, t[:, i]) for i, z in enumerate(logits.split(sizes, 1)))
    assert torch.allclose(heads_loss(logits, t, sizes), want)
    eq = torch.randn(7, 12)
    t2 = torch.randint(0, 4, (7, 3))
    want2 = sum(torch.nn.functional.cross_entropy(z, t2[:, i]) for i, z in enumerate(eq.split([4] * 3, 1)))
    assert torch.allclose(heads_loss(eq, t2, [4, 4, 4]), want2)


def test_independent_heads_have_their_own_trunks():
    net = IndependentHeadsNet(lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), 8, [3, 5])
    assert net(torch.randn(2, 4)).shape == (2, 8)
    assert net.trunks[0][0].weight.data_ptr() != net.trunks[1][0].weight.data_ptr()
    assert net.output_params() == 9 * 8


@pytest.fixture(scope="module")
def tiny_task():
    return synthetic_task(64, n_train=12_000, n_test=1000, q=4, keep=0.75, noise=1, vocab=1024, width=64, seed=0)


@pytest.mark.parametrize("method", ["lm-nt", "lm-it", "mach", "ecoc", "onehot"])
def test_training_beats_chance_by_a_wide_margin(tiny_task, method):
    res = train(tiny_task, method, 65 * 40, epochs=2, lr=1e-2, batch_size=128)
    assert res["output_params"] <= 65 * 40
    assert res["top1"] > 0.8, res  # chance is 1/64
    assert res["top5"] >= res["top1"]
    for key in ("top1", "top5", "output_params", "n_classes"):
        assert key in res


def test_independent_variant_trains(tiny_task):
    res = train(tiny_task, "lm-nt", 65 * 40, epochs=1, lr=1e-2, batch_size=128, independent=True,
                report_map=False)
    assert res["independent"] and res["top1"] > 0.5


def test_onehot_budget_gives_low_rank_softmax():
    m = Method("onehot", 1000, 64, budget=20 * (64 + 1000) + 1000)
    assert m.rank == 20
    with pytest.raises(AloeError, match="too small for one-hot"):
        Method("onehot", 1000, 64, budget=1500)
    with pytest.raises(AloeError, match="too small"):
        Method("lm-nt", 10_000, 128, budget=1000)
    with pytest.raises(AloeError, match="unknown method"):
        Method("softmax", 100, 8, budget=None)


# ------------------------------------------------------------------------------------------------------ tasks
def test_words_task_is_real_zipfian_next_word():
    task = words_task(2000, max_train=5000, max_test=500)
    assert task.n_classes == 2000 and task.n_train == 5000 and task.n_test == 500
    x, y = next(task.train_batches(5000, 0))
    assert x.shape == (5000, 3) and int(y.max()) < 2000 and int(x.max()) <= 2001
    counts = np.bincount(y.numpy(), minlength=2000)
    assert counts[:10].sum() > counts[1000:].sum()  # frequency-ranked labels: heavy head, long tail


def test_words_task_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("ALOE_DATA", str(tmp_path))
    with pytest.raises(AloeError, match="missing"):
        words_task(100, corpora=("kjv",))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "kjv_verses.tsv").write_text("a\tb\nx\ty\n")
    with pytest.raises(AloeError, match="malformed"):
        words_task(100, corpora=("kjv",))
    (tmp_path / "text" / "kjv_verses.tsv").write_text("book\tchapter\tverse\ttext\nGen\t1\t1\tin the beginning\n")
    with pytest.raises(AloeError, match="only 2 distinct"):
        words_task(100, corpora=("kjv",))


def _kjv_with(tmp_path, monkeypatch, toks: list[str]) -> None:
    """A data root whose KJV is one verse made of ``toks``."""
    monkeypatch.setenv("ALOE_DATA", str(tmp_path))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "kjv_verses.tsv").write_text("book\tchapter\tverse\ttext\nGen\t1\t1\t" + " ".join(toks)
                                                      + "\n")


def test_pairs_task_classes_are_the_most_frequent_next_pairs(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    toks = [str(w) for w in rng.choice(["a", "b", "c", "d", "e"], size=400, p=[0.4, 0.3, 0.15, 0.1, 0.05])]
    _kjv_with(tmp_path, monkeypatch, toks)
    task = pairs_task(6, corpora=("kjv",), input_vocab=3)
    train_toks = toks[:360]
    pairs = Counter(zip(train_toks, train_toks[1:]))
    top = sorted(pairs, key=lambda pq: (-pairs[pq], pq))[:6]  # ties in alphabetical order
    x, y = next(task.train_batches(10_000, 0))
    # every training position whose next pair is a class is one example, labelled by frequency rank
    assert task.n_train == sum(pairs[pq] for pq in top)
    counts = np.bincount(y.numpy(), minlength=6)
    assert counts.tolist() == sorted((pairs[pq] for pq in top), reverse=True)
    # the pair starting each training position, in order: the labels follow the text
    expected = [top.index(pq) for pq in zip(train_toks, train_toks[1:]) if pq in top]
    assert sorted(y.tolist()) == sorted(expected)
    # inputs: the 3 most frequent words (0..2), unk (3) and the start token (4); the first context is all start
    assert set(np.unique(x.numpy())) <= {0, 1, 2, 3, 4}
    xo, yo = next(task.test_batches(10_000))
    if (toks[360], toks[361]) in top:
        assert xo[0].tolist() == [4, 4, 4] and int(yo[0]) == top.index((toks[360], toks[361]))
    assert [int(v) for v in yo] == [top.index(pq) for pq in zip(toks[360:], toks[361:]) if pq in top]
    assert task.info["distinct_train_pairs"] == len(pairs) and task.info["input_vocabulary"] == 3
    with pytest.raises(AloeError, match="distinct training word pairs"):
        pairs_task(10_000, corpora=("kjv",))


def test_synthetic_task_is_deterministic_and_scales():
    a = synthetic_task(1_000_000, n_train=1000, n_test=100, seed=5)
    b = synthetic_task(1_000_000, n_train=1000, n_test=100, seed=5)
    xa, ya = next(a.test_batches(100))
    xb, yb = next(b.test_batches(100))
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and int(ya.max()) < 1_000_000


def test_missing_font_packages_are_named(tmp_path, monkeypatch):
    from aloe.labelmap import tasks

    real = dict(tasks.CJK_FONT_PACKAGE)
    present = tmp_path / "microhei.ttc"
    present.write_bytes(b"")
    fonts = (("/nonexistent/sans.ttc", 2), ("/nonexistent/serif.ttc", 2), (str(present), 0),
             ("/nonexistent/zenhei.ttc", 0), ("/nonexistent/other.ttf", 0))
    monkeypatch.setattr(tasks, "CJK_FONT_PACKAGE", {
        "/nonexistent/sans.ttc": "fonts-noto-cjk", "/nonexistent/serif.ttc": "fonts-noto-cjk",
        str(present): "fonts-wqy-microhei", "/nonexistent/zenhei.ttc": "fonts-wqy-zenhei"})
    assert missing_cjk_font_packages(fonts) == ["fonts-noto-cjk", "fonts-wqy-zenhei", "/nonexistent/other.ttf"]
    assert missing_cjk_font_packages(fonts[2:3]) == []
    # every default font file belongs to one of the packages the error messages and the Makefile name
    assert set(real) == {p for p, _ in tasks.CJK_FONTS}
    assert set(real.values()) == set(CJK_FONT_PACKAGES)
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert all(p in makefile for p in real) and all(k in makefile for k in CJK_FONT_PACKAGES)


def test_chars_task_without_fonts_says_what_to_install():
    with pytest.raises(AloeError, match="fonts-noto-cjk"):
        chars_task(10, fonts=(("/nonexistent/font.ttc", 0),))
    chars = gb2312_characters(3755)
    assert chars[0] == "\u554a" and chars[-1] == "\u5ea7" and len(set(chars)) == 3755


# -------------------------------------------------------------------------------------------------------- CLI
def _cli(*args, env=None):
    return subprocess.run([*ALOE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_train_json(tmp_path):
    out = tmp_path / "res.json"
    r = _cli("labelmap", "train", "--task", "synthetic", "--method", "lm-nt", "--classes", "200", "--budget", "8000",
             "--train-examples", "2000", "--test-examples", "200", "--threads", "1", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n_classes"] == 200 and res["output_params"] <= 8000 and 0 <= res["top1"] <= res["top5"] <= 1
    assert json.loads(out.read_text())["top1"] == res["top1"]


@pytest.mark.parametrize("args,msg", [
    (["--task", "images", "--method", "lm-nt"], "unknown task"),
    (["--task", "synthetic", "--method", "softmax"], "unknown method"),
    (["--task", "synthetic", "--method", "lm-nt", "--budget", "500"], "too small"),
    (["--task", "synthetic", "--method", "ecoc", "--budget", "abc"], "must be a number"),
])
def test_cli_bad_input_is_one_line(args, msg):
    r = _cli("labelmap", "train", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aloe: error:") and msg in lines[0]


def test_cli_missing_corpus(tmp_path):
    env = {**os.environ, "ALOE_DATA": str(tmp_path)}
    r = _cli("labelmap", "train", "--task", "words", "--method", "lm-nt", env=env)
    assert r.returncode == 2 and "missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_interrupt_leaves_no_result_file(tmp_path):
    out = tmp_path / "res.json"
    proc = subprocess.Popen([*ALOE, "labelmap", "train", "--task", "synthetic", "--method", "lm-nt",
                             "--train-examples", "50000000", "--threads", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a runner started in the background may ignore SIGINT, and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        seen = ""
        done = re.compile(r"\| *[1-9]\d*/\d+ \[")  # the progress bar shows at least one finished step
        while time.time() < deadline and not done.search(seen):
            seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        assert done.search(seen), seen[-500:]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)  # keep draining both pipes: a full pipe must not stall the child's exit
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert list(tmp_path.iterdir()) == []


def test_cli_map_report():
    r = _cli("labelmap", "map", "--classes", "5000", "--units", "300", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["min_separation"] >= rep["info"]["guaranteed_separation"] and rep["n_units"] <= 300


def test_pair_brute_force_helper():
    t = np.array([[0, 0, 1], [0, 1, 1]])
    assert list(_pair_separations(t)) == [1, 2, 1]
    assert list(itertools.combinations(range(3), 2)) == [(0, 1), (0, 2), (1, 2)]


def test_pairs_task_validation_split_is_cut_from_the_training_part(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    toks = [str(w) for w in rng.choice(["a", "b", "c", "d", "e"], size=400, p=[0.4, 0.3, 0.15, 0.1, 0.05])]
    _kjv_with(tmp_path, monkeypatch, toks)
    plain = pairs_task(6, corpora=("kjv",), input_vocab=3)
    tuning = pairs_task(6, corpora=("kjv",), input_vocab=3, validation=0.25)
    train_toks = toks[:360]  # the training part; the test part (toks[360:]) is never used by the tuning split
    pairs = Counter(zip(train_toks, train_toks[1:]))
    top = sorted(pairs, key=lambda pq: (-pairs[pq], pq))[:6]  # the classes stay those of the whole training part
    fit, val = train_toks[:270], train_toks[270:]
    _, y = next(tuning.train_batches(10_000, 0))
    assert sorted(y.tolist()) == sorted(top.index(pq) for pq in zip(fit, fit[1:]) if pq in top)
    _, yv = next(tuning.test_batches(10_000))
    assert [int(v) for v in yv] == [top.index(pq) for pq in zip(val, val[1:]) if pq in top]
    assert tuning.n_train + tuning.n_test <= plain.n_train and tuning.info["validation"] == 0.25
    with pytest.raises(AloeError, match="validation fraction"):
        pairs_task(6, corpora=("kjv",), validation=1.0)


def test_words_task_validation_split_is_cut_from_the_training_part(tmp_path, monkeypatch):
    toks = ["abcdefg"[i % 7] for i in range(200)]
    _kjv_with(tmp_path, monkeypatch, toks)
    plain = words_task(7, corpora=("kjv",))
    tuning = words_task(7, corpora=("kjv",), validation=0.5)
    # training part: the first 180 tokens (90%); the tuning split trains on 90 and validates on the next 90
    assert plain.n_train == 180 and (tuning.n_train, tuning.n_test) == (90, 90)
    xv, yv = next(tuning.test_batches(1000))
    vocab = sorted(set(toks), key=lambda w: (-toks[:180].count(w), w))
    assert [int(v) for v in yv] == [vocab.index(w) for w in toks[90:180]]
    assert xv[0].tolist() == [8, 8, 8]  # each part starts with the start token as context
    with pytest.raises(AloeError, match="validation fraction"):
        words_task(7, corpora=("kjv",), validation=-0.1)
