"""Language-prior decoding: the public model's view of the text picks among a per-token attack's candidates."""

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.attacks.decoding import CausalLM, Doc, LogitsScorer, decode, occurrence_logprobs, traffic_docs

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
