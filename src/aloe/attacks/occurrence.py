"""Attacks on the vectors a client-held-vocabulary client sends, one occurrence at a time.

In that deployment (:mod:`aloe.obfuscation.client_vocab`) the server holds neither table and never produces an
output distribution over ids, so the table attacks and anchored or behavioural matching have nothing to read. What
it does receive is one vector per token occurrence, the obfuscated embedding row plus, when the deployment asks for
it, fresh noise (``occurrence_noise``, relative to the row as in :func:`~aloe.obfuscation.embedding.noise_std`), and
it holds the transformer body. Fresh noise means the server cannot tell which occurrences share a token, so each
vector is attacked alone:

- ``ia``: the invariant attacks on the vector itself. Every layer's gate and key projections read the residual
  stream through the writer key, so ``v W~_gate`` and ``v W~_k`` are the plain products of the noisy plain row,
  permuted and scaled (:mod:`aloe.attacks.ia`). The plain side is every plain token's row with noise of the public
  level drawn by the attacker.
- ``states``: the server runs its body on the vector as a sequence of one token and reads each layer's relative norm
  and the cosines between layers (exact invariants of the exact-norm keys;
  :func:`aloe.attacks.learned.state_invariants`), matched against the same features of every plain token
  (noise-free, cached per plain model).
- ``combined``: both families side by side.

Each guess is a nearest neighbour over the full plain vocabulary. Context is not used (each vector is read alone),
so these figures are lower bounds on what a server that also models the language could read.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from aloe.attacks import ia, learned
from aloe.attacks.common import Target, nearest, pca_project, standardise
from aloe.obfuscation.embedding import noise_std

PCA_DIMS = 128


def _noised_plain(t: Target, alpha: float, shape: str, label: str) -> torch.Tensor:
    E = t.plain_embed
    if alpha <= 0:
        return E
    std = torch.from_numpy(noise_std(E.double().numpy(), alpha, shape)).float()
    g = torch.Generator().manual_seed(int(t.budget.rng(label).integers(1 << 62)))
    return E + std[:, None] * torch.randn(E.shape, generator=g)


@torch.no_grad()
def attack_vectors(t: Target, vectors: torch.Tensor, alpha: float, shape: str = "row", progress=None
                   ) -> dict[str, np.ndarray]:
    """Ranked plain candidates (m, topk) for each received vector, per feature family. ``t`` is the attacker's view
    of the server artifact; ``alpha``/``shape`` the deployment's public occurrence-noise level."""
    vectors = vectors.float()
    m, k = vectors.shape[0], t.budget.topk
    plain_side = copy.copy(t)
    plain_side.__dict__["plain_embed"] = _noised_plain(t, alpha, shape, "occurrence-e")
    view = copy.copy(t)
    view.__dict__["obf_embed"] = vectors
    view.__dict__["held_rows"] = torch.ones(m, dtype=torch.bool)
    (gp, ap), [(go, ao)] = ia.view_invariants(plain_side, [(view, np.arange(m))], progress, plain_noise=False)
    ia_p, ia_o = pca_project(torch.cat([gp, ap], 1), torch.cat([go, ao], 1), PCA_DIMS)
    sp_raw = learned.plain_states(t, progress is not None)
    so_raw = learned.state_features(t.obf_dir, vectors, np.arange(m), t.budget.batch, "occurrence/states",
                                    progress is not None)
    sp, so = pca_project(*standardise(sp_raw, so_raw), PCA_DIMS)
    ia_ps, ia_os = standardise(ia_p, ia_o)
    st_ps, st_os = standardise(sp, so)
    return {"ia": nearest(ia_o, ia_p, k).numpy(), "states": nearest(so, sp, k).numpy(),
            "combined": nearest(torch.cat([ia_os, st_os], 1), torch.cat([ia_ps, st_ps], 1), k).numpy()}


def score_occurrences(cand: np.ndarray, truth: np.ndarray) -> dict:
    """Share of occurrences whose plain token is the first guess, and among the guesses."""
    truth = np.asarray(truth)
    return {"occurrence_recovery": float((cand[:, 0] == truth).mean()) if len(truth) else float("nan"),
            f"occurrence_recovery_top{cand.shape[1]}": float((cand == truth[:, None]).any(1).mean())
            if len(truth) else float("nan"), "occurrences": int(len(truth))}
