"""Key regression: the server learns the writer key from a first reading, then reads every row through it.

Every table attack of the suite looks for an invariant the key leaves (the Gram matrix of the rows, the products
with the next layer, the column statistics), because the key itself is secret. But the key is one linear map, the
same for every row: ``E~[tau(j)] = (E[j] + noise) K`` for the embedding (``K`` = P, d x d'), and the head likewise
with its own key. A server that already reads a share of the ids right (the learned matcher reads 59-99% of them)
holds that many pairs (plain row, obfuscated row), and d x d' unknowns are fixed by a few thousand pairs of a
vocabulary of 49,152. So it fits the key by least squares on its reading, maps every obfuscated row back into the
plain space (``y K^+``), where the row is the plain row plus the mechanism's own noise, and reads each one by its
likelihood under that noise against every plain token: a nearest neighbour with the noise's shape, no longer through
an invariant that throws most of the row away.

- **Fit** (:func:`fit_key`): least squares, then trimmed: the pairs with the largest relative residual (a wrong
  reading fits no key) are dropped and the key refitted, ``TRIM_ROUNDS`` times, keeping ``TRIM_KEEP`` of them. Each
  round also reads through the **untrimmed** least-squares key: once the noise dominates the rows, keeping the pairs
  with the smallest residual selects on the noise itself and biases the key, and from a right reading of `paper`'s
  tables at sixteen times its noise the untrimmed key reads 76% where the trimmed one reads 47%.
- **Read** (:func:`read`): the public profile fixes the noise's shape (``entry``: one sigma for every row;
  ``row``: sigma proportional to the row's norm); its level is estimated from the residuals of the pairs kept. The
  score of plain token j for a back-projected row x is the Gaussian log-likelihood
  ``-||x - T[j]||^2 / (2 sigma^2 w_j^2) - d log w_j`` (w_j the row's norm for ``row``, 1 for ``entry``); the
  embedding and the head add their scores when the server holds both.
- **Inverse fit** (:func:`inverse_read`, the table attack's rounds): the trimmed fit needs most of its pairs right,
  because a wrong pair pulls ``K`` anywhere. Fitted the other way, from the obfuscated rows (centred, in the d
  directions they span) to the centred plain rows, a wrong pair is a random plain row: it adds zero-mean noise whose
  covariance is the table's own, and the fit is ``p x + noise`` for a share p of right pairs. Each row is then read
  by its likelihood under that model in the table's whitened space. With it the attack reads 99.99% of SmolLM2's
  `paper` tables from a random start right for 1% of the ids (one right for 0.5% settled on a wrong reading), where
  the trimmed fit alone reads nothing from 10% (``benchmarks/keyreg_limits.py``); from the right reading at sixteen
  times `paper`'s noise its first choices are the least distinct of the three readings.
- **Collisions**: of the rows a reading sends to one plain id at most one is right, so in the inverse fit each pair
  weighs 1 / (the rows read as its plain id): a reading that collapsed on a few ids keeps the rows it reads alone
  (the trimmed fit, which trims by residual, takes every pair as it is).
- **Iterate**: each round makes the three readings (trimmed, untrimmed, inverse; :data:`FITS`) and keeps the one
  with the most distinct first choices (the right reading is a permutation: wrong ones collide). That reading is the
  next round's pairs (at most ``Budget.keyreg_rounds`` rounds; it stops when the first choices no longer change), and
  the attack returns the round with the most distinct first choices, not merely the last. No secret picks any.
- **Start**: the first choices of another per-id attack of the suite (``Budget.keyreg_start``, one of
  :data:`STARTS`; the learned matcher by default).

- **Isometry fit** (:func:`regress_isometry`, the client-held stream's fit for the exact-norm keys): that design
  writes every row through a scaled isometry (``P P^T = c^2 I``), a public property of the profile. A stream repeats
  its frequent tokens, so a first reading right for half the occurrences can be right for a few hundred distinct
  tokens, fewer than the key's d input directions, and least squares then fixes the rest of the key on wrong pairs.
  The isometry fit (:func:`fit_isometry`, scaled orthogonal Procrustes, trimmed) keys only the span of the pairs it
  trusts and reads every vector on that span (:func:`isometry_read`), where no untrusted direction adds noise; the
  next round trusts the vectors whose first choice beats the second by ``TRUST_NATS`` nats, and the span grows
  with what it reads.

No secret is used: the start is another attack's reading, the noise's shape and the key's dimensions are public.
The start matters: fitted on a reading that is right for too few ids, the key is noise and so is the read
(``benchmarks/keyreg_limits.py`` measures the share it needs). The trimmed fit and its read also serve the
client-held deployment's received vectors (:func:`aloe.attacks.occurrence.attack_keyed`, with the isometry fit
where the profile's keys are exact-norm and unsheared); the inverse fit is not
used there, since the occurrences of a stream are not a uniform draw of the vocabulary and its centring needs one,
and a stream repeats its tokens, so distinct first choices do not rank its readings.
"""

from __future__ import annotations

import numpy as np
import torch

from aloe import AloeError
from aloe.attacks.common import Target
from aloe.attacks.scoring import IdGuess

TRIM_ROUNDS = 3
TRIM_KEEP = 0.5
TRUST_NATS = 5.0    # the isometry fit's rounds trust a row whose first choice beats its second by this many nats
SETTLED = 1e-3      # ... and stop once this share of the first choices, or less, changes in a round
CHUNK = 512
FITS = ("trimmed", "untrimmed", "inverse")  # the readings a round can make: see regress
STARTS = ("learned", "vma", "ia", "nn", "anchored", "behavioural")  # per-id attacks over the tables' rows


def collision_weights(guess: np.ndarray) -> torch.Tensor:
    """1 / (the number of rows read as the same plain id), for each row: of the rows a reading sends to one plain id,
    at most one is right, so a reading that collapses on a few ids does not let them pull the fit."""
    _, inverse, counts = np.unique(np.asarray(guess), return_inverse=True, return_counts=True)
    return torch.as_tensor(1.0 / counts[inverse], dtype=torch.float64)


def _weighted_lstsq(A: torch.Tensor, B: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """argmin_M sum_i w_i ||A_i M - B_i||^2."""
    r = w.sqrt()[:, None]
    return torch.linalg.lstsq(A * r, B * r).solution


def fit_key(plain_rows: torch.Tensor, obf_rows: torch.Tensor, trim_rounds: int = TRIM_ROUNDS,
            keep: float = TRIM_KEEP) -> tuple[torch.Tensor, torch.Tensor]:
    """The key K (d x d') with ``obf_rows ~ plain_rows @ K`` by trimmed least squares, and the mask of the pairs the
    last fit kept. Each trim keeps the share ``keep`` of the pairs with the smallest residual relative to the
    obfuscated row's norm."""
    X, Y = plain_rows.double(), obf_rows.double()
    if X.shape[0] != Y.shape[0]:
        raise AloeError(f"{X.shape[0]} plain rows against {Y.shape[0]} obfuscated rows")
    if not 0 < keep <= 1:
        raise AloeError(f"the share of pairs kept must be in (0, 1], not {keep}")
    if X.shape[0] < X.shape[1]:
        raise AloeError(f"{X.shape[0]} pairs cannot fix a key of {X.shape[1]} input dimensions")
    kept = torch.ones(X.shape[0], dtype=torch.bool)
    K = torch.linalg.lstsq(X, Y).solution
    for _ in range(trim_rounds):
        rel = ((X @ K - Y) ** 2).sum(1) / (Y * Y).sum(1).clamp_min(1e-30)
        trimmed = rel <= rel.quantile(keep)
        if int(trimmed.sum()) < X.shape[1]:  # too few pairs left: keep the last fit and the pairs it used
            break
        kept = trimmed
        K = torch.linalg.lstsq(X[kept], Y[kept]).solution
    return K, kept


def back_project(obf_rows: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The rows mapped back into the plain space: the least-squares x of ``x @ key = y`` for every row y."""
    return obf_rows.double() @ torch.linalg.pinv(key.double())


def _weights(table: torch.Tensor, row_shaped: bool) -> torch.Tensor:
    return table.norm(dim=1).clamp_min(1e-12) if row_shaped else torch.ones(table.shape[0], dtype=table.dtype)


def noise_level(xhat: torch.Tensor, table: torch.Tensor, guess: np.ndarray, row_shaped: bool) -> float:
    """sigma^2 per coordinate of the noise left in the back-projected rows, from the residuals of the reading
    ``guess`` (the median, so the wrong readings do not count)."""
    w = _weights(table, row_shaped).double()
    g = torch.as_tensor(guess)
    res = ((xhat - table[g].double()) ** 2).sum(1) / w[g] ** 2
    return max(float(res.median()) / table.shape[1], 1e-30)


def log_likelihoods(xhat: torch.Tensor, table: torch.Tensor, pool: np.ndarray, sigma2: float,
                    row_shaped: bool, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(m, len(pool)): the Gaussian log-likelihood of every back-projected row under every plain token of ``pool``
    (constant terms dropped). The noise of token j has ``sigma2 * w_j^2`` per coordinate, ``w_j`` its row's norm
    (``row_shaped``) or 1, or ``weights[j]`` where given (a table read in another space than its rows' own)."""
    T = table[torch.as_tensor(pool)].float()
    w2 = (_weights(T, row_shaped) if weights is None else weights[torch.as_tensor(pool)].float()) ** 2
    x = xhat.float()
    d2 = ((x * x).sum(1, keepdim=True) + (T * T).sum(1)[None] - 2 * x @ T.T).clamp_min(0)
    return -d2 / (2 * sigma2 * w2[None]) - 0.5 * T.shape[1] * torch.log(w2)[None]


def read(sides: list[tuple[torch.Tensor, torch.Tensor, float]], pool: np.ndarray, k: int, row_shaped: bool,
         groups: np.ndarray | None = None) -> np.ndarray:
    """Top-``k`` plain ids of ``pool`` for each row, by the summed log-likelihood over ``sides`` (each a
    back-projected (m, d) block, its plain table and its sigma^2, and optionally the tokens' noise weights of
    :func:`log_likelihoods`). With ``groups`` (m,), rows of one group are taken as occurrences of one token: their
    scores add, and every row gets its group's candidates."""
    m = sides[0][0].shape[0]
    k = min(k, len(pool))
    pool_t = torch.as_tensor(pool)
    if groups is None:
        out = []
        for s in range(0, m, CHUNK):
            score = sum(log_likelihoods(x[s:s + CHUNK], T, pool, s2, row_shaped, *w) for x, T, s2, *w in sides)
            out.append(pool_t[score.topk(k, dim=1).indices])
        return torch.cat(out).numpy() if out else np.zeros((0, k), dtype=np.int64)
    groups = np.asarray(groups)
    n = int(groups.max()) + 1 if m else 0
    total = torch.zeros(n, len(pool))
    for s in range(0, m, CHUNK):
        score = sum(log_likelihoods(x[s:s + CHUNK], T, pool, s2, row_shaped, *w) for x, T, s2, *w in sides)
        total.index_add_(0, torch.as_tensor(groups[s:s + CHUNK]), score)
    return pool_t[total.topk(k, dim=1).indices].numpy()[groups]


class InverseSide:
    """One table prepared for the inverse fit: the obfuscated rows centred and reduced to the ``d`` directions they
    span (``Z``, m x d), the plain table centred on the pool's mean, and the inverse of the pool's covariance."""

    def __init__(self, obf_rows: torch.Tensor, table: torch.Tensor, pool: np.ndarray):
        d = table.shape[1]
        if obf_rows.shape[0] <= d or obf_rows.shape[1] < d:
            raise AloeError(f"{obf_rows.shape[0]} obfuscated rows of width {obf_rows.shape[1]} cannot fix an inverse "
                            f"key onto {d} plain dimensions")
        Y = obf_rows.double()
        Y = Y - Y.mean(0)
        _, vecs = torch.linalg.eigh(Y.T @ Y)              # ascending: the last d span the rows
        self.Z = Y @ vecs[:, -d:]
        T = table.double()
        self.centred = T - T[torch.as_tensor(pool)].mean(0)
        P = self.centred[torch.as_tensor(pool)]
        C = P.T @ P / len(pool)
        self.W = torch.linalg.inv(C + 1e-9 * torch.trace(C) / d * torch.eye(d, dtype=C.dtype))

    def fit(self, guess: np.ndarray) -> tuple[torch.Tensor, float, float]:
        """The rows mapped into the plain space by the inverse key fitted on ``guess`` (pairs weighted by
        :func:`collision_weights`), their slope ``p`` on the guessed rows and the noise variance ``c`` per whitened
        coordinate (the weighted median over the pairs)."""
        X = self.centred[torch.as_tensor(guess)]
        w = collision_weights(guess)
        xhat = self.Z @ _weighted_lstsq(self.Z, X, w)
        p = max(float((w * (xhat * X).sum(1)).sum() / (w * (X * X).sum(1)).sum().clamp_min(1e-30)), 1e-9)
        r = xhat - p * X
        res, order = ((r @ self.W) * r).sum(1).sort()
        cum = w[order].cumsum(0)
        median = res[int(torch.searchsorted(cum, cum[-1] / 2))]     # the weighted median
        c = max(float(median) / X.shape[1], 1e-30)
        return xhat, p, c


def inverse_read(sides: list[InverseSide], guess: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` plain ids of ``pool`` for each row through the inverse fits on ``guess``: the score of token t is the
    log-likelihood of ``xhat = p t + noise``, noise of covariance c times the table's, summed over the sides
    (``(p xhat W t - p^2 t W t / 2) / c``, W the inverse covariance)."""
    k = min(k, len(pool))
    pool_t = torch.as_tensor(pool)
    parts = []
    for side in sides:
        xhat, p, c = side.fit(guess)
        T = side.centred[pool_t]
        TW = T @ side.W
        parts.append(((p / c) * xhat.float(), TW.float(), (-0.5 * p * p / c * (TW * T).sum(1)).float()))
    out = []
    for s in range(0, sides[0].Z.shape[0], CHUNK):
        score = sum(x[s:s + CHUNK] @ TW.T + bias[None] for x, TW, bias in parts)
        out.append(pool_t[score.topk(k, dim=1).indices])
    return torch.cat(out).numpy()


def fit_isometry(plain_rows: torch.Tensor, obf_rows: torch.Tensor, trim_rounds: int = TRIM_ROUNDS,
                 keep: float = TRIM_KEEP, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """The key as the exact-norm design writes it, a scaled isometry (``P P^T = c^2 I``), fitted on the span of the
    plain rows: ``Q`` (r x d), an orthonormal basis of the span of the pairs kept, and ``A`` (r x d') with
    ``A A^T = c^2 I`` minimising ``||X Q^T A - Y||`` (scaled orthogonal Procrustes: ``A = c U V^T`` from the SVD of
    ``(X Q^T)^T Y``). Trimmed as :func:`fit_key`: each trim keeps the share ``keep`` of the pairs with the smallest
    residual relative to the obfuscated row's norm (a pair whose plain row leaves the span counts that part as
    residual). Returns Q, A, c and the mask of the pairs the last fit used."""
    X, Y = plain_rows.double(), obf_rows.double()
    if X.shape[0] != Y.shape[0]:
        raise AloeError(f"{X.shape[0]} plain rows against {Y.shape[0]} obfuscated rows")
    if X.shape[0] < 2:
        raise AloeError(f"{X.shape[0]} pairs cannot fix a key")
    if not 0 < keep <= 1:
        raise AloeError(f"the share of pairs kept must be in (0, 1], not {keep}")

    def procrustes(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        Xk = X[idx]
        _, sv, vh = torch.linalg.svd(Xk, full_matrices=False)
        Q = vh[: int((sv > tol * sv[0]).sum())]
        Xs = Xk @ Q.T
        U, S, Vh = torch.linalg.svd(Xs.T @ Y[idx], full_matrices=False)
        c = float(S.sum() / (Xs * Xs).sum().clamp_min(1e-30))
        return Q, c * U @ Vh, c

    kept = torch.ones(X.shape[0], dtype=torch.bool)
    Q, A, c = procrustes(kept)
    for _ in range(trim_rounds):
        rel = ((X @ Q.T @ A - Y) ** 2).sum(1) / (Y * Y).sum(1).clamp_min(1e-30)
        trimmed = rel <= rel.quantile(keep)
        if int(trimmed.sum()) < 2:
            break
        kept = trimmed
        Q, A, c = procrustes(kept)
    return Q, A, c, kept


def isometry_read(z: torch.Tensor, Q: torch.Tensor, table: torch.Tensor, pool: np.ndarray, sigma2: float, k: int,
                  row_shaped: bool, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` plain ids of ``pool`` for each row's coordinates ``z`` (m, r) on the span ``Q`` (r x d), by the
    Gaussian log-likelihood of ``z`` around every plain row's coordinates (noise of variance sigma^2 w_j^2 in each of
    the r coordinates, w_j the full row's norm for ``row`` noise); and the margin of the first choice over the
    second, in nats. With ``groups`` the rows of a group add their scores, as in :func:`read`."""
    k = min(max(k, 2), len(pool))
    pool_t = torch.as_tensor(pool)
    T = table[pool_t].double()
    Tq = (T @ Q.T).float()
    w2 = (_weights(T, row_shaped) ** 2).float()
    r = Q.shape[0]
    zf = z.float()
    bias = (-(Tq * Tq).sum(1) / (2 * sigma2 * w2) - 0.5 * r * torch.log(w2))[None]

    def score(s: int) -> torch.Tensor:
        x = zf[s:s + CHUNK]
        return (x @ Tq.T) / (sigma2 * w2[None]) - (x * x).sum(1, keepdim=True) / (2 * sigma2 * w2[None]) + bias

    m = z.shape[0]
    if groups is None:
        tops = [score(s).topk(k, dim=1) for s in range(0, m, CHUNK)]
        values = torch.cat([t.values for t in tops]) if tops else torch.zeros(0, k)
        idx = torch.cat([t.indices for t in tops]) if tops else torch.zeros(0, k, dtype=torch.long)
        return pool_t[idx].numpy(), (values[:, 0] - values[:, 1]).numpy()
    groups = np.asarray(groups)
    total = torch.zeros(int(groups.max()) + 1 if m else 0, len(pool))
    for s in range(0, m, CHUNK):
        total.index_add_(0, torch.as_tensor(groups[s:s + CHUNK]), score(s))
    top = total.topk(k, dim=1)
    return pool_t[top.indices].numpy()[groups], (top.values[:, 0] - top.values[:, 1]).numpy()[groups]


def regress_isometry(Y: torch.Tensor, table: torch.Tensor, start: np.ndarray, pool: np.ndarray, k: int,
                     row_shaped: bool, rounds: int, groups: np.ndarray | None = None, progress=None,
                     trust_nats: float = TRUST_NATS, settled: float = SETTLED) -> tuple[np.ndarray, dict]:
    """The rounds of fit and read for a key the public design makes a scaled isometry (the exact-norm keys without
    a shear). Each round fits the key on the pairs it trusts (:func:`fit_isometry`, trimmed), only on the span of
    their plain rows, reads every row there (:func:`isometry_read`: the directions no trusted pair reaches add no
    noise to the read), and trusts next the rows whose first choice beats the second by ``trust_nats`` or more; the
    first round trusts every pair of ``start``. A reading right for few distinct tokens (a stream repeats its
    frequent ones) fixes the key on few directions only; the span grows as the read finds more of them. It stops
    when the share of first choices that changed is ``settled`` or less. Returns the last round's candidates (m, k)
    and what each round did."""
    if rounds < 1:
        raise AloeError(f"key regression needs at least 1 round, not {rounds}")
    guess = np.asarray(start, dtype=np.int64)
    if guess.shape != (Y.shape[0],):
        raise AloeError("the start must give one plain id per obfuscated row")
    Y = Y.double()
    trust = np.ones(len(guess), dtype=bool)
    log: dict = {"changed_per_round": [], "kept_per_round": [], "sigma_per_round": [], "trusted_per_round": [],
                 "span_per_round": []}
    cand = guess[:, None]
    for _ in range(rounds):
        idx = np.flatnonzero(trust)
        if len(idx) < 2:
            break
        X = table[torch.as_tensor(guess[idx])].double()
        Q, A, c, kept = fit_isometry(X, Y[idx])
        z = Y @ A.T / c ** 2
        ki = idx[kept.numpy()]
        Xk = table[torch.as_tensor(guess[ki])].double()
        res = ((z[torch.as_tensor(ki)] - Xk @ Q.T) ** 2).sum(1) / _weights(Xk, row_shaped) ** 2
        s2 = max(float(res.median()) / Q.shape[0], 1e-30)
        cand, margin = isometry_read(z, Q, table, pool, s2, k, row_shaped, groups)
        changed = float((cand[:, 0] != guess).mean())
        log["changed_per_round"].append(changed)
        log["kept_per_round"].append([float(kept.double().mean())])
        log["sigma_per_round"].append([float(np.sqrt(s2))])
        log["span_per_round"].append(int(Q.shape[0]))
        guess = cand[:, 0]
        trust = margin >= trust_nats
        log["trusted_per_round"].append(float(trust.mean()))
        if progress is not None:
            progress.update(1)
        if changed <= settled:
            break
    log["rounds"] = len(log["changed_per_round"])
    return cand, log


def distinct_share(first: np.ndarray) -> float:
    """The share of distinct ids among a reading's first choices (1 for a permutation)."""
    return len(np.unique(first)) / max(1, len(first))


def regress(sides: list[tuple[torch.Tensor, torch.Tensor]], start: np.ndarray, pool: np.ndarray, k: int,
            row_shaped: bool, rounds: int, groups: np.ndarray | None = None, progress=None,
            on_round=None, fits: tuple[str, ...] = ("trimmed",)) -> tuple[np.ndarray, dict]:
    """The rounds of fit and read. ``sides``: (obfuscated rows (m, d'), plain table (vocab, d)) per table; ``start``
    (m,) the first reading. ``fits``: the readings each round makes, of :data:`FITS` (``inverse`` needs rows of
    distinct tokens, no ``groups``); with more than one, each round keeps the reading with the most distinct first
    choices, and the round with the most is returned (with one, the last round). Returns the candidates (m, k) and
    what each round did. ``on_round(reading)``, if given, sees each round's first choices as the round ends (a
    benchmark scores them; the attack does not need it)."""
    if rounds < 1:
        raise AloeError(f"key regression needs at least 1 round, not {rounds}")
    fits = tuple(fits)
    if not fits or len(set(fits)) != len(fits) or any(f not in FITS for f in fits):
        raise AloeError(f"the fits must be distinct names among {', '.join(FITS)}, not {', '.join(fits) or 'none'}")
    guess = np.asarray(start, dtype=np.int64)
    if guess.shape != (sides[0][0].shape[0],):
        raise AloeError("the start must give one plain id per obfuscated row")
    if "inverse" in fits and groups is not None:
        raise AloeError("the inverse fit reads rows of distinct tokens, not groups of occurrences")
    choose = len(fits) > 1
    log: dict = {"changed_per_round": [], "kept_per_round": [], "sigma_per_round": []}
    inv_sides = [InverseSide(Y, T, pool) for Y, T in sides] if "inverse" in fits else None
    if choose:
        log.update(fit_per_round=[], distinct_per_round=[])
    best, best_share = None, -1.0
    cand = guess[:, None]
    for _ in range(rounds):
        readings, stats = {}, {}
        for fit in fits:
            if fit == "inverse":
                readings[fit] = inverse_read(inv_sides, guess, pool, k)
                continue
            blocks, kept_share, sigmas = [], [], []
            for Y, T in sides:
                K, kept = fit_key(T[torch.as_tensor(guess)], Y, TRIM_ROUNDS if fit == "trimmed" else 0)
                xhat = back_project(Y, K)
                s2 = noise_level(xhat, T, guess, row_shaped)
                blocks.append((xhat, T, s2))
                kept_share.append(float(kept.double().mean()))
                sigmas.append(float(np.sqrt(s2)))
            readings[fit] = read(blocks, pool, k, row_shaped, groups)
            stats[fit] = (kept_share, sigmas)
        fit = fits[0]
        if choose:
            shares = {f: distinct_share(r[:, 0]) for f, r in readings.items()}
            fit = max(shares, key=shares.get)
            log["fit_per_round"].append(fit)
            log["distinct_per_round"].append(shares)
            if shares[fit] > best_share:
                best, best_share = readings[fit], shares[fit]
        cand = readings[fit]
        kept_share, sigmas = stats.get(fit) or next(iter(stats.values()), ([], []))   # the forward fit's figures
        changed = float((cand[:, 0] != guess).mean())
        log["changed_per_round"].append(changed)
        log["kept_per_round"].append(kept_share)
        log["sigma_per_round"].append(sigmas)
        guess = cand[:, 0]
        if on_round is not None:
            on_round(guess)
        if progress is not None:
            progress.update(1)
        if changed == 0:
            break
    log["rounds"] = len(log["changed_per_round"])
    if choose:
        log["best_round"] = next(i for i, sh in enumerate(log["distinct_per_round"]) if max(sh.values()) == best_share)
        cand = best
    return cand, log


@torch.no_grad()
def attack(t: Target, start: IdGuess, progress=None) -> IdGuess:
    """Key regression over the server's tables, started from another attack's reading ``start`` (its first choice
    of every attacked id). Reads the same ids; the candidate pool is every movable plain id."""
    ids = np.asarray(start.obf_ids)
    k = t.budget.topk
    held = t.held_rows[torch.as_tensor(ids)]
    if int(held.sum()) < t.plain_embed.shape[1]:  # the client keeps the tables: no rows to fit a key on
        return IdGuess(ids, -np.ones((len(ids), k), dtype=np.int64), uniform=start.uniform,
                       extra={"rows_held": int(held.sum())})
    row_shaped = t.profile.get("noise_shape", "entry") == "row"
    first = np.asarray(start.candidates)[:, 0]
    if (first < 0).any():
        raise AloeError("the start reading has ids without a guess")
    sides = [(t.obf_embed[torch.as_tensor(ids)], t.plain_embed)]
    if t.head_held:
        sides.append((t.obf_head[torch.as_tensor(ids)], t.plain_head))
    cand, log = regress(sides, first, t.movable_ids, k, row_shaped, t.budget.keyreg_rounds, progress=progress,
                        fits=FITS)
    return IdGuess(ids, cand, uniform=start.uniform,
                   extra={"start_pred": first, "sides": len(sides), **log})
