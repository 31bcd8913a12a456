"""The one scoring rule of the suite: TTRSR (fraction of tokens recovered), over the full vocabulary and over the
tokens of real prompts, plus top-k. Only this module (and the victim-side runner) ever reads the secret.

Two kinds of guess:

- :class:`IdGuess` (per obfuscated id: VMA, IA, NN, TFMA, behavioural): ranked plain candidates for each attacked
  obfuscated id. ``token_recovery`` is over the attacked ids (every movable id, or a uniform sample of them when a
  budget is set); the candidate pool is always the full vocabulary. ``prompt_token_recovery`` is over every
  occurrence of a movable token in the real prompts.
- :class:`SeqGuess` (per position: ISA, IMA): ranked candidates for each position of sequences the victim sent.
  ``token_recovery`` is over sequences of ids drawn uniformly from the vocabulary; ``prompt_token_recovery`` over
  the real prompts.

Fixed special ids are public and identical in both spaces; they are left out of every denominator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class IdGuess:
    obf_ids: np.ndarray           # (m,) attacked obfuscated ids
    candidates: np.ndarray        # (m, k) plain ids, best first
    extra: dict = field(default_factory=dict)
    uniform: np.ndarray | None = None  # (m,) rows of the uniform sample of the vocabulary (None: all rows)


@dataclass
class SeqGuess:
    vocab_pred: list[np.ndarray]   # per random-id sequence: (T, k) candidates
    prompt_pred: list[np.ndarray]  # per real prompt: (T, k) candidates
    extra: dict = field(default_factory=dict)


def _rates(hit: np.ndarray) -> float:
    return float(hit.mean()) if hit.size else float("nan")


def score_ids(guess: IdGuess, tau: np.ndarray, prompts: list[np.ndarray], fixed: np.ndarray) -> dict:
    inv = np.empty_like(tau)
    inv[tau] = np.arange(len(tau))
    cand = np.asarray(guess.candidates)
    k = cand.shape[1]
    truth = inv[guess.obf_ids]
    uni = np.ones(len(truth), dtype=bool) if guess.uniform is None else np.asarray(guess.uniform, dtype=bool)
    top1 = (cand[:, 0] == truth)[uni]
    topk = (cand == truth[:, None]).any(1)[uni]
    row = {int(o): i for i, o in enumerate(guess.obf_ids)}
    toks = np.concatenate(prompts) if prompts else np.zeros(0, dtype=np.int64)
    toks = toks[~np.isin(toks, fixed)]
    p1 = np.array([int(o) in row and cand[row[int(o)], 0] == t for t, o in zip(toks, tau[toks])], dtype=bool)
    pk = np.array([int(o) in row and t in cand[row[int(o)]] for t, o in zip(toks, tau[toks])], dtype=bool)
    extra = {}
    for key, val in guess.extra.items():
        if key.endswith("_pred"):  # a secondary guess (one plain id per attacked id), scored the same way
            val = np.asarray(val)
            mask = (val >= 0) & uni      # -1: this secondary guess made no claim on the id
            extra[key[:-5] + "_token_recovery"] = _rates(val[mask] == truth[mask])
        else:
            extra[key] = val
    return {"token_recovery": _rates(top1), f"token_recovery_top{k}": _rates(topk),
            "prompt_token_recovery": _rates(p1), f"prompt_token_recovery_top{k}": _rates(pk),
            "queries": int(uni.sum()), "candidates": int(len(tau)), "prompt_tokens": int(len(toks)),
            **extra}


def _seq_rates(preds: list[np.ndarray], truths: list[np.ndarray], fixed: np.ndarray) -> tuple[float, float, int]:
    h1, hk = [], []
    for p, t in zip(preds, truths):
        keep = ~np.isin(t, fixed)
        h1.append((p[:, 0] == t)[keep])
        hk.append((p == t[:, None]).any(1)[keep])
    a = np.concatenate(h1) if h1 else np.zeros(0, bool)
    b = np.concatenate(hk) if hk else np.zeros(0, bool)
    return _rates(a), _rates(b), int(a.size)


def score_sequences(guess: SeqGuess, vocab_truth: list[np.ndarray], prompt_truth: list[np.ndarray],
                    fixed: np.ndarray) -> dict:
    k = guess.vocab_pred[0].shape[1] if guess.vocab_pred else 1
    v1, vk, nv = _seq_rates(guess.vocab_pred, vocab_truth, fixed)
    p1, pk, npr = _seq_rates(guess.prompt_pred, prompt_truth, fixed)
    return {"token_recovery": v1, f"token_recovery_top{k}": vk, "prompt_token_recovery": p1,
            f"prompt_token_recovery_top{k}": pk, "queries": nv, "prompt_tokens": npr, **guess.extra}
