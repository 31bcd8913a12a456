"""Learned matching: the server learns the map from obfuscated to plain ids on copies it obfuscates itself.

VMA, IA and NN match hand-made key-invariant signatures by nearest neighbour, so they are only as good as the
attacker's guess of what the noise does to them. Here the attacker *measures* it. The mechanism and the profile are
public (``aloe.json``), so it obfuscates the plain model itself ``budget.learned_draws`` times with keys and noise it
draws (:func:`aloe.attacks.ima.own_obfuscation`; a profile with ``adapt_steps`` is built without its fine-tuning,
the client's expensive step). For its own copies it knows the true plain id of every row (its own tau).

1. **Features** per obfuscated row, computed the same way on the victim's artifact and on every own copy:

   - *weights*: the VMA pair signatures (:func:`aloe.attacks.vma.view_signatures`) and the gate-IA and
     attention-IA invariants (:func:`aloe.attacks.ia.view_invariants`);
   - *states* (``budget.learned_state_ids``: 0 = every row, n = a uniform sample of n attacked ids and of n rows of
     each own copy, -1 = none): the model run on the token alone; for the hidden states h_0..h_L (h_L taken before
     the final norm) the log norm of each relative to their mean over layers and the cosine of every pair of layers.
     Under the exact-norm keys every residual state is written by one scaled isometry, so these are exact
     invariants; under other keys approximate ones.

   The plain side is the same features of every plain token, noise-free (its states are cached per plain model).
   Each feature family is projected on principal axes of the plain side.
2. **Whitening**: the residuals (own-copy features - plain features of the same token) give the noise's mean and
   covariance; both sides are whitened by its Cholesky factor (the weights block first, so a row without a states
   block is whitened exactly by the marginal of its weights block). Nearest neighbour in that space is the
   non-neural baseline (``whitened_token_recovery``): the Bayes rule for Gaussian noise.
3. **Learning**: a two-tower model, starting from that baseline: a residual MLP on the obfuscated features and a
   linear map on the plain ones, scored by a Gaussian log-likelihood with a learned temperature, trained with a
   cross-entropy over the *whole* plain vocabulary on the own copies (``budget.learned_steps``). With two or more
   copies the last one is held out, and the checkpoint (step 0, the baseline, included) that recovers most of it is
   kept. The model is then applied to the victim's features; its top-k is the guess.

The attacker's randomness (column samples, rows, initial weights, batches) comes from ``budget.rng``; the secret is
never read.
"""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe import AloeError
from aloe.attacks import ia, vma
from aloe.attacks.common import Target, pca_project, standardise
from aloe.attacks.ima import load, own_obfuscation
from aloe.attacks.scoring import IdGuess

PCA_DIMS = {"vma": 96, "ia": 64, "states": 64}  # principal axes kept per feature family
WIDTH = 256        # hidden width of the obfuscated tower
BATCH = 256        # training rows per step
VAL_ROWS = 4096    # held-out own-copy rows scored per validation
SNR_CAP = 1e4      # the noise variance of a feature is at least its plain variance / SNR_CAP


# ---- states block -----------------------------------------------------------------------------------------------
def state_invariants(h: torch.Tensor) -> torch.Tensor:
    """(b, L+1, d) hidden states of single-token inputs -> (b, L+1 + (L+1)L/2) features: the log norm of each layer
    relative to the mean over layers, and the cosine of every pair of layers (upper triangle of the Gram)."""
    ln = h.norm(dim=-1).clamp_min(1e-12).log()
    hn = torch.nn.functional.normalize(h, dim=-1)
    gram = hn @ hn.transpose(1, 2)
    iu = torch.triu_indices(h.shape[1], h.shape[1], 1)
    return torch.cat([ln - ln.mean(1, keepdim=True), gram[:, iu[0], iu[1]]], 1)


@torch.no_grad()
def state_features(model_dir, table: torch.Tensor, ids: np.ndarray, batch: int, desc: str = "learned/states",
                   progress: bool = False) -> torch.Tensor:
    """The states features of the rows ``ids`` of the embedding ``table``, each run through the model at
    ``model_dir`` as a sequence of one token (batched)."""
    model = load(model_dir)
    cap = {}
    hook = model.model.norm.register_forward_hook(lambda mod, args, out: cap.__setitem__("last", args[0]))
    out = []
    try:
        for s in tqdm(range(0, len(ids), batch), desc=desc, disable=not progress, leave=False, unit="batch"):
            x = table[torch.as_tensor(ids[s:s + batch])][:, None].to(model.dtype)
            hs = model.model(inputs_embeds=x, output_hidden_states=True).hidden_states
            out.append(state_invariants(torch.stack([*hs[:-1], cap["last"]], 1)[:, :, 0].float()))
    finally:
        hook.remove()
    return torch.cat(out) if out else torch.zeros(0, 0)


def plain_states(t: Target, progress: bool) -> torch.Tensor:
    """The states features of every plain token, cached per plain model (they depend on nothing else)."""
    from aloe.assets.cache import cache_root

    key = hashlib.sha256(f"{t._plain.fingerprint()}|learned-states|v1".encode()).hexdigest()[:20]
    path = cache_root() / "attacks" / f"learned-states-{key}.pt"
    if path.is_file():
        return torch.load(path)
    feats = state_features(t.plain_dir, t.plain_embed, np.arange(t.arch.vocab), t.budget.batch,
                           "learned/plain states", progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(feats, tmp)
    tmp.replace(path)
    return feats


# ---- whitening --------------------------------------------------------------------------------------------------
def _shrunk_cov(r: torch.Tensor, n_dims: int) -> torch.Tensor:
    """Sample covariance of the (centred) rows ``r``, shrunk towards its diagonal when rows are few."""
    n = r.shape[0]
    cov = r.T @ r / max(1, n - 1)
    rho = min(0.5, n_dims / (n + n_dims))
    return (1 - rho) * cov + rho * torch.diag(torch.diag(cov))


def noise_whitener(resid: torch.Tensor, with_states: torch.Tensor, n_weights: int, plain: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and lower Cholesky factor of the noise covariance estimated from ``resid`` (rows: own-copy features
    minus plain features of the same token; the dims past ``n_weights`` are the states block, known for the rows
    ``with_states`` only): the weights block from every row, the states block and its cross-covariance from the
    rows that have it; each shrunk towards its diagonal for small samples and floored at the plain variance over
    ``SNR_CAP``."""
    r = resid.double()
    D, w = r.shape[1], n_weights
    rw = r[:, :w]
    mu = torch.zeros(D, dtype=torch.float64)
    mu[:w] = rw.mean(0)
    cov = torch.zeros(D, D, dtype=torch.float64)
    cov[:w, :w] = _shrunk_cov(rw - mu[:w], w)
    if D > w and bool(with_states.any()):
        rs = r[with_states]
        mu[w:] = rs[:, w:].mean(0)
        full = _shrunk_cov(rs - mu, D)
        cov[w:, w:] = full[w:, w:]
        cov[:w, w:], cov[w:, :w] = full[:w, w:], full[w:, :w]
    cov = cov + torch.diag(plain.double().var(0) / SNR_CAP + 1e-12)
    L, info = torch.linalg.cholesky_ex(cov)
    jitter = float(torch.diag(cov).mean()) * 1e-6
    while int(info) != 0:  # the blocks come from different rows: make the assembled matrix positive definite
        cov = cov + jitter * torch.eye(D, dtype=torch.float64)
        jitter *= 10
        L, info = torch.linalg.cholesky_ex(cov)
    return mu.float(), L.float()


def whiten(x: torch.Tensor, L: torch.Tensor, mu: torch.Tensor | None = None) -> torch.Tensor:
    return torch.linalg.solve_triangular(L, (x if mu is None else x - mu).T, upper=False).T


# ---- the two-tower matcher --------------------------------------------------------------------------------------
class Matcher(torch.nn.Module):
    """``f(z, m) = z + s * MLP(z / s, m)`` for an obfuscated row (m: it has a states block), ``g(p) = p + s * ((p /
    s) A + c)`` for a plain one, score ``-exp(temp) / 2 * ||f - g||^2`` over the dims the row has. Starts at the
    identity (the whitened nearest neighbour)."""

    def __init__(self, dim: int, n_weights: int, scale: torch.Tensor, generator: torch.Generator):
        super().__init__()
        self.n_weights = n_weights
        self.register_buffer("scale", scale)
        self.w1 = torch.nn.Parameter(torch.randn(dim + 1, WIDTH, generator=generator) / math.sqrt(dim + 1))
        self.b1 = torch.nn.Parameter(torch.zeros(WIDTH))
        self.w2 = torch.nn.Parameter(torch.zeros(WIDTH, dim))
        self.b2 = torch.nn.Parameter(torch.zeros(dim))
        self.a = torch.nn.Parameter(torch.zeros(dim, dim))
        self.c = torch.nn.Parameter(torch.zeros(dim))
        self.temp = torch.nn.Parameter(torch.zeros(()))

    def dim_mask(self, m: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(len(m), self.scale.shape[0])
        keep[:, self.n_weights:] = m[:, None]
        return keep

    def obf(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        keep = self.dim_mask(m)
        h = torch.nn.functional.gelu(torch.cat([z / self.scale * keep, m[:, None]], 1) @ self.w1 + self.b1)
        return (z + self.scale * (h @ self.w2 + self.b2)) * keep

    def plain(self, p: torch.Tensor) -> torch.Tensor:
        return p + self.scale * ((p / self.scale) @ self.a + self.c)

    def logits(self, z: torch.Tensor, m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        w = self.n_weights
        f = self.obf(z, m)
        sq_w, sq_s = (g[:, :w] ** 2).sum(1), (g[:, w:] ** 2).sum(1)
        return self.temp.exp() * (f @ g.T - 0.5 * (sq_w[None] + m[:, None] * sq_s[None]))


def identity_logits(z: torch.Tensor, m: torch.Tensor, p: torch.Tensor, n_weights: int) -> torch.Tensor:
    """The whitened nearest neighbour as scores: ``-||z - p||^2 / 2`` over the dims each row has."""
    zm = z.clone()
    zm[:, n_weights:] *= m[:, None]
    sq_w, sq_s = (p[:, :n_weights] ** 2).sum(1), (p[:, n_weights:] ** 2).sum(1)
    return zm @ p.T - 0.5 * (sq_w[None] + m[:, None] * sq_s[None])


def topk_in_batches(score_fn, n: int, k: int, batch: int = 1024) -> torch.Tensor:
    out = [score_fn(slice(s, s + batch)).topk(k, dim=1).indices for s in range(0, n, batch)]
    return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.long)


def train(z: torch.Tensor, m: torch.Tensor, y: torch.Tensor, p: torch.Tensor, n_weights: int, steps: int,
          generator: torch.Generator, val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
          progress=None) -> tuple[Matcher, dict]:
    """Fit the matcher on own-copy rows ``z`` (mask ``m``, plain ids ``y``) against every plain row ``p``; with
    ``val``, keep the checkpoint that recovers most of the held-out rows."""
    model = Matcher(p.shape[1], n_weights, p.std(0).clamp_min(1e-6), generator)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    every = max(1, steps // 10)

    def accuracy() -> float:
        zv, mv, yv = val
        with torch.no_grad():
            g = model.plain(p)
            pred = topk_in_batches(lambda s: model.logits(zv[s], mv[s], g), len(zv), 1)[:, 0]
        return float((pred == yv).float().mean())

    best = (accuracy(), 0, copy.deepcopy(model.state_dict())) if val is not None else None
    loss = torch.zeros(())
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(z), (min(BATCH, len(z)),), generator=generator)
        loss = torch.nn.functional.cross_entropy(model.logits(z[idx], m[idx], model.plain(p)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
        if val is not None and (step % every == 0 or step == steps):
            acc = accuracy()
            if acc > best[0]:
                best = (acc, step, copy.deepcopy(model.state_dict()))
    info = {"final_loss": float(loss.detach())}
    if best is not None:
        model.load_state_dict(best[2])
        info.update(best_step=best[1], own_validation_token_recovery=best[0])
    model.eval()
    return model, info


# ---- the attack -------------------------------------------------------------------------------------------------
def _check(b) -> None:
    if b.learned_steps < 0:
        raise AloeError(f"learned_steps must be >= 0 (got {b.learned_steps})")
    if b.learned_state_ids < -1:
        raise AloeError(f"learned_state_ids must be -1 (no states), 0 (all) or a count (got {b.learned_state_ids})")
    if b.learned_draws < 1:
        raise AloeError(f"learned_draws must be >= 1 (got {b.learned_draws})")


def _state_rows(n_s: int, n_victim: int, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Which of ``n_rows`` rows get a states block: all (n_s = 0 or at least the victim's row count), none (-1), or
    a uniform sample of n_s."""
    if n_s < 0:
        return np.zeros(n_rows, dtype=bool)
    keep = np.ones(n_rows, dtype=bool)
    if 0 < n_s < n_victim and n_s < n_rows:
        keep[:] = False
        keep[rng.choice(n_rows, size=n_s, replace=False)] = True
    return keep


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None) -> IdGuess:
    b = t.budget
    _check(b)
    q_ids, uniform = t.query_ids(must=received)
    k = b.topk
    if not bool(t.held_rows.any()):  # the client holds both tables and sent nothing yet: nothing to match
        return IdGuess(q_ids, -np.ones((len(q_ids), k), dtype=np.int64), uniform=uniform)
    rng = b.rng("learned")
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
    show = progress is not None

    # own copies: the same public profile, the attacker's keys and noise, no adaptation
    owns = []
    for draw in range(b.learned_draws):
        own_dir, own_tau = own_obfuscation(t, draw, adapt=False)
        owns.append((Target(t.plain_dir, own_dir, b), own_tau))
    train_plain = t.movable_ids
    views = [(t, q_ids)] + [(own, tau[train_plain]) for own, tau in owns]

    # weights block (VMA signatures, IA invariants), plain side noise-free
    P, O, _ = vma.view_signatures(t, views, progress, plain_noise=False)
    (gp, ap), ia_views = ia.view_invariants(t, views, progress, plain_noise=False)
    plain_f = {"vma": torch.cat(P, 1), "ia": torch.cat([gp, ap], 1)}
    view_f = [{"vma": torch.cat(o, 1), "ia": torch.cat(iv, 1)} for o, iv in zip(O, ia_views)]

    # states block, for every row or a uniform sample
    has = [_state_rows(b.learned_state_ids, len(q_ids), len(ids), rng) for _, ids in views]
    if b.learned_state_ids >= 0:
        sp = plain_states(t, show)
        for (v, ids), f, keep in zip(views, view_f, has):
            s = torch.zeros(len(ids), sp.shape[1])
            if keep.any():
                s[torch.as_tensor(keep)] = state_features(v.obf_dir, v.obf_embed, ids[keep], b.batch,
                                                          progress=show)
            f["states"] = standardise(sp, s)[1]
        plain_f["states"] = standardise(sp, sp)[0]

    # principal axes of each family, fitted on the plain side
    fams = [f for f in PCA_DIMS if f in plain_f]
    dims, plain_blocks, view_blocks = {}, [], [[] for _ in views]
    for fam in fams:
        dim = min(PCA_DIMS[fam], max(4, t.arch.vocab // 4))
        p, o = pca_project(plain_f[fam], torch.cat([f[fam] for f in view_f]), dim, generator=gen)
        dims[fam] = p.shape[1]
        plain_blocks.append(p)
        for i, part in enumerate(torch.split(o, [len(ids) for _, ids in views])):
            view_blocks[i].append(part)
    x_plain = torch.cat(plain_blocks, 1)
    x_views = [torch.cat(v, 1) for v in view_blocks]
    n_w = sum(d for f, d in dims.items() if f != "states")
    masks = [torch.as_tensor(h, dtype=torch.float32) for h in has]

    # noise of the own copies: residuals against the plain features of the same tokens
    n_train = len(owns) - 1 if len(owns) > 1 else 1  # with 2+ copies the last one is held out
    tr, va = list(range(1, 1 + n_train)), list(range(1 + n_train, len(views)))
    y_own = torch.as_tensor(train_plain)
    resid = torch.cat([x_views[i] - x_plain[y_own] for i in tr])
    mu, L = noise_whitener(resid, torch.cat([masks[i] > 0 for i in tr]), n_w, x_plain)
    z_plain = whiten(x_plain, L)
    z_views = [whiten(x, L, mu) for x in x_views]

    # training rows: every row with the dims it has; where the victim lacks states for some rows, rows with a states
    # block also count once without it (so that mode is trained on every row)
    victim_partial = bool((masks[0] == 0).any()) and b.learned_state_ids >= 0

    def rows(idx):
        z = torch.cat([z_views[i] for i in idx])
        m = torch.cat([masks[i] for i in idx])
        y = y_own.repeat(len(idx))
        if victim_partial:
            on = m > 0
            z, m, y = torch.cat([z, z[on]]), torch.cat([m, torch.zeros(int(on.sum()))]), torch.cat([y, y[on]])
        return z, m, y

    z_tr, m_tr, y_tr = rows(tr)
    val = None
    if va:
        z_va, m_va, y_va = rows(va)
        pick = torch.randperm(len(z_va), generator=gen)[:VAL_ROWS]
        val = (z_va[pick], m_va[pick], y_va[pick])
    bar = tqdm(total=b.learned_steps, desc="learned/train", disable=not show, leave=False)
    with torch.enable_grad():
        model, info = train(z_tr, m_tr, y_tr, z_plain, n_w, b.learned_steps, gen, val, bar)
    bar.close()

    z_v, m_v = z_views[0], masks[0]
    g = model.plain(z_plain)
    cand = topk_in_batches(lambda s: model.logits(z_v[s], m_v[s], g), len(z_v), k)
    white = topk_in_batches(lambda s: identity_logits(z_v[s], m_v[s], z_plain, n_w), len(z_v), 1)[:, 0]
    cand = t.no_claim_on_unheld(q_ids, cand)
    white[~t.held_rows[torch.as_tensor(q_ids)]] = -1
    extra = {"whitened_pred": white.numpy(), "own_copies": len(owns), "own_copy_adapted": False,
             "train_rows": int(len(z_tr)), "state_rows": int(masks[0].sum()), "dims": dims,
             "steps": b.learned_steps, **info}
    if val is not None:
        wv = topk_in_batches(lambda s: identity_logits(val[0][s], val[1][s], z_plain, n_w), len(val[0]), 1)[:, 0]
        extra["own_validation_whitened_token_recovery"] = float((wv == val[2]).float().mean())
    return IdGuess(q_ids, cand.numpy(), uniform=uniform, extra=extra)
