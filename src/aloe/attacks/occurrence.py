"""Attacks on the vectors a client-held-vocabulary client sends: one occurrence at a time, and linked across the stream.

In that deployment (:mod:`aloe.obfuscation.client_vocab`) the server holds neither table and never produces an
output distribution over ids, so the table attacks and anchored or behavioural matching have nothing to read. What
it does receive is one vector per token occurrence, the obfuscated embedding row plus, when the deployment asks for
it, fresh noise (``occurrence_noise``, relative to the row as in :func:`~aloe.obfuscation.embedding.noise_std`), and
it holds the transformer body. Identical tokens no longer send identical vectors, so the first attacks read each
vector alone:

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

Fresh noise does not hide *which* occurrences share a token. With row-shaped noise of public level alpha two
occurrences of one token differ by noise only, and ``||v_i - v_j||^2 / mean(||v_i||^2, ||v_j||^2)`` concentrates
at ``2 alpha^2 / (1 + alpha^2)`` whatever the row and whatever scaled isometry the key is, while two different
tokens differ by their rows as well. :func:`link_threshold` calibrates the cut between the two on the attacker's
own noisy copies of plain rows, :func:`link_occurrences` clusters the received vectors by it (average linkage), and
:func:`attack_linked` reads each cluster's mean, whose noise shrinks as 1/sqrt(size): the stream-level attacker.

The invariants throw most of each vector away. :func:`attack_keyed` keeps it: the key is one linear map for every
vector, so the server fits it by least squares on the linked attack's reading (trimmed of the pairs no key fits),
maps every received vector back into the plain space, where it is the plain row plus the client's noise, and reads
it by its likelihood under that noise (:mod:`aloe.attacks.key_regression`); for the exact-norm keys, a scaled
isometry, only on the span of the pairs it trusts, which grows round by round (:func:`keyed_fit`). For those keys
the server need not fit anything: the body gives the key (:mod:`aloe.attacks.weight_key`), and
:func:`aloe.attacks.weight_key.read_vectors` reads every vector through it with no reading first.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from aloe import AloeError
from aloe.attacks import ia, learned
from aloe.attacks.common import Target, nearest, pca_project, standardise
from aloe.obfuscation.embedding import NOISE_SHAPES, noise_std

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


# ---- stream level: link the occurrences of one token, read the cluster means ------------------------------------
def pair_ratios(vectors: torch.Tensor) -> torch.Tensor:
    """(m, m): squared distance of every pair over the mean of their squared norms; invariant to a scaled
    isometry of the vectors."""
    v = vectors.double()
    sq = (v * v).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * v @ v.T).clamp_min(0)
    return (d2 / ((sq[:, None] + sq[None, :]) / 2).clamp_min(1e-30)).float()


def link_threshold(t: Target, alpha: float, shape: str = "row", rows: int = 2048) -> dict:
    """The attacker's calibration: two fresh noisy copies of ``rows`` plain rows (the public noise level) give the
    same-token pair ratios, pairs of different rows the others; the threshold is the one that minimises the sum of
    the two error rates on them. Returns the threshold and both error rates."""
    rng = t.budget.rng("occurrence-link")
    ids = rng.choice(t.movable_ids, size=min(rows, len(t.movable_ids)), replace=False)
    E = t.plain_embed[torch.as_tensor(ids)].double()
    std = torch.from_numpy(noise_std(E.numpy(), alpha, shape)) if alpha > 0 else torch.zeros(len(ids), dtype=E.dtype)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
    a = E + std[:, None] * torch.randn(E.shape, generator=g, dtype=E.dtype)
    b = E + std[:, None] * torch.randn(E.shape, generator=g, dtype=E.dtype)

    def ratio(x, y):
        sx, sy = (x * x).sum(1), (y * y).sum(1)
        return ((x - y) ** 2).sum(1) / ((sx + sy) / 2).clamp_min(1e-30)

    same = ratio(a, b).sort().values
    other = ratio(a, b.roll(1, 0)).sort().values  # row i against row i-1: different tokens
    grid = torch.cat([same, other]).sort().values
    miss = 1 - torch.searchsorted(same, grid, right=True).double() / len(same)      # same pairs above the cut
    false = torch.searchsorted(other, grid, right=True).double() / len(other)       # other pairs at or below it
    best = int(torch.argmin(miss + false))
    above = grid[grid > grid[best]]
    cut = (float(grid[best]) + float(above[0])) / 2 if len(above) else float(grid[best])  # midway to the next ratio
    return {"threshold": cut, "same_pairs_missed": float(miss[best]), "other_pairs_linked": float(false[best])}


def link_occurrences(vectors: torch.Tensor, threshold: float) -> np.ndarray:
    """Cluster labels (m,) of the received vectors: average-linkage clustering of their pair ratios, cut at
    ``threshold``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    m = len(vectors)
    if m < 2:
        return np.zeros(m, dtype=np.int64)
    r = pair_ratios(vectors).double().numpy()
    r = (r + r.T) / 2
    np.fill_diagonal(r, 0.0)
    return fcluster(linkage(squareform(r, checks=False), "average"), threshold, "distance").astype(np.int64) - 1


def attack_linked(t: Target, vectors: torch.Tensor, alpha: float, shape: str = "row", progress=None) -> dict:
    """The stream-level attack: link the occurrences of one token (:func:`link_occurrences` at the calibrated
    :func:`link_threshold`), average each cluster, and read every mean with the ``combined`` occurrence attack at the
    noise level left after averaging (alpha / sqrt(size), clusters grouped by size 1, 2, 3-4, 5-8, 9+, each group
    read at its smallest size's level). Returns the ranked candidates (m, topk) of every occurrence, its cluster
    labels, each cluster's candidates and the calibration."""
    vectors = vectors.float()
    cal = link_threshold(t, alpha, shape)
    labels = link_occurrences(vectors, cal["threshold"])
    n = int(labels.max()) + 1 if len(labels) else 0
    sizes = np.bincount(labels, minlength=n)
    means = torch.zeros(n, vectors.shape[1]).index_add_(0, torch.as_tensor(labels), vectors)
    means /= torch.as_tensor(sizes, dtype=torch.float32)[:, None]
    cand = np.full((n, t.budget.topk), -1, dtype=np.int64)
    for lo, hi in ((1, 1), (2, 2), (3, 4), (5, 8), (9, None)):
        group = np.flatnonzero((sizes >= lo) & ((sizes <= hi) if hi else True))
        if len(group):
            cand[group] = attack_vectors(t, means[torch.as_tensor(group)], alpha / np.sqrt(lo), shape,
                                         progress)["combined"]
    return {"candidates": cand[labels], "cluster_candidates": cand, "labels": labels, "clusters": n, **cal}


KEYED_FITS = ("trimmed", "isometry")
KEYED_ROUNDS = {"trimmed": 3, "isometry": 30}


def keyed_fit(t: Target) -> str:
    """The fit the public profile calls for: the exact-norm keys without a shear make the writer key a scaled
    isometry (``P P^T = c^2 I``), which :func:`aloe.attacks.key_regression.regress_isometry` fits with far fewer
    right pairs; any other key is fitted by trimmed least squares."""
    prof = t.profile
    return "isometry" if prof.get("keys") == "exact-norm" and not prof.get("embed_shear") else "trimmed"


def attack_keyed(t: Target, vectors: torch.Tensor, start: np.ndarray, shape: str = "row",
                 labels: np.ndarray | None = None, rounds: int | None = None, progress=None,
                 fit: str | None = None) -> dict:
    """Key regression on the received vectors (:mod:`aloe.attacks.key_regression`): the writer key fitted on the
    reading ``start`` (m,) (the linked attack's first choices), every vector mapped back into the plain space, where
    it is the plain row plus the client's fresh noise, and read by its likelihood under that noise against every
    plain token; refitted on that reading, ``rounds`` times at most (:data:`KEYED_ROUNDS` by default; it stops
    earlier once the reading settles). With ``labels`` (m,) (the linked attack's clusters) the occurrences of a cluster
    add their evidence. ``shape`` is the deployment's public noise shape; the level is estimated from the fit's
    residuals. ``fit``: ``trimmed`` (least squares, trimmed) or ``isometry`` (the key as a scaled isometry on the
    span of the pairs it trusts); by default the one the public profile calls for (:func:`keyed_fit`). Returns the
    candidates (m, topk) and what each round did."""
    from aloe.attacks import key_regression

    if shape not in NOISE_SHAPES:
        raise AloeError(f"unknown noise shape {shape!r}; choose one of {', '.join(NOISE_SHAPES)}")
    fit = keyed_fit(t) if fit is None else fit
    if fit not in KEYED_FITS:
        raise AloeError(f"unknown key fit {fit!r}; choose one of {', '.join(KEYED_FITS)}")
    rounds = KEYED_ROUNDS[fit] if rounds is None else rounds
    if fit == "isometry":
        if vectors.shape[0] < t.plain_embed.shape[1]:
            raise AloeError(f"{vectors.shape[0]} vectors cannot fix a key of {t.plain_embed.shape[1]} input "
                            "dimensions")
        cand, log = key_regression.regress_isometry(vectors.double(), t.plain_embed, np.asarray(start),
                                                    t.movable_ids, t.budget.topk, shape == "row", rounds, labels,
                                                    progress)
    else:
        cand, log = key_regression.regress([(vectors.double(), t.plain_embed)], np.asarray(start), t.movable_ids,
                                           t.budget.topk, shape == "row", rounds, labels, progress)
    return {"candidates": cand, "fit": fit, "max_rounds": rounds, **log}


def score_links(labels: np.ndarray, truth: np.ndarray) -> dict:
    """How well the clusters match the tokens: of the pairs of occurrences of one token, the share linked (recall);
    of the pairs linked, the share that are one token (precision)."""
    labels, truth = np.asarray(labels), np.asarray(truth)
    iu = np.triu_indices(len(labels), 1)
    same_t, same_l = truth[iu[0]] == truth[iu[1]], labels[iu[0]] == labels[iu[1]]
    return {"link_recall": float((same_t & same_l).sum() / max(1, same_t.sum())),
            "link_precision": float((same_t & same_l).sum() / max(1, same_l.sum())),
            "tokens": int(len(np.unique(truth))), "clusters": int(len(np.unique(labels)))}
