"""Post-norm owner matching: the sandwich-norm key (Gemma 3) read off the post-norm weights.

A model whose sublayers also have a post-norm before they join the residual (Gemma 3) needs, for exact stock norms, a
key in which every obfuscated coordinate carries one plain coordinate (:class:`aloe.obfuscation.norm.SandwichKeys`;
``docs/aloepri.md``, Gemma 3): slot k holds ``c w_k x_owner(k)``, with secret signed weights of unit norm over the
slots of each plain coordinate, and the stock post-norm weight of slot k is ``g~_k = kappa g_owner(k)``. The server
holds every g~ and the public model every g, so across the 2L post-norms the multipliers of a slot point where those of
its owner do: each slot's owner is the plain coordinate of the closest direction (``owner_margin``: the smallest gap
between a slot's best and second-best cosine). Then an obfuscated embedding row gives, for each plain coordinate i,
``sum over its slots of row_k^2 = c^2 x_i^2``: the absolute values of the (noised) plain row, matched by cosine against
every plain row's over the full vocabulary. The slot weights and signs stay secret; the absolute values suffice.

The head is not read: its rows pass through a reader whose fresh part lies in the slots' null space and adds to the
per-coordinate sums. Models without post-norms (Llama, Qwen2, ...) get no claim (``post_norms`` 0).
"""

from __future__ import annotations

import numpy as np
import torch

from aloe.attacks.common import Target, nearest
from aloe.attacks.scoring import IdGuess


@torch.no_grad()
def owners(t: Target) -> tuple[np.ndarray, float, int] | None:
    """The plain coordinate each obfuscated slot carries, the smallest margin of that match, and the number of
    post-norms read; None for a model without post-norms."""
    spec = t.arch.spec
    kinds = [n for n in (getattr(spec, "post_attn_norm", None), getattr(spec, "post_ffn_norm", None)) if n]
    if not kinds:
        return None
    names = [f"model.layers.{layer}.{k}.weight" for layer in range(t.arch.n_layers) for k in kinds]
    names = [n for n in names if t.has_weight(n)]
    if not names:
        return None
    offset = float(spec.norm_offset)
    g = torch.nn.functional.normalize(torch.stack([t.plain(n).double() + offset for n in names], 1), dim=1)
    gt = torch.nn.functional.normalize(torch.stack([t.obf(n).double() + offset for n in names], 1), dim=1)
    top = (gt @ g.T).topk(2, dim=1)
    return top.indices[:, 0].numpy(), float((top.values[:, 0] - top.values[:, 1]).min()), len(names)


def plain_magnitudes(rows: torch.Tensor, owner: np.ndarray, d: int) -> torch.Tensor:
    """(m, d): for each obfuscated row, the square root of the summed squares of the slots each plain coordinate
    owns (``c |x_i|`` for the row ``x P``)."""
    r = rows.double()
    energy = torch.zeros(r.shape[0], d, dtype=r.dtype).index_add_(1, torch.as_tensor(owner), r * r)
    return energy.sqrt()


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None) -> IdGuess:
    """Every attacked obfuscated id's embedding row read by its per-coordinate magnitudes (see the module's
    docstring); no claim on rows the server does not hold, nor on a model without post-norms."""
    q_ids, uniform = t.query_ids(must=received)
    k = t.budget.topk
    found = owners(t)
    held = t.held_rows[torch.as_tensor(q_ids)]
    if found is None or not bool(held.any()):
        return IdGuess(q_ids, -np.ones((len(q_ids), k), dtype=np.int64), uniform=uniform,
                       extra={"post_norms": 0 if found is None else found[2], "rows_held": int(held.sum())})
    owner, margin, n_norms = found
    obf = plain_magnitudes(t.obf_embed[torch.as_tensor(q_ids)], owner, t.arch.d).float()
    pool = torch.as_tensor(t.movable_ids)
    cand = pool[nearest(obf, t.plain_embed[pool].abs(), k, metric="cos")]
    if progress is not None:
        progress.update(1)
    cand = t.no_claim_on_unheld(q_ids, cand)
    return IdGuess(q_ids, cand.numpy(), uniform=uniform,
                   extra={"post_norms": n_norms, "owner_margin": margin, "slots": int(len(owner))})
