"""SDA: recurrence encoding, and a translator that reads from context what frequencies alone cannot."""

import numpy as np
import pytest

from aloe import AloeError
from aloe.attacks import sda, tfma
from aloe.attacks.scoring import score_ids

N = 40
FIXED = np.array([0])


def test_codes_are_competition_ranks_then_count_buckets():
    traffic = np.array([5] * 4 + [7] * 4 + [9] * 2 + [11] + [12] + [0] * 3)
    code = sda.frequency_codes(traffic, N, ranks=2, fixed=FIXED)
    assert code[5] == code[7] == 0                       # tied for the most frequent: one rank
    assert code[9] == 2 + 2 - 1                          # rank 2 is past `ranks`: the bucket of count 2
    assert code[11] == code[12] == 2                     # seen once
    assert code[0] == 2 + sda.RARE                       # fixed id, seen in clear
    assert code[3] == 2 + sda.RARE + 1                   # never seen: padding code
    many = np.concatenate([np.repeat(np.arange(20, 26), 40), np.repeat(np.arange(1, 20), 30)])
    assert sda.frequency_codes(many, N, 4, FIXED)[19] == 4 + sda.RARE - 1   # counts past RARE share the last bucket


def test_codes_do_not_depend_on_the_permutation():
    rng = np.random.default_rng(0)
    traffic = rng.zipf(1.5, 3000) % (N - 1) + 1
    tau = np.concatenate([[0], 1 + rng.permutation(N - 1)])
    plain = sda.frequency_codes(traffic, N, 8, FIXED)
    assert np.array_equal(sda.frequency_codes(tau[traffic], N, 8, FIXED)[tau], plain)


def test_windows_cover_every_position():
    for length in (1, 64, 65, 100, 200):
        covered = np.zeros(length, bool)
        for s in sda.windows(length):
            covered[s:s + sda.LENGTH] = True
        assert covered.all()


def _pairs(n_sent: int, rng: np.random.Generator) -> np.ndarray:
    """Sentences "a_i b_i <sep>" and, a few, "b_i <sep>" (sep = fixed id 0): the pairs have well separated
    frequencies, but a_i and b_i nearly the same one, so which of the two ranks first is sampling noise; only the
    position (after the separator, or after a_i) tells them apart."""
    K = 8
    w = 1.6 ** -np.arange(K)
    p = np.concatenate([w, 0.002 * w])
    s = rng.choice(2 * K, size=n_sent, p=p / p.sum())
    return np.concatenate([[1 + 2 * t, 2 + 2 * t, 0] if t < K else [2 + 2 * (t - K), 0] for t in s])


def test_sda_reads_from_context_what_frequency_ranks_cannot():
    rng = np.random.default_rng(3)
    corpus, stream = _pairs(3000, rng), _pairs(3000, rng)
    tau = np.concatenate([[0], 1 + rng.permutation(N - 1)])
    guess = sda.attack([tau[stream]], corpus, N, FIXED, ranks=32, steps=300, k=3, rng=np.random.default_rng(4),
                       dim=32, layers=1)
    seen = np.isin(guess.obf_ids, tau[stream])
    got = score_ids(guess, tau, [stream[:90]], FIXED)
    base = score_ids(tfma.attack(tau[stream], corpus, N, FIXED, k=3), tau, [stream[:90]], FIXED)
    # 16 of the 39 movable ids occur; rank matching reads the a_i and guesses among the b_i
    assert int(seen.sum()) == 16
    sda_hits, tfma_hits = round(got["token_recovery"] * 39), round(base["token_recovery"] * 39)
    assert sda_hits >= 15 and sda_hits >= tfma_hits + 4, (sda_hits, tfma_hits)
    assert got["prompt_token_recovery"] > 0.9
    assert (guess.candidates[~seen] == -1).all()          # ids never seen get no guess
    first = guess.candidates[seen, 0]
    assert len(np.unique(first)) == len(first)            # first choices are one-to-one


def test_sda_is_reproducible_with_the_attacker_seed_and_checks_input():
    rng = np.random.default_rng(5)
    corpus, stream = _pairs(300, rng), _pairs(300, rng)
    run = [sda.attack([stream], corpus, N, FIXED, ranks=8, steps=3, k=2, rng=np.random.default_rng(9), dim=16,
                      layers=1).candidates for _ in range(2)]
    assert np.array_equal(*run)
    with pytest.raises(AloeError, match="ranks >= 1"):
        sda.attack([stream], corpus, N, FIXED, ranks=0, steps=1)
    with pytest.raises(AloeError, match="some traffic"):
        sda.attack([np.zeros(0, np.int64)], corpus, N, FIXED, steps=1)
    with pytest.raises(AloeError, match="corpus of at least"):
        sda.attack([stream], corpus[:10], N, FIXED, steps=1)


def test_real_texts_split_the_lee_text_between_victim_and_server(smollm2_path):
    """The suite's real-text roles on SmolLM2's tokenizer: the victim's stream and the server's prior are consecutive,
    disjoint parts of the Lee background text, tokenized document by document; the scored prompts are the 8 chat
    prompts and 48 tokens of 8 Lee test documents."""
    from transformers import AutoTokenizer

    from aloe.assets.corpus import load_corpus
    from aloe.attacks.common import Budget
    from aloe.attacks.suite import corpus_texts, doc_tokens

    texts = corpus_texts(smollm2_path, Budget(tfma_tokens=300, ima_tokens=200))
    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    docs = load_corpus("lee")
    lee = doc_tokens(tok, docs, 600)
    assert len(lee) == 600 and np.array_equal(lee[:len(tok(docs[0])["input_ids"])], tok(docs[0])["input_ids"])
    assert np.array_equal(texts.stream, lee[:300]) and np.array_equal(texts.prior, lee[300:])
    assert len(texts.prompts) == 16 and all(len(p) == 48 for p in texts.prompts[8:])
    assert len(texts.public) == 200 and len(texts.prior_cross) == 300
