"""TFMA, token-frequency matching (design notes section 4, Table 4 of the paper).

tau is fixed for the life of a deployment, so it is a substitution cipher on a stream of prompts. The server counts
the obfuscated ids it receives, ranks them, and maps the id of rank r to the token of rank r in a public prior
corpus. Top-k: the k prior tokens whose ranks are nearest to the observed rank. Ids never seen in the stream get
no guess (they count as not recovered).
"""

from __future__ import annotations

import numpy as np

from aloe.attacks.scoring import IdGuess


def rank_order(ids: np.ndarray, n: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(ids, minlength=n).astype(np.float64)
    counts[exclude] = -1
    order = np.argsort(-counts, kind="stable")
    return order[counts[order] > 0], counts


def attack(stream: np.ndarray, prior: np.ndarray, n: int, fixed: np.ndarray, k: int = 10) -> IdGuess:
    seen, _ = rank_order(stream, n, fixed)
    ranked_prior, _ = rank_order(prior, n, fixed)
    movable = np.setdiff1d(np.arange(n), fixed)
    rest = np.setdiff1d(movable, ranked_prior)            # prior-unseen tokens fill the tail, in id order
    prior_full = np.concatenate([ranked_prior, rest])
    cand = np.full((len(movable), k), -1, dtype=np.int64)
    row = {int(o): i for i, o in enumerate(movable)}
    for r, o in enumerate(seen):
        lo = max(0, min(r - k // 2, len(prior_full) - k))
        window = prior_full[lo:lo + k]
        order = np.argsort(np.abs(np.arange(lo, lo + len(window)) - r), kind="stable")
        cand[row[int(o)], :len(window)] = window[order]
    return IdGuess(movable, cand, {"stream_tokens": int(len(stream)), "distinct_ids_seen": int(len(seen)),
                                   "prior_tokens": int(len(prior))})
