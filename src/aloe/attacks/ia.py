"""IA, invariant attacks (Lin et al.; design notes section 4).

- *gate-IA*: the average of a token's gate pre-activations over all FFN units, ``mean_u (e W_gate)_u``, does not
  depend on the unit permutation Z_ffn; one exact scalar per layer (all units, no sampling).
- *attention-IA*: for a RoPE pair block j of a key head, ``||e W_k[:, j]||^2`` is unchanged by the pair rotation R
  and multiplied by the pair scale H^-2, a factor common to the whole (head, pair) column, so each column is divided
  by its RMS over the tokens (the scale goes, however wide its range); the head and block permutations are removed
  by sorting the values of a layer (all KV heads and pairs).

Both run on plain weights carrying the artifact's public noise level (imitated with the attacker's own draws), and
tokens are matched by nearest neighbour over the full vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from aloe.attacks.common import Target, column_normalise, nearest, pca_project, standardise
from aloe.attacks.scoring import IdGuess


def _pair_norms(x: torch.Tensor, n_kv: int, hd: int, rows: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], n_kv, 2, hd // 2)
    return torch.sort(column_normalise((x * x).sum(2).reshape(x.shape[0], -1), rows), dim=1).values


def view_invariants(t: Target, views: list[tuple[Target, np.ndarray]], progress=None, plain_noise: bool = True
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Gate-IA and attention-IA features, standardised on the plain side: those of every plain token (``t``'s plain
    model, noised as its profile says unless ``plain_noise=False``) and those of the rows ``ids`` of each view
    ``(target, ids)``, an artifact of the same plain model (the victim's, or an attacker's own copy). Returns
    ``(gate, attention)`` for the plain side and for each view."""
    a, prof = t.arch, t.profile
    E = t.noised_plain(t.plain_embed, float(prof.get("alpha_e", 0.0)) if plain_noise else 0.0, "ia-e")
    pop = t.plain_population
    gate_p, attn_p = [], []
    gate_o, attn_o = [[] for _ in views], [[] for _ in views]
    for layer in t.layer_subset():
        gate_p.append(E @ t.plain_layer(layer, "mlp.gate_proj").mean(0))
        attn_p.append(_pair_norms(E @ t.plain_layer(layer, "self_attn.k_proj").T, a.n_kv, a.head_dim, pop))
        for i, (v, ids) in enumerate(views):
            qi = torch.as_tensor(ids)
            Eq = v.obf_embed[qi]
            gate_o[i].append(Eq @ v.obf_layer(layer, "mlp.gate_proj").mean(0))
            attn_o[i].append(_pair_norms(Eq @ v.obf_layer(layer, "self_attn.k_proj").T, a.n_kv, a.head_dim,
                                         v.held_rows[qi]))
        if progress is not None:
            progress.update(1)
    gp, ap = torch.stack(gate_p, 1), torch.cat(attn_p, 1).log1p()
    out = []
    for go, ao in zip(gate_o, attn_o):
        g = standardise(gp, torch.stack(go, 1))
        at = standardise(ap, torch.cat(ao, 1).log1p())
        out.append((g[1], at[1]))
    return (standardise(gp, gp)[0], standardise(ap, ap)[0]), out


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None) -> IdGuess:
    q_ids, uniform = t.query_ids(must=received)
    if not bool(t.held_rows.any()):  # the client holds both tables and sent nothing yet: nothing to match
        return IdGuess(q_ids, -np.ones((len(q_ids), t.budget.topk), dtype=np.int64), uniform=uniform)
    (gp, ap), [(go, ao)] = view_invariants(t, [(t, q_ids)], progress)
    k = t.budget.topk
    gate_pred = nearest(go, gp, 1)[:, 0]
    attn_pred = nearest(*reversed(pca_project(ap, ao, 128)), 1)[:, 0]
    p, o = pca_project(torch.cat([gp, ap], 1), torch.cat([go, ao], 1), 128)
    cand = t.no_claim_on_unheld(q_ids, nearest(o, p, k))
    extra = {"layers": len(t.layer_subset()), "gate_ia_pred": gate_pred.numpy(),
             "attention_ia_pred": attn_pred.numpy()}
    return IdGuess(q_ids, cand.numpy(), uniform=uniform, extra=extra)
