"""Language-prior decoding: the public model's view of the text picks among a per-token attack's candidates."""

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.attacks.decoding import (
    CausalLM,
    Doc,
    LogitsScorer,
    decode,
    decode_beam,
    decode_em,
    decode_sequential,
    occurrence_logprobs,
    pair_logprobs,
    refine_distinct,
    text_logprob,
    traffic_docs,
)

V = 40


def bigram_lm(succ: np.ndarray, strength: float = 6.0):
    """A language model that predicts ``succ[x]`` after ``x`` (and is flat otherwise)."""
    table = torch.zeros(V, V)
    table[torch.arange(V), torch.as_tensor(succ)] = strength

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    return LogitsScorer(logits)


def cycle_text(rng, length: int) -> np.ndarray:
    succ = rng.permutation(V)
    x = [int(rng.integers(V))]
    for _ in range(length - 1):
        x.append(int(succ[x[-1]]) if rng.random() < 0.9 else int(rng.integers(V)))
    return succ, np.array(x)


def candidates_with_decoys(rng, wrong_first: np.ndarray, k: int = 4) -> np.ndarray:
    """Cluster c is token c; its candidates hold c, first or behind a decoy."""
    cand = np.empty((V, k), dtype=np.int64)
    for c in range(V):
        others = rng.choice(np.setdiff1d(np.arange(V), [c]), size=k - 1, replace=False)
        cand[c] = np.concatenate([others[:1], [c], others[1:]]) if wrong_first[c] else np.concatenate([[c], others])
    return cand


def decoy_cipher(seed: int, wrong: float = 0.6):
    """A 600-token text of the cycle language, each token's candidates with a decoy first for the ``wrong`` share of
    the tokens, cut in docs of 100."""
    rng = np.random.default_rng(seed)
    succ, text = cycle_text(rng, 600)
    cand = candidates_with_decoys(rng, rng.random(V) < wrong)
    return succ, text, cand, [Doc.unknown(np.arange(i, min(i + 100, len(text)))) for i in range(0, len(text), 100)]


def chasing_pair():
    """Clusters 0 and 1 alternate (X Y X Y ...) in a doc of 20, starting from (0, 3): the pairs (0, 2) and (1, 3)
    read well, (0, 3) and (1, 2) do not; clusters 4..39 are tokens 4..39 in a cycle (a doc of 72), ranked right."""
    succ = np.arange(V)
    succ[[0, 2, 1, 3]] = [2, 0, 3, 1]
    succ[4:] = 4 + (np.arange(36) + 1) % 36
    cand = np.array([[0, 1], [3, 2], [2, 3], [3, 2]] + [[c, 4 + (c + 3) % 36] for c in range(4, V)])
    labels = np.concatenate([np.arange(20) % 2, 4 + np.arange(72) % 36])
    return succ, cand, labels, [Doc.unknown(np.arange(20)), Doc.unknown(np.arange(20, 92))]


def test_the_language_prior_corrects_candidates_the_per_token_attack_ranked_wrong():
    rng = np.random.default_rng(0)
    succ, text = cycle_text(rng, 600)
    wrong = rng.random(V) < 0.4
    cand = candidates_with_decoys(rng, wrong)
    docs = [Doc.unknown(np.arange(i, min(i + 100, len(text)))) for i in range(0, len(text), 100)]
    before = (cand[text, 0] == text).mean()
    out = decode(bigram_lm(succ), docs, text, cand, sweeps=5)
    after = (out["candidates"][text, 0] == text).mean()
    assert before < 0.7 and after > 0.97 and out["sweeps"] <= 5
    assert out["candidates"].shape == cand.shape
    # every row keeps its candidates, reordered
    assert all(set(a) == set(b) for a, b in zip(out["candidates"], cand))
    # EM learned that rank 1 is often right
    assert out["rank_prior"][1] > 0.2


def test_a_flat_language_model_keeps_the_per_token_ranking():
    rng = np.random.default_rng(1)
    _, text = cycle_text(rng, 200)
    cand = candidates_with_decoys(rng, rng.random(V) < 0.5)
    out = decode(LogitsScorer(lambda ids: torch.zeros(*ids.shape, V)), [Doc.unknown(np.arange(len(text)))], text, cand)
    assert np.array_equal(out["candidates"], cand) and out["moved"] == [0.0]


def test_distinct_decoding_gives_two_clusters_two_tokens():
    # two clusters that both rank token 5 first; the language model makes 5 likely after 0 everywhere
    succ = np.arange(V)
    succ[0] = 5
    cand = np.array([[5, 7], [5, 9], [0, 1]])
    labels = np.array([2, 0, 2, 1, 2, 0])  # 0 x 0 y 0 x
    docs = [Doc.unknown(np.arange(6))]
    loose = decode(bigram_lm(succ), docs, labels, cand)["candidates"][:, 0]
    strict = decode(bigram_lm(succ), docs, labels, cand, distinct=True)["candidates"][:, 0]
    assert loose[0] == loose[1] == 5
    assert strict[0] == 5 and strict[1] == 9  # cluster 0 occurs twice after 0: the stronger claim on 5


def test_both_sides_of_an_occurrence_vote_on_it():
    succ = (np.arange(V) + 1) % V
    text = np.arange(30) % V
    cand = np.stack([np.arange(V), (np.arange(V) + 3) % V], 1)
    doc = [Doc.unknown(np.arange(30))]
    lp = occurrence_logprobs(bigram_lm(succ), doc, text, cand[text], context=3, right=0)
    assert (lp[0] == 0).all()                     # the first position has nothing on its left
    assert (lp[1:, 0] > lp[1:, 1] + 5).all()
    both = occurrence_logprobs(bigram_lm(succ), doc, text, cand[text], context=3, right=2)
    assert both[0, 0] > both[0, 1] + 5            # ... but the tokens after it vote
    assert (both[1:-1, 0] - both[1:-1, 1] > lp[1:-1, 0] - lp[1:-1, 1] + 5).all()


def test_traffic_docs_cut_at_unranked_ids_and_keep_visible_ones():
    rows = {10: 0, 11: 1, 12: 2}
    docs, labels = traffic_docs([np.array([1, 10, 11, 99, 12, 10, 1, 12]), np.array([12, 99])], rows,
                                visible=np.array([1]))
    assert [list(d.known) for d in docs] == [[1, -1, -1], [-1, -1, 1, -1]]
    assert [list(d.occurrence) for d in docs] == [[-1, 0, 1], [2, 3, -1, 4]]
    assert list(labels) == [0, 1, 2, 0, 2]


def test_decode_rejects_occurrences_outside_the_docs_or_without_candidates():
    cand = np.array([[1, 2], [-1, -1]])
    lm = bigram_lm(np.arange(V))
    with pytest.raises(AloeError, match="in no doc"):
        decode(lm, [Doc.unknown(np.array([0]))], np.array([0, 0]), cand)
    with pytest.raises(AloeError, match="at least one candidate"):
        decode(lm, [Doc.unknown(np.array([0, 1]))], np.array([0, 1]), cand)


def test_the_model_scorer_shares_the_left_context_and_matches_a_full_recompute(tmp_path):
    from obfuscation_helpers import tiny_model

    d = tiny_model("llama-gqa-tied", tmp_path / "plain")
    lm = CausalLM(d)
    full = LogitsScorer(lambda ids: lm.model(input_ids=ids).logits)
    g = torch.Generator().manual_seed(0)
    for nl in (0, 1, 7):
        left, cont = torch.randint(0, 97, (3, nl), generator=g), torch.randint(0, 97, (3, 4, 3), generator=g)
        assert torch.allclose(lm(left, cont), full(left, cont), atol=1e-4)


def test_linked_occurrences_are_decoded_per_doc_and_keep_their_cluster_candidates(tmp_path):
    from aloe.attacks.decoding import decode_linked
    from obfuscation_helpers import tiny_model

    d = tiny_model("llama-gqa-tied", tmp_path / "plain")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=20)
    cand = np.stack([rng.choice(97, size=4, replace=False) for _ in range(8)])  # clusters 6, 7 never occur
    out = decode_linked(d, [5, 0, 15], labels, cand)
    assert out["candidates"].shape == (20, 4) and out["decoded_clusters"] == len(np.unique(labels))
    for row, c in zip(out["candidates"], labels):
        assert sorted(row) == sorted(cand[c])
    with pytest.raises(AloeError, match="add up"):
        decode_linked(d, [5, 5], labels, cand)


def test_text_logprob_is_the_sum_of_each_docs_next_token_logprobs():
    rng = np.random.default_rng(3)
    succ, text = cycle_text(rng, 30)
    lm = bigram_lm(succ)
    docs = [Doc.unknown(np.arange(0, 12)), Doc(np.array([5, -1, 7]), np.array([-1, 12, -1])),
            Doc.unknown(np.arange(13, 25)), Doc.unknown(np.arange(25, 26))]   # the last: one position, nothing to score
    decoded = text[:26]
    got = text_logprob(lm, docs, decoded, tokens_per_batch=12)
    lp = torch.log_softmax(lm.logits(torch.arange(V)).float(), -1).double().numpy()  # row x: log p(. | x)

    def direct(seq):
        return sum(lp[a, b] for a, b in zip(seq[:-1], seq[1:]))
    want = direct(decoded[:12]) + direct([5, decoded[12], 7]) + direct(decoded[13:25])
    assert got == pytest.approx(want, rel=1e-6)


def test_monotone_decoding_never_lowers_its_objective_and_still_corrects_the_ranking():
    succ, text, cand, docs = decoy_cipher(4)
    out = decode(bigram_lm(succ), docs, text, cand, sweeps=6, monotone=True)
    obj = out["objective"]
    assert len(obj) == out["sweeps"] >= 2
    # a sweep that moved raised the objective; one that moved nothing left it and ended the search
    assert all((b > a) if m > 0 else (b == a) for a, b, m in zip(obj, obj[1:], out["moved"][1:]))
    assert out["moved"][0] > 0 and obj[-1] > obj[0]
    assert (out["candidates"][text, 0] == text).mean() > 0.97 > 0.4 > (cand[text, 0] == text).mean()
    loose = decode(bigram_lm(succ), docs, text, cand, sweeps=6)
    assert len(loose["objective"]) == loose["sweeps"]       # the plain search reports its objective too
    # here the plain search settles some clusters on choices scored in stale contexts; the monotone one does not
    assert obj[-1] > loose["objective"][-1] + 100
    assert (out["candidates"][text, 0] == text).mean() > (loose["candidates"][text, 0] == text).mean()


def test_monotone_decoding_stops_neighbours_chasing_each_other():
    # clusters 0 and 1 alternate (X Y X Y ...): the pairs (0, 2) and (1, 3) read well, (0, 3) and (1, 2) do not.
    # From (0, 3) each cluster's best move given the other is to switch, so moving both at once lands on (1, 2),
    # which the plain search (its margins measured against the contexts before the move) takes as settled; the
    # monotone one keeps only the move that raises the text's log-probability and settles on a pair that reads
    # well. The other clusters (tokens 4..39 in a cycle, ranked right) teach EM that the first rank is usually right.
    succ, cand, labels, docs = chasing_pair()
    lm = bigram_lm(succ)
    plain = decode(lm, docs, labels, cand, sweeps=4, step=1.0)
    assert plain["moved"][0] > 0 and tuple(plain["candidates"][:2, 0]) == (1, 2)   # both moved: a bad pair
    mono = decode(lm, docs, labels, cand, sweeps=4, step=1.0, monotone=True)
    assert tuple(mono["candidates"][:2, 0]) in {(0, 2), (1, 3)}
    assert (mono["candidates"][4:, 0] == np.arange(4, V)).all()
    assert mono["objective"][-1] > plain["objective"][-1] + 20


def test_the_budget_flags_carry_the_decoders_sweeps_and_acceptance_rule():
    import argparse

    from aloe.attacks.commands import add_budget_flags, budget_from_args

    ap = argparse.ArgumentParser()
    add_budget_flags(ap)
    default = budget_from_args(ap.parse_args([]))
    assert default.decode_sweeps == 8 and default.decode_monotone is False
    assert default.decode_em == 0 and default.decode_sequential is False and default.decode_temperature == 1.0
    b = budget_from_args(ap.parse_args(["--decode-sweeps", "3", "--decode-monotone", "--decode-em", "7",
                                        "--decode-sequential", "--decode-temperature", "0.5"]))
    assert b.decode_sweeps == 3 and b.decode_monotone is True and b.decode_em == 7
    assert b.decode_sequential is True and b.decode_temperature == 0.5
    assert default.decode_swaps == 0 and budget_from_args(ap.parse_args(["--decode-swaps", "2"])).decode_swaps == 2
    assert default.decode_from_victim == 0
    assert budget_from_args(ap.parse_args(["--decode-from-victim", "3"])).decode_from_victim == 3
    assert default.decode_completion == 0
    assert default.decode_beam == 0 and budget_from_args(ap.parse_args(["--decode-beam", "4"])).decode_beam == 4
    assert budget_from_args(ap.parse_args(["--decode-completion", "2"])).decode_completion == 2


def test_pair_logprobs_read_the_models_next_token_table():
    rng = np.random.default_rng(5)
    succ = rng.permutation(V)
    lm = bigram_lm(succ)
    pairs = np.array([[3, succ[3]], [3, 7], [9, succ[9]], [3, succ[3]]])
    lp = torch.log_softmax(lm.logits(torch.arange(V)).float(), -1).double().numpy()
    assert np.allclose(pair_logprobs(lm, pairs, batch=1), lp[pairs[:, 0], pairs[:, 1]])


def test_em_decipherment_reads_the_text_through_every_neighbours_candidates():
    succ, text, cand, docs = decoy_cipher(5)
    before = (cand[text, 0] == text).mean()
    out = decode_em(bigram_lm(succ), docs, text, cand, iters=30, distinct=True)
    after = (out["candidates"][text, 0] == text).mean()
    sweeps = (decode(bigram_lm(succ), docs, text, cand, sweeps=8)["candidates"][text, 0] == text).mean()
    assert before < 0.5 and after > 0.97 and after > sweeps        # here the sweeps' search stops at 0.80
    ll = out["loglik"]
    assert 1 < out["iterations"] == len(ll) <= 30 and all(b >= a - 1e-6 * abs(a) for a, b in zip(ll, ll[1:]))
    assert all(set(a) == set(b) for a, b in zip(out["candidates"], cand))   # reordered, nothing added
    with pytest.raises(AloeError, match="at least one iteration"):
        decode_em(bigram_lm(succ), docs, text, cand, iters=0)


def test_sequential_decoding_reads_the_text_where_the_parallel_sweeps_stop_short():
    succ, text, cand, docs = decoy_cipher(5)
    before = (cand[text, 0] == text).mean()
    sweeps = (decode(bigram_lm(succ), docs, text, cand, sweeps=8)["candidates"][text, 0] == text).mean()
    for temperature in (0.0, 1.0):
        out = decode_sequential(bigram_lm(succ), docs, text, cand, sweeps=4, temperature=temperature,
                                rng=np.random.default_rng(1), distinct=True)
        after = (out["candidates"][text, 0] == text).mean()
        assert before < 0.5 and after > 0.97 and after > sweeps + 0.1      # the parallel sweeps stop at 0.80
        assert all(set(a) == set(b) for a, b in zip(out["candidates"], cand))   # reordered, nothing added
        assert out["sweeps"] == len(out["objective"]) == len(out["moved"]) == 4
        assert out["temperature"] == pytest.approx([temperature, 2 * temperature / 3, temperature / 3, 0.0])
        assert out["best_objective"] == out["objective"][-1]       # one-to-one: the last sweep's reading is kept
        assert out["moved"][0] > 0.1 and out["moved"][-1] == 0.0        # the last (greedy) sweep found nothing to move
        assert len(np.unique(out["candidates"][:, 0])) == V                # one plain token per cluster
    # without the collision penalty the search keeps readings where two clusters share a token (the decoys); the
    # one-to-one choice made after it still reads the text here, but the search's own objective stays lower
    free = decode_sequential(bigram_lm(succ), docs, text, cand, sweeps=4, temperature=0.0,
                             rng=np.random.default_rng(1), distinct=True, collision=0.0)
    assert max(free["objective"]) < out["best_objective"] - 100
    loose = decode_sequential(bigram_lm(succ), docs, text, cand, sweeps=4, temperature=1.0,
                              rng=np.random.default_rng(1))
    assert loose["best_objective"] == max(loose["objective"])     # not one-to-one: the best sweep's reading is kept
    with pytest.raises(AloeError, match="at least one sweep"):
        decode_sequential(bigram_lm(succ), docs, text, cand, sweeps=0)
    with pytest.raises(AloeError, match="temperature"):
        decode_sequential(bigram_lm(succ), docs, text, cand, temperature=-1.0)


def test_sequential_decoding_scores_each_cluster_against_its_neighbours_latest_choice():
    # the chasing pair of the test above: one cluster at a time, the first one visited moves and the second, scored
    # against that move, stays: a pair that reads well whatever the order
    succ, cand, labels, docs = chasing_pair()
    for seed in range(4):
        out = decode_sequential(bigram_lm(succ), docs, labels, cand, sweeps=2, temperature=0.0,
                                rng=np.random.default_rng(seed))
        assert tuple(out["candidates"][:2, 0]) in {(0, 2), (1, 3)}
        assert (out["candidates"][4:, 0] == np.arange(4, V)).all()


def test_the_one_to_one_search_swaps_two_ids_that_read_each_others_token():
    # every cluster starts at its own token except pairs that read each other's: neither can move alone, since
    # the token it wants is read by the other; a swap reads both
    succ, text, cand, docs = decoy_cipher(4)
    start = np.arange(V)
    for a, b in ((3, 11), (20, 27)):
        cand[a], cand[b] = [b, a, *cand[a][2:]], [a, b, *cand[b][2:]]
        start[a], start[b] = b, a
    assert (start[text] == text).mean() < 0.95
    out = refine_distinct(bigram_lm(succ), docs, text, cand, start, sweeps=3, rng=np.random.default_rng(0))
    assert (out["candidates"][text, 0] == text).all()
    assert out["moved"][0] == 0.0 and out["swapped"][0] == pytest.approx(4 / V)   # two swaps, nothing alone
    assert out["best_objective"] == out["objective"][0] > out["start_objective"] + 20
    assert out["sweeps"] == 1                                        # the second sweep changed nothing
    assert all(set(a) == set(b) for a, b in zip(out["candidates"], cand))   # reordered, nothing added
    # a single try per cluster still swaps here (the token it wants is its best)
    assert (refine_distinct(bigram_lm(succ), docs, text, cand, start, tries=1,
                            rng=np.random.default_rng(0))["candidates"][text, 0] == text).all()


def test_the_one_to_one_search_reads_more_than_the_decoders_one_to_one_choice():
    for seed in (4, 5):
        succ, text, cand, docs = decoy_cipher(seed)
        dec = decode(bigram_lm(succ), docs, text, cand, sweeps=8, distinct=True)["candidates"][:, 0]
        out = refine_distinct(bigram_lm(succ), docs, text, cand, dec, sweeps=4, rng=np.random.default_rng(1))
        got = out["candidates"][:, 0]
        assert (dec[text] == text).mean() < 0.95 and (got[text] == text).all()
        assert len(np.unique(got)) == V and out["shared"] == 0                 # one plain token per cluster
        assert out["best_objective"] >= max([out["start_objective"], *out["objective"]])
        assert out["best_objective"] == pytest.approx(text_logprob(bigram_lm(succ), docs, got[text])
                                                      + np.log(out["rank_prior"])[np.argmax(cand == got[:, None],
                                                                                             1)].sum())


def test_the_one_to_one_search_makes_its_start_one_to_one_and_refuses_bad_input():
    succ, text, cand, docs = decoy_cipher(4)
    # every cluster starts at its first candidate, two of them at one token: the start is made one-to-one
    start = cand[:, 0].copy()
    start[1] = start[0] = cand[0, 0]
    cand[1, 1] = cand[0, 0]
    # (as far as the candidates allow: a cluster whose candidates are all taken keeps sharing, and none starts to)
    out = refine_distinct(bigram_lm(succ), docs, text, cand, start, sweeps=2, rng=np.random.default_rng(0))
    first = out["candidates"][:, 0]
    _, inverse, counts = np.unique(first, return_inverse=True, return_counts=True)
    assert out["shared"] == (counts[inverse] > 1).sum() <= out["shared_at_start"] < (start == start[:, None]).sum() - V
    with pytest.raises(AloeError, match="at least one sweep"):
        refine_distinct(bigram_lm(succ), docs, text, cand, start, sweeps=0)
    with pytest.raises(AloeError, match="at least one candidate to try"):
        refine_distinct(bigram_lm(succ), docs, text, cand, start, tries=0)
    with pytest.raises(AloeError, match="one plain token per cluster"):
        refine_distinct(bigram_lm(succ), docs, text, cand, start[:5])
    outside = start.copy()
    outside[7] = next(t for t in range(V) if t not in cand[7])
    with pytest.raises(AloeError, match="1 occurring clusters start from a token outside their candidates"):
        refine_distinct(bigram_lm(succ), docs, text, cand, outside)


def test_the_one_to_one_search_completes_a_reading_around_held_ids():
    succ, text, cand, docs = decoy_cipher(4)
    lm = bigram_lm(succ)
    d = int(next(t for t in cand[5] if t != 5))          # cluster 5 is held at a decoy: cluster d's token
    cand[9, -1] = d                                      # cluster 9 lists d too (its last place holds a decoy)
    start = decode(lm, docs, text, cand, sweeps=8, distinct=True)["candidates"][:, 0]
    start[5], start[9], start[12], start[30] = d, d, 12, 30
    held = np.isin(np.arange(V), [5, 12, 30])
    seen: list[np.ndarray] = []
    out = refine_distinct(lm, docs, text, cand, start, sweeps=4, rng=np.random.default_rng(0), held=held,
                          on_sweep=seen.append)
    got = out["candidates"][:, 0]
    assert seen[0][9] != d                                   # the start is made one-to-one around the held ids
    assert all((s[held] == start[held]).all() for s in seen) and (got[held] == start[held]).all()
    assert (got[np.arange(V) != 5] != d).all()               # no one else reads the held token, d included
    rest = ~np.isin(text, [5, d])
    assert (seen[0][text] == text)[rest].mean() < 0.95 and (got[text] == text)[rest].all()
    assert out["shared"] <= out["shared_at_start"]       # d may find no free candidate; nobody starts to share
    free = refine_distinct(lm, docs, text, cand, start, sweeps=4, rng=np.random.default_rng(0))
    assert free["candidates"][5, 0] == 5                     # unheld, the search moves cluster 5 back
    with pytest.raises(AloeError, match="one flag per cluster"):
        refine_distinct(lm, docs, text, cand, start, held=held[:5])
    both = held.copy()
    both[9] = True
    with pytest.raises(AloeError, match="two held clusters start from the same token"):
        refine_distinct(lm, docs, text, cand, start, held=both)


def test_the_one_to_one_search_keeps_a_given_rank_prior_and_reports_each_reading():
    succ, text, cand, docs = decoy_cipher(5)
    dec = decode(bigram_lm(succ), docs, text, cand, sweeps=8, distinct=True)["candidates"][:, 0]
    given = np.full(cand.shape[1], 1.0 / cand.shape[1])               # flat: the rank carries no evidence
    seen: list[np.ndarray] = []
    out = refine_distinct(bigram_lm(succ), docs, text, cand, dec, sweeps=4, rng=np.random.default_rng(1),
                          prior=given, on_sweep=seen.append)
    assert out["rank_prior"] == pytest.approx(given.tolist())            # not refitted
    assert len(seen) == 1 + out["sweeps"]                                 # the start, then every sweep that changed
    _, inverse, counts = np.unique(dec, return_inverse=True, return_counts=True)
    alone = counts[inverse] == 1
    assert alone.sum() < V and (seen[0][alone] == dec[alone]).all()   # the start made one-to-one, else as it was
    assert (seen[-1][text] == text).all() and (out["candidates"][text, 0] == text).all()
    # under the flat prior the objective is the text's log-probability plus a constant
    got = out["candidates"][:, 0]
    rows = np.unique(text)
    assert out["best_objective"] == pytest.approx(text_logprob(bigram_lm(succ), docs, got[text])
                                                  + len(rows) * np.log(given[0]))
    # from the victim's own reading, a local optimum here, the search moves nothing
    seen.clear()
    still = refine_distinct(bigram_lm(succ), docs, text, cand, np.arange(V), sweeps=3, rng=np.random.default_rng(2),
                            prior=given, on_sweep=seen.append)
    assert still["sweeps"] == 0 and len(seen) == 1 and (seen[0] == np.arange(V)).all()
    assert still["best_objective"] == still["start_objective"] == pytest.approx(out["best_objective"])
    for bad in (given[:3], np.r_[given[:-1], 0.0]):
        with pytest.raises(AloeError, match="positive chance for each of the 4 ranks"):
            refine_distinct(bigram_lm(succ), docs, text, cand, dec, prior=bad)


def garden_path(length: int = 40):
    """Clusters 0 and 1 alternate in one doc; their first candidates (tokens 0 and 2) read fairly well together, their
    second (1 and 3) much better together, and either second candidate beside the other's first reads badly: a
    search that places one cluster at a time against the other's current token never leaves the first pair."""
    table = torch.zeros(V, V)
    table[0, 2] = table[2, 0] = 3.0
    table[1, 3] = table[3, 1] = 6.0
    lm = LogitsScorer(lambda ids: table[ids])
    cand = np.array([[0, 1], [2, 3]])
    return lm, cand, np.arange(length) % 2, [Doc.unknown(np.arange(length))]


def test_beam_search_keeps_a_choice_that_reads_worse_alone_until_its_neighbour_is_placed():
    lm, cand, labels, docs = garden_path()
    flat = np.array([0.5, 0.5])
    greedy = decode_beam(lm, docs, labels, cand, width=1, passes=3, prior=flat)
    assert tuple(greedy["candidates"][:, 0]) == (0, 2) and greedy["passes"] == 1      # nothing moved
    beam = decode_beam(lm, docs, labels, cand, width=2, passes=3, prior=flat)
    assert tuple(beam["candidates"][:, 0]) == (1, 3)
    assert beam["best_objective"] == pytest.approx(text_logprob(lm, docs, cand[labels, 1]) + 2 * np.log(0.5))
    assert beam["best_objective"] > greedy["best_objective"] + 10 and beam["start_objective"] < beam["objective"][0]
    assert beam["passes"] == 2 and beam["moved"] == [1.0, 0.0] and beam["shared"] == 0
    assert beam["spread"][0] > 0 and beam["width"] == 2
    assert all(set(a) == set(b) for a, b in zip(beam["candidates"], cand))   # reordered, nothing added


def test_beam_search_reads_the_decoy_cipher_one_to_one_and_refuses_bad_input():
    succ, text, cand, docs = decoy_cipher(5)
    out = decode_beam(bigram_lm(succ), docs, text, cand, width=4, passes=2)
    got = out["candidates"][:, 0]
    assert (cand[text, 0] == text).mean() < 0.5 and (got[text] == text).mean() > 0.97
    assert len(np.unique(got)) == V and out["shared"] == 0                        # one plain token per cluster
    assert out["best_objective"] == max(out["objective"]) > out["start_objective"]
    assert out["best_objective"] == pytest.approx(text_logprob(bigram_lm(succ), docs, got[text])
                                                  + np.log(out["rank_prior"])[np.argmax(cand == got[:, None], 1)].sum())
    assert all(set(a) == set(b) for a, b in zip(out["candidates"], cand))   # reordered, nothing added
    with pytest.raises(AloeError, match="width of at least one"):
        decode_beam(bigram_lm(succ), docs, text, cand, width=0)
    with pytest.raises(AloeError, match="at least one pass"):
        decode_beam(bigram_lm(succ), docs, text, cand, passes=0)
    with pytest.raises(AloeError, match="positive chance"):
        decode_beam(bigram_lm(succ), docs, text, cand, prior=np.zeros(cand.shape[1]))
    with pytest.raises(AloeError, match="in no doc"):
        decode_beam(bigram_lm(succ), docs[:1], text, cand)


def test_the_beams_scores_are_each_readings_own_and_shared_windows_are_scored_once():
    from aloe.attacks.decoding import _hypotheses_scores

    succ, text, cand, docs = decoy_cipher(6)
    lm = bigram_lm(succ)
    calls = []

    def counting(left, cont):
        calls.append(len(left))
        return lm(left, cont)

    a = cand[text, 0]
    b = a.copy()
    b[:50] = text[:50]                                # the two readings share the windows after position 66
    r = int(text[60])
    where = np.array([[i // 100, i % 100] for i in np.flatnonzero(text == r)])
    both = _hypotheses_scores(counting, [[a[i:i + 100].copy() for i in range(0, 600, 100)],
                                         [b[i:i + 100].copy() for i in range(0, 600, 100)]], where, cand[r], 16, 2)
    for row, reading in zip(both, (a, b)):
        own = occurrence_logprobs(lm, docs, reading, cand[text], active=text == r)[text == r].sum(0)
        assert row == pytest.approx(own)
    assert 0 < sum(calls) < 2 * len(where)            # the windows the readings share were scored once
