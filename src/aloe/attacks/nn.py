"""NN, nearest neighbour from obfuscated embedding rows to the plain embedding table.

The obfuscated rows live in d' = d + 2h dimensions and the plain ones in d, so a nearest neighbour needs an
alignment first. The attacker builds one without any secret:

1. *PCA alignment.* Both tables are centred and projected on their own principal axes. When the writer key is a
   scaled isometry (the exact-norm design, ``P P^T = c^2 I``), ``E~ E~^T = c^2 E* E*^T``: the obfuscated table is a
   rotated copy of the (noised) plain one, so the principal coordinates agree up to one sign per axis, which the
   attacker fixes with the sign of each coordinate's third moment.
2. *Refinement.* The most confident matches (largest margin between the best and second-best candidate) together
   with the fixed special tokens become anchors; a ridge least-squares map from the obfuscated rows to the plain rows
   is fitted on them and the nearest neighbour is taken again (``rounds`` times).

Against the paper's non-isometric keys the PCA step finds no alignment and the attack falls to chance.

When the server holds only *some* obfuscated rows (the client-held vocabulary, where it sees just the vectors the
client sends), the zero rows are left out of the PCA and the plain side is taken over the tokens of the attacker's
prior corpus (``Target.prior_plain_ids``), so both sides describe the same population of frequent tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from aloe.attacks.common import Target
from aloe.attacks.scoring import IdGuess


def _axes(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and the top-``r`` principal axes of the rows of ``x``, each axis signed by its third moment."""
    mu = x.mean(0, keepdim=True)
    xc = x - mu
    evals, evecs = torch.linalg.eigh((xc.T.double() @ xc.double()) / x.shape[0])
    v = evecs[:, -r:].flip(1).float()
    sign = torch.sign(((xc @ v) ** 3).mean(0))
    sign[sign == 0] = 1
    return mu, v * sign


def _project(x: torch.Tensor, rows: torch.Tensor, r: int) -> torch.Tensor:
    """Principal coordinates of every row of ``x`` on the axes (and centre) of the rows selected by ``rows``."""
    mu, v = _axes(x[rows], r)
    return (x - mu) @ v


def _margin_candidates(queries: torch.Tensor, table: torch.Tensor, k: int, batch: int = 1024):
    qn = torch.nn.functional.normalize(queries, dim=1)
    tn = torch.nn.functional.normalize(table, dim=1)
    idx, margin = [], []
    for s in range(0, qn.shape[0], batch):
        sc = qn[s:s + batch] @ tn.T
        top = sc.topk(max(k, 2), dim=1)
        idx.append(top.indices[:, :k])
        margin.append(top.values[:, 0] - top.values[:, 1])
    return torch.cat(idx), torch.cat(margin)


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None, rounds: int = 3, r0: int = 64) -> IdGuess:
    q_ids, uniform = t.query_ids(must=received)
    qi = torch.as_tensor(q_ids)
    E, Et = t.plain_embed, t.obf_embed
    d = E.shape[1]
    r = min(r0, d)
    held = t.held_rows
    k = t.budget.topk
    if int(held.sum()) <= r:  # the server holds (almost) no obfuscated row: nothing to align
        return IdGuess(q_ids, -np.ones((len(q_ids), k), dtype=np.int64), uniform=uniform, extra={"rows_held": 0})
    A = _project(E, t.plain_population, r)
    At = _project(Et, held, r)
    cand, margin = _margin_candidates(At[qi], A, k)
    margin[~held[qi]] = -1.0  # an id whose row the server never saw cannot anchor the refinement
    first = cand[:, 0].clone()
    fixed = torch.as_tensor(t.fixed_ids)
    fixed = fixed[held[fixed]]
    n_held = int(held[qi].sum())
    Et_c = torch.cat([Et, torch.ones(Et.shape[0], 1)], 1)
    for _ in range(rounds):
        n_anchor = min(n_held, max(4 * d, n_held // 4))
        best = margin.argsort(descending=True)[:n_anchor]
        src = torch.cat([qi[best], fixed])
        dst = torch.cat([cand[best, 0], fixed])
        X, Y = Et_c[src], E[dst]
        lam = 1e-3 * float((X * X).sum(1).mean())
        W = torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1]), X.T @ Y)
        cand, margin = _margin_candidates(Et_c[qi] @ W, E, k)
        margin[~held[qi]] = -1.0
        if progress is not None:
            progress.update(1)
    cand = t.no_claim_on_unheld(q_ids, cand)
    return IdGuess(q_ids, cand.numpy(), uniform=uniform,
                   extra={"pca_only_pred": first.numpy(), "rounds": rounds, "rows_held": int(held.sum())})
