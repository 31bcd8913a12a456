"""Anchored logit matching: the server runs the model it hosts on contexts that mean the same on both sides.

Not in the paper. The mechanism leaves the tokenizer's special ids in place (they are public, and a chat template
needs them), so a context made only of fixed ids is the same context to the plain and to the obfuscated model. On
it the obfuscated model's logit of obfuscated id ``tau(j)`` is, up to the mechanism's noise, the plain model's logit
of ``j``: ``h~ . w~_tau(j) = h . w_j`` (the keys cancel in the product the engine computes). The column of an output
id over ``K`` such contexts is a signature of that id, and it is the same on both sides. With contexts whose final
states span the hidden space, the signature pins the head row down in plain coordinates, so every id of the
vocabulary is matched against the whole vocabulary, forwarded or not.

Rounds:

0. Contexts: every sequence of fixed ids of length 1, 2, ..., taken in order of length until ``K`` contexts (the
   longest length drawn uniformly at random). Each context is one forward pass on each side.
1. Match: centre every context's logits over the vocabulary (a constant shift is not a signal), project both sides'
   columns on the plain side's principal axes, nearest neighbour over the full plain vocabulary.
2. Bootstrap (``rounds`` more times): the ids matched with the widest margin become new anchors. Contexts ``a x``
   and ``x`` for confident ids ``x`` are built on the obfuscated side with ``x`` and on the plain side with its guess;
   their logits join the signatures and step 1 runs again. States after confident ids spread over the hidden space
   far more than states after special ids alone.

Cost: ``K`` forward passes of a few tokens on each side, then one exact nearest-neighbour search per round. The
plain side depends on the guesses, so it is not cached.

A client-held-vocabulary server has no head: its logits are all zero, and the attack makes no claim.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe.attacks.common import Target, load_causal_lm, nearest
from aloe.attacks.scoring import IdGuess

PROJECTION = 256        # principal axes of the plain signatures kept for the search
CONFIDENT = 0.25        # share of the movable ids promoted to anchors after each round (by margin)
NEW_CONTEXTS = 512      # contexts built from promoted ids per bootstrap round


def anchor_contexts(anchors: np.ndarray, k: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Up to ``k`` distinct sequences of anchor ids, shortest first; the last length is sampled uniformly."""
    out: list[tuple[int, ...]] = []
    a = [int(x) for x in anchors]
    length = 1
    while len(out) < k and a:
        total = len(a) ** length
        need = k - len(out)
        if total <= need:
            out += list(itertools.product(a, repeat=length))
        else:
            picks = set()
            while len(picks) < need:
                picks.add(tuple(int(x) for x in rng.choice(a, size=length)))
            out += sorted(picks)
        length += 1
    return out


@torch.no_grad()
def context_logits(model, contexts: list[tuple[int, ...]], batch: int, desc: str, progress: bool) -> torch.Tensor:
    """Last-position logits of every context (rows), centred over the vocabulary."""
    out = torch.zeros(len(contexts), int(model.config.vocab_size))
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):
        by_len.setdefault(len(c), []).append(i)
    bar = tqdm(total=len(contexts), desc=desc, disable=not progress, unit="ctx", leave=False)
    for rows in by_len.values():
        for s in range(0, len(rows), batch):
            r = rows[s:s + batch]
            ids = torch.as_tensor([contexts[i] for i in r])
            out[torch.as_tensor(r)] = model(ids).logits[:, -1].float()
            bar.update(len(r))
    bar.close()
    return out - out.mean(1, keepdim=True)


def match(plain_logits: torch.Tensor, obf_logits: torch.Tensor, movable: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest plain columns for every movable obfuscated column, and each match's margin (second over first
    distance, on the projected signatures)."""
    p = plain_logits.T.double()                                   # (vocab, contexts)
    o = obf_logits.T.double()[torch.as_tensor(movable)]
    mu = p.mean(0, keepdim=True)
    dim = min(PROJECTION, p.shape[1])
    _, _, v = torch.linalg.svd(p - mu, full_matrices=False)
    basis = v[:dim].T
    pp, op = ((p - mu) @ basis).float(), ((o - mu) @ basis).float()
    cand = nearest(op, pp, max(k, 2))
    d = ((pp[cand[:, :2]] - op[:, None, :]) ** 2).sum(-1)
    margin = (d[:, 1] / d[:, 0].clamp_min(1e-30)).numpy()
    return cand.numpy(), margin


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None, rounds: int | None = None) -> IdGuess:
    b, n = t.budget, t.arch.vocab
    show = progress is not None
    movable, fixed = t.movable_ids, t.fixed_ids
    k = max(b.topk, 2)
    rounds = b.anchored_rounds if rounds is None else rounds
    if not t.head_held:                      # client-held vocabulary: no logits to read
        return IdGuess(movable, np.full((len(movable), b.topk), -1), extra={"contexts": 0, "rounds": 0})
    rng = b.rng("anchored")
    plain_model, obf_model = load_causal_lm(t.plain_dir), load_causal_lm(t.obf_dir)
    ctx = anchor_contexts(fixed, b.anchored_contexts, rng)
    plain_l = context_logits(plain_model, ctx, b.batch, "anchored/plain", show)
    obf_l = context_logits(obf_model, ctx, b.batch, "anchored/obfuscated", show)
    cand, margin = match(plain_l, obf_l, movable, k)
    first = cand[:, 0].copy()
    if progress is not None:
        progress.update(1)
    n_ctx = len(ctx)
    for _ in range(rounds):
        # the ids matched with the widest margin become anchors; a guess is used as if it were right
        order = np.argsort(-margin)[:max(1, int(CONFIDENT * len(movable)))]
        pick = rng.choice(order, size=min(NEW_CONTEXTS, len(order)), replace=False)
        heads = rng.choice(fixed, size=len(pick))
        obf_ctx = [(int(movable[r]),) for r in pick[: len(pick) // 2]]
        obf_ctx += [(int(h), int(movable[r])) for h, r in zip(heads[len(pick) // 2:], pick[len(pick) // 2:])]
        plain_ctx = [(int(cand[r, 0]),) for r in pick[: len(pick) // 2]]
        plain_ctx += [(int(h), int(cand[r, 0])) for h, r in zip(heads[len(pick) // 2:], pick[len(pick) // 2:])]
        plain_l = torch.cat([plain_l, context_logits(plain_model, plain_ctx, b.batch, "anchored/plain", show)])
        obf_l = torch.cat([obf_l, context_logits(obf_model, obf_ctx, b.batch, "anchored/obfuscated", show)])
        cand, margin = match(plain_l, obf_l, movable, k)
        n_ctx += len(pick)
        if progress is not None:
            progress.update(1)
    del n
    return IdGuess(movable, cand[:, :b.topk], extra={
        "contexts": int(n_ctx), "anchors": int(len(fixed)), "rounds": int(rounds), "anchors_only_pred": first})
