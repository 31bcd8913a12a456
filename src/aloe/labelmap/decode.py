"""Decoders: from head outputs to a ranking of all N labels.

Every soft decoder scores every label exactly and keeps a running top-k over chunks of labels, so memory stays
``O(batch * chunk)`` whatever N is (N = 10^6 works on a laptop):

- :func:`topk_sum_logprob` -- ``score(y) = sum_i log p_i(f_i(y))`` (product of the heads' probabilities);
- :func:`topk_mean_prob` -- ``score(y) = mean_i p_i(f_i(y))`` (MACH's estimator, up to an increasing affine map when
  all heads have the same size);
- :func:`crt_decode` -- hard decoding for the number-theoretic map: the heads' argmax residues, reconstructed by the
  CRT from every subset of r heads and voted (corrects up to ``floor((m - r) / 2)`` wrong heads);
- :func:`topk_linear_code` -- ECOC: loss-based decoding (``sum_l log sigma(+-z_l)``, which ranks as ``z . c_y``)
  and Hamming decoding (agreements of the sign bits with the codeword).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from aloe.labelmap.maps import LabelMap, crt

MAX_CHUNK_ELEMENTS = 1 << 22  # batch * chunk scores held at once (16 MiB of float32)


def _chunk_size(batch: int, n: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    return max(1, min(n, MAX_CHUNK_ELEMENTS // max(1, batch)))


def _merge_topk(best_v: torch.Tensor | None, best_i: torch.Tensor | None, v: torch.Tensor, i: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if best_v is None:
        return v, i
    cat_v = torch.cat([best_v, v], dim=1)
    cat_i = torch.cat([best_i, i], dim=1)
    top_v, pos = cat_v.topk(min(k, cat_v.shape[1]), dim=1)
    return top_v, cat_i.gather(1, pos)


def _chunked_topk(score_chunk, n: int, batch: int, k: int, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over labels 0..n-1 of ``score_chunk(start, stop) -> (batch, stop-start)``, ``k`` clipped to n."""
    k = min(k, n)
    size = _chunk_size(batch, n, chunk)
    best_v = best_i = None
    for start in range(0, n, size):
        stop = min(n, start + size)
        s = score_chunk(start, stop)
        v, i = s.topk(min(k, stop - start), dim=1)
        best_v, best_i = _merge_topk(best_v, best_i, v, i + start, k)
    return best_v, best_i


def _split(outputs: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(outputs, list(sizes), dim=1))


def head_log_probs(logits: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Per-head log-softmax of concatenated head logits ``(batch, sum k_i)``."""
    return [torch.log_softmax(z, dim=1) for z in _split(logits, sizes)]


@torch.no_grad()
def topk_sum_logprob(log_probs: list[torch.Tensor], lmap: LabelMap, k: int = 5, *,
                     chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k labels by ``sum_i log p_i(f_i(y))``; returns (scores, labels), each (batch, k)."""
    table = torch.from_numpy(lmap.table)
    batch = log_probs[0].shape[0]

    def score(start: int, stop: int) -> torch.Tensor:
        s = log_probs[0].index_select(1, table[0, start:stop])
        for i in range(1, len(log_probs)):
            s += log_probs[i].index_select(1, table[i, start:stop])
        return s

    return _chunked_topk(score, lmap.n_classes, batch, k, chunk)


@torch.no_grad()
def topk_mean_prob(log_probs: list[torch.Tensor], lmap: LabelMap, k: int = 5, *,
                   chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k labels by ``mean_i p_i(f_i(y))`` (MACH-style)."""
    probs = [lp.exp() for lp in log_probs]
    table = torch.from_numpy(lmap.table)
    batch = probs[0].shape[0]

    def score(start: int, stop: int) -> torch.Tensor:
        s = probs[0].index_select(1, table[0, start:stop])
        for i in range(1, len(probs)):
            s += probs[i].index_select(1, table[i, start:stop])
        return s / len(probs)

    return _chunked_topk(score, lmap.n_classes, batch, k, chunk)


def mach_estimate(mean_prob: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """MACH's unbiased estimate of P(y|x) from the mean bucket probability (equal-size heads)."""
    return (n_buckets / (n_buckets - 1.0)) * (mean_prob - 1.0 / n_buckets)


@torch.no_grad()
def topk_linear_code(logits: torch.Tensor, code: torch.Tensor, k: int = 5, *, hamming: bool = False,
                     chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ECOC decoding with a 0/1 code matrix ``code`` (N, L).

    Loss-based (default): ``score(y) = sum_l log sigma(s_yl z_l)`` with ``s = 2c - 1``; since
    ``log sigma(z) - log sigma(-z) = z`` this equals ``z . c_y + sum_l log sigma(-z_l)``, so the exact scores are
    a matrix product. Hamming: ``score(y) = L - hamming(sign bits, c_y)``.
    """
    code = code.to(logits.dtype)
    batch = logits.shape[0]
    if hamming:
        bits = (logits > 0).to(logits.dtype)
        base = (1.0 - bits).sum(1, keepdim=True)
        lin = 2.0 * bits - 1.0  # agreements = sum_l [b c + (1-b)(1-c)] = (1-b).1 + (2b-1).c
    else:
        base = torch.nn.functional.logsigmoid(-logits).sum(1, keepdim=True)
        lin = logits

    def score(start: int, stop: int) -> torch.Tensor:
        return base + lin @ code[start:stop].T

    return _chunked_topk(score, code.shape[0], batch, k, chunk)


@torch.no_grad()
def topk_logits(logits: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot softmax: the top-k logits."""
    return logits.topk(min(k, logits.shape[1]), dim=1)


def crt_decode(log_probs: list[torch.Tensor], lmap: LabelMap, *, max_subsets: int = 512,
               seed: int = 0) -> np.ndarray:
    """Hard decoding of a number-theoretic map.

    Each head votes its argmax residue. For every subset of r heads (r = the map's order) the CRT gives the
    unique candidate below prod k (kept if < N); a candidate's support is the number of heads whose argmax agrees
    with it; ties go to the higher sum of log-probabilities. A label with at most ``floor((m - r) / 2)`` wrong
    heads is always recovered. If no subset gives a candidate below N the answer is label 0. When there are more
    than ``max_subsets`` subsets of r heads, a fixed random sample of that many is tried instead (the guarantee
    then holds only with high probability).
    """
    if lmap.kind != "number-theoretic":
        raise ValueError("CRT decoding needs a number-theoretic map")
    moduli = lmap.sizes
    r = int(lmap.info["order"])
    n = lmap.n_classes
    res = np.stack([lp.argmax(1).cpu().numpy() for lp in log_probs], axis=1)  # (B, m)
    lps = [lp.cpu().numpy() for lp in log_probs]
    batch, m = res.shape
    best = np.zeros(batch, dtype=np.int64)
    best_key = np.full((batch, 2), -np.inf)
    subsets = list(itertools.combinations(range(m), r)) if math.comb(m, r) <= max_subsets else None
    if subsets is None:
        rng = np.random.default_rng(seed)
        subsets = sorted({tuple(sorted(rng.choice(m, size=r, replace=False).tolist())) for _ in range(max_subsets)})
    for subset in subsets:
        cand = np.asarray(crt(res[:, list(subset)], [moduli[j] for j in subset]), dtype=np.int64)
        valid = cand < n
        c = np.where(valid, cand, 0)
        support = np.zeros(batch)
        loglik = np.zeros(batch)
        for j in range(m):
            rj = c % moduli[j]
            support += rj == res[:, j]
            loglik += lps[j][np.arange(batch), rj]
        support = np.where(valid, support, -1.0)
        better = (support > best_key[:, 0]) | ((support == best_key[:, 0]) & (loglik > best_key[:, 1]))
        best = np.where(better, c, best)
        best_key[better, 0] = support[better]
        best_key[better, 1] = loglik[better]
    return best
