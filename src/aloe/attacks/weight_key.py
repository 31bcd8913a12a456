"""Weight-side key recovery: the exact-norm design's writer key read off the transformer body, with no row read first.

The exact-norm keys write every residual vector through one key, ``x~ = x P`` with ``P P^T = c^2 I`` (P is d x d':
a scaled isometry onto a d-dimensional subspace S of the d' obfuscated coordinates). Every attack that fits the key
(:mod:`aloe.attacks.key_regression`) needs a first reading of some rows. The body the server runs gives it without
one:

1. **The subspace.** Every residual writer (``down_proj``, ``o_proj``) ends in ``... P``, so its outputs lie in S. The
   first d left singular vectors of a few writers (HF layout, d' x n) are an orthonormal basis U (d' x d) of S, and
   the (d+1)-th singular value is float rounding. The paper's design, a fresh writer key per writer, spans d + h/2
   directions; its key is read by :func:`_recover_linear` (below).
2. **The rotation.** In that basis ``P = c R U^T`` with R orthogonal. A reader Q (d' x d) inverts P (``P Q = I``) and
   its fresh part lies outside S, so ``U^T Q = R^T / c`` whatever that part is. The FFN gate of a layer reads
   ``x~ Q (gamma W_gate^T) Z`` with Z the secret unit permutation; in U's coordinates its HF weight is
   ``Z^T W R / c`` (W the plain gate with its norm's gamma folded in, public), and the Gram matrix over the units
   drops Z: ``G = R^T (W^T W) R / c^2``. That holds for every layer, so R is the map that carries the public
   matrices ``W_l^T W_l`` to the artifact's ``c^2 G_l``: the eigenvectors of their sums over the layers fix it up to
   one sign per eigenvector; the layers one by one fix the signs up to one global sign; the mean of the gate rows
   over the units (also free of Z) fixes that, and the traces give c.
3. **The read.** An embedding row or a vector the client sends is ``(x + noise) P`` (plus, for the client-held
   stream, fresh noise in all d' coordinates): mapped by ``v U R^T / c`` it is the plain row plus noise, read by its
   likelihood against every plain token under the public noise level (:func:`aloe.attacks.key_regression.read`).
   A head row is ``(w + noise) Q^T``, mapped by ``h U R^T c``.
4. **The answer.** In the client-held deployment the server returns the final hidden state of every step and the
   client applies its head. Mapped into the plain frame by the same key, the state meets the public head (the final
   norm's gamma folded in) and gives the token a greedy client picks (:func:`read_answers`), whatever noise the
   client put on the vectors it sent: that noise changes the state, and the client reads the changed state too.
   Each pick then comes back as the next request's vector (its echo): the state's distribution, at the temperature
   under which the echoes are most likely, times the echo's likelihood reads the picks the state alone misses
   (:func:`echo_posterior`).

Nothing secret is used: the writers and gates are the artifact's, the plain gates and norms the public model's, the
noise levels the public profile's. The gate's SwiGLU is what keeps its columns unscaled (the up projection carries
the secret per-unit scales), so the attack needs gated FFNs: dense (Llama, Qwen2, Mistral and their kin) or sparse
MoE (Qwen2-MoE, Qwen3-MoE, Mixtral), whose gates are summed over every expert, since the expert slots are secret too.
:attr:`WeightKey.gram_residual` says how well the key explains every layer's gate: float rounding for the unadapted
bodies; large where the body moved (adaptation).

**The paper's keys.** Each writer is ``P_i = [B | C_i | E] Z`` with a fresh C_i and B not orthogonal, so no isometry
exists; but every reader ``Q_j = Z^T [B^-1 ; F ; D_j]`` maps a vector of the writers' span the same way (its fresh
D_j meets only directions outside it), so the body reads that span through one linear map K, and the gates give it
as they give R: their Gram matrices are ``K M_l K^T`` with the public ``M_l``, which fix K up to one sign per
generalized eigenvector, and their mean rows fix the signs (:func:`_recover_linear`). Embedding rows and sent vectors
map back through K, head rows through its inverse transpose.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from aloe import AloeError
from aloe.attacks import key_regression
from aloe.attacks.common import Target
from aloe.attacks.scoring import IdGuess
from aloe.obfuscation.embedding import NOISE_SHAPES, noise_std

ATTENTION_WRITER = "self_attn.o_proj"
SUBSPACE_LAYERS = 3   # writers of this many layers give the residual stream's subspace
GATE = "mlp.gate_proj"
FLOOR = 1e-12         # the read's sigma^2 where the public profile adds no noise (nearest neighbour)


@dataclass
class WeightKey:
    """The key as the body gives it: ``x = v @ basis @ to_plain / scale`` for an embedding row or a residual vector
    v. For the exact-norm keys (``design`` "isometry") ``to_plain`` is orthogonal and a head row h maps by
    ``h @ basis @ to_plain * scale``; for the paper's keys ("linear") it is any invertible map and a head row maps by
    its inverse transpose."""

    basis: torch.Tensor       # d' x d, orthonormal columns: where the plain coordinates are read from
    to_plain: torch.Tensor    # d x d: R^T (orthogonal) for the isometry, the general map for "linear"
    scale: float              # c (1 for "linear", whose map carries its own scale)
    subspace_gap: float       # the writers' first negligible singular value over their last (rounding)
    gram_residual: float      # max over layers of how far the key leaves the gates' Gram matrices from the public ones
    sign_agreement: float     # mean cosine of the gate means under the key, over the layers (1: the signs are sure)
    layers: int
    design: str = "isometry"
    subspace_rank: int = 0    # the dimension the residual writers span (d for one key, d + h/2 for the paper's)

    def embed_side(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.double() @ self.basis @ self.to_plain / self.scale

    def head_side(self, rows: torch.Tensor) -> torch.Tensor:
        if self.design == "linear":
            return rows.double() @ self.basis @ torch.linalg.inv(self.to_plain).T
        return rows.double() @ self.basis @ self.to_plain * self.scale

    def write(self, plain: torch.Tensor) -> torch.Tensor:
        """Plain residual rows written as the body reads them (the inverse of :meth:`embed_side` on the basis)."""
        if self.design == "linear":
            return plain.double() @ torch.linalg.inv(self.to_plain) @ self.basis.T
        return plain.double() @ self.to_plain.T @ self.basis.T * self.scale

    def summary(self) -> dict:
        return {"subspace_gap": self.subspace_gap, "gram_residual": self.gram_residual,
                "sign_agreement": self.sign_agreement, "key_scale": self.scale, "gate_layers": self.layers,
                "key_design": self.design, "subspace_rank": self.subspace_rank}


def ffn_parts(t: Target, layer: int) -> tuple[list[str], list[str]]:
    """The gates and the residual writers of a layer's FFN (names relative to the layer, without ``.weight``): the
    dense gated MLP, or every expert of a sparse MoE block and its shared expert. The experts' slots are secret, but
    a sum over all of them is free of that permutation as the sum over the units is of theirs."""
    spec = t.arch.spec
    if spec is not None and spec.sandwich:
        raise AloeError(f"the weight-key attack reads pre-norm bodies; {t.arch.model_type}'s sandwich norms force "
                        "another key, which the post-norm attack reads")
    if t.has_weight(f"model.layers.{layer}.{GATE}.weight"):
        return [GATE], ["mlp.down_proj"]
    moe = spec.moe if spec is not None else None
    if moe is not None and t.arch.n_experts and t.has_weight(f"model.layers.{layer}.{moe.expert_weight(0, 0)}"):
        gates = [moe.expert_weight(e, 0).removesuffix(".weight") for e in range(t.arch.n_experts)]
        downs = [moe.expert_weight(e, 2).removesuffix(".weight") for e in range(t.arch.n_experts)]
        if moe.shared and t.has_weight(f"model.layers.{layer}.{moe.shared}.gate_proj.weight"):
            gates.append(f"{moe.shared}.gate_proj")
            downs.append(f"{moe.shared}.down_proj")
        return gates, downs
    raise AloeError(f"the weight-key attack reads gated FFNs, dense or sparse MoE; layer {layer} has neither")


def _obf_weight(t: Target, layer: int, name: str) -> torch.Tensor:
    return t.obf_layer(layer, name).double()


def _plain_gate(t: Target, layer: int, name: str) -> torch.Tensor:
    """A plain gate (HF layout, units x d) with the gamma of the norm before the FFN folded in, as the mechanism
    folds it."""
    spec = t.arch.spec
    norm = spec.pre_ffn_norm if spec is not None else "post_attention_layernorm"
    offset = float(spec.norm_offset) if spec is not None else 0.0
    gamma = t.plain(f"model.layers.{layer}.{norm}.weight") + offset
    return (t.plain(f"model.layers.{layer}.{name}.weight") * gamma[None, :]).double()


RANK_TOL = 1e-4       # a drop in the writers' singular values below this ratio is rounding: the span ends there


def _gate_grams(t: Target, parts, U: torch.Tensor, progress=None):
    """Per layer: the public gate Gram matrix over the units (W^T W, d x d), the artifact's in U's coordinates, and
    both gates' mean rows over the units (all free of the secret unit and expert permutations)."""
    plain_grams, obf_grams, plain_means, obf_means = [], [], [], []
    for layer in range(t.arch.n_layers):
        gates = parts[layer][0]
        wp = torch.cat([_plain_gate(t, layer, g) for g in gates])            # units x d
        wo = torch.cat([_obf_weight(t, layer, g) for g in gates]) @ U        # units x rank
        plain_grams.append(wp.T @ wp)
        obf_grams.append(wo.T @ wo)
        plain_means.append(wp.mean(0))
        obf_means.append(wo.mean(0))
        if progress is not None:
            progress.update(1)
    return plain_grams, obf_grams, plain_means, obf_means


@torch.no_grad()
def recover(t: Target, progress=None) -> WeightKey:
    """The key from the server's body alone (see the module's docstring): the exact-norm design's isometry, or,
    where the residual writers span more than d directions (the paper's fresh key per writer), the linear map of
    :func:`_recover_linear`. Raises if a layer has no gated FFN (dense or sparse MoE), the body has sandwich norms,
    or its residual stream is no wider than the plain one."""
    d, L = t.arch.d, t.arch.n_layers
    parts = [ffn_parts(t, layer) for layer in range(L)]
    writers = torch.cat([_obf_weight(t, layer, w) for layer in range(min(SUBSPACE_LAYERS, L))
                         for w in (*parts[layer][1], ATTENTION_WRITER)], 1)
    if writers.shape[0] < d:
        raise AloeError(f"the residual stream is {writers.shape[0]} wide, narrower than the plain {d}")
    U, sv, _ = torch.linalg.svd(writers, full_matrices=False)
    gap = float(sv[d] / sv[d - 1]) if len(sv) > d else 0.0
    # the paper's writers span d + h/2 directions (d' = d + 2h): a drop there sharper than at d picks its design;
    # an adapted exact-norm body leaves the subspace a little (gap 0.15 at d) and keeps the isometry's read
    rank = d + (writers.shape[0] - d) // 4
    if d < rank < len(sv) and float(sv[rank] / sv[rank - 1]) < min(gap, RANK_TOL):
        return _recover_linear(t, parts, U[:, :rank], float(sv[rank] / sv[rank - 1]), progress)
    U = U[:, :d]
    plain_grams, obf_grams, plain_means, obf_means = _gate_grams(t, parts, U, progress)
    c2 = float(np.median([float(torch.trace(m) / torch.trace(g)) for m, g in zip(plain_grams, obf_grams)]))
    _, V = torch.linalg.eigh(sum(plain_grams))
    _, Vo = torch.linalg.eigh(c2 * sum(obf_grams))
    # R^T V = Vo S for one sign per eigenvector: each layer's (V^T M V)_ij must equal s_i s_j (Vo^T c^2 G Vo)_ij
    agree = sum((V.T @ m @ V) * (c2 * Vo.T @ g @ Vo) for m, g in zip(plain_grams, obf_grams))
    s = torch.sign(torch.linalg.eigh(agree)[1][:, -1])
    s[s == 0] = 1
    Rt = Vo @ torch.diag(s) @ V.T                                # R^T: R^T M R = c^2 G
    residual = max(float((Rt @ m @ Rt.T - c2 * g).norm() / m.norm()) for m, g in zip(plain_grams, obf_grams))
    # the global sign: the gate's mean row over the units is Z-free, mean(W) R / c
    cos = [float(o @ (p @ Rt.T) / (o.norm() * p.norm()).clamp_min(1e-30)) for o, p in zip(obf_means, plain_means)]
    sign = 1.0 if sum(cos) >= 0 else -1.0
    return WeightKey(U, sign * Rt, float(np.sqrt(c2)), gap, residual, sign * float(np.mean(cos)), L,
                     subspace_rank=d)


def _generalized_eigh(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of ``B v = lam A v`` (A positive definite): V with ``V^T A V = I`` and ``V^T B V = diag(lam)``."""
    Li = torch.linalg.inv(torch.linalg.cholesky(A))
    lam, W = torch.linalg.eigh(Li @ B @ Li.T)
    return lam, Li.T @ W


def _recover_linear(t: Target, parts, U: torch.Tensor, gap: float, progress=None) -> WeightKey:
    """The paper's keys: every writer ``P_i = [B | C_i | E] Z`` has its own C_i, so the writers span d + h/2
    directions S (U, d' x rank), and every reader ``Q_j = Z^T [B^-1 ; F ; D_j]`` maps a vector of S to the same plain
    vector: ``x = v Q_j = (v U) K`` with one K = U^T Q_j (rank x d) for every reader. A layer's gate reads
    ``Z_units W K^T`` in U's coordinates, so its Gram matrix over the units is ``K M_l K^T`` (M_l = W_l^T W_l,
    public). Its top d eigenvectors Vk give K's range, ``K = Vk R``, and ``N_l = Vk^T G_l Vk = R M_l R^T`` for every
    layer: R is the congruence that carries two public pools of the M_l (their plain sum and a signed, weighted one)
    onto the artifact's, found by the generalized eigenvectors of each pair, up to one sign per eigenvector, which
    the gates' mean rows over the units (``mean(W_l) R^T``, free of the unit permutation) fix one by one. A per-layer
    scalar the mechanism could fold into a gate (relative to the first layer's) is read off the traces of
    ``N_0^-1 N_l`` against the public ones."""
    d, L = t.arch.d, t.arch.n_layers
    plain_grams, obf_grams, plain_means, obf_means = _gate_grams(t, parts, U, progress)
    _, Vk = torch.linalg.eigh(sum(obf_grams))
    Vk = Vk[:, -d:]
    N = [Vk.T @ g @ Vk for g in obf_grams]
    ratio = [float(torch.trace(torch.linalg.solve(N[0], n)) / torch.trace(torch.linalg.solve(plain_grams[0], m)))
             for n, m in zip(N, plain_grams)]
    N = [n / r for n, r in zip(N, ratio)]
    weights = [(-1.0) ** layer * (1.0 + layer / L) for layer in range(L)]  # public: any generic pooling will do
    A, B = sum(N), sum(w * n for w, n in zip(weights, N))
    MA, MB = sum(plain_grams), sum(w * m for w, m in zip(weights, plain_grams))
    _, V = _generalized_eigh(MB, MA)
    _, Vo = _generalized_eigh(B, A)
    # R^T Vo = V S: the gate means (mean(W) R^T = o Vk) give each sign, mean(W) V S = o Vk Vo
    votes = sum((o @ Vk @ Vo) * (p @ V) for o, p in zip(obf_means, plain_means))
    s = torch.sign(votes)
    s[s == 0] = 1
    Rt = V @ torch.diag(s) @ torch.linalg.inv(Vo)
    R = Rt.T                                                     # N_l = R M_l R^T;  x = (v U Vk) R
    residual = max(float((R @ m @ R.T - n).norm() / n.norm()) for m, n in zip(plain_grams, N))
    cos = [float((o @ Vk) @ (p @ Rt) / ((o @ Vk).norm() * (p @ Rt).norm()).clamp_min(1e-30))
           for o, p in zip(obf_means, plain_means)]
    return WeightKey(U @ Vk, R, 1.0, gap, residual, float(np.mean(cos)), L, design="linear",
                     subspace_rank=U.shape[1])


def _sigma2(table: torch.Tensor, alpha: float, shape: str, row_shaped: bool, dims: int) -> float:
    """sigma^2 per plain coordinate of noise of level ``alpha`` and ``shape`` drawn in ``dims`` coordinates relative
    to ``table`` (as :func:`aloe.obfuscation.embedding.noise_std` draws it), in the units the read uses: relative to
    each row's squared norm for a ``row_shaped`` read, absolute otherwise."""
    if alpha <= 0:
        return 0.0
    T = table.double()
    mean_sq = float((T * T).sum(1).mean())                  # the rows' mean squared norm
    if shape == "row":                                       # sigma_i = alpha ||row_i|| / sqrt(dims)
        return alpha ** 2 / dims * (1.0 if row_shaped else mean_sq)
    s2 = alpha ** 2 * mean_sq / dims                         # one sigma, the table's RMS entry (mean taken as 0)
    return s2 / mean_sq if row_shaped else s2


@torch.no_grad()
def read_vectors(t: Target, key: WeightKey, vectors: torch.Tensor, alpha: float, shape: str = "row",
                 groups: np.ndarray | None = None, every_id: bool = False) -> np.ndarray:
    """Top-k plain candidates (m, k) of vectors a client-held-vocabulary client sent: each is an obfuscated embedding
    row (the profile's own table noise) plus fresh noise of public level ``alpha`` and ``shape`` in the d'
    coordinates, read through ``key``. With ``groups`` (m,) the rows of a group add their scores. Candidates are the
    movable ids, or with ``every_id`` the fixed ones too (a chat template's special tokens)."""
    if shape not in NOISE_SHAPES:
        raise AloeError(f"unknown noise shape {shape!r}; choose one of {', '.join(NOISE_SHAPES)}")
    pool = np.arange(t.arch.vocab) if every_id else t.movable_ids
    return key_regression.read([vector_side(t, key, vectors, alpha, shape)], pool, t.budget.topk, shape == "row",
                               groups)


def vector_side(t: Target, key: WeightKey, vectors: torch.Tensor, alpha: float, shape: str) -> tuple:
    """Sent vectors as one side of :func:`key_regression.read`: (the vectors where they are read, the plain table
    there, sigma^2[, the tokens' noise weights]).

    Through an isometry the fresh noise stays isotropic: the vectors are read in the plain coordinates. A linear key
    (the paper's) skews it there, so the read is whitened: the vectors are taken in the subspace's own coordinates
    (``y = v @ basis``, where the fresh noise is isotropic and each token sits at ``mu_j = E_j @ to_plain^-1``), the
    profile's table noise (isotropic in the plain coordinates, ``A^T A`` there with ``A = to_plain^-1``) added to
    the covariance, and both sides multiplied by its inverse square root. How large the fresh noise is, relative to
    ``mu``, comes from the vectors alone: a row of level ``alpha`` sends ``(1 + alpha^2)`` times its row's squared
    norm on average, of which the subspace holds ``d / d'`` of the noise."""
    if getattr(key, "design", "isometry") != "linear":
        return key.embed_side(vectors), t.plain_embed, _vector_sigma2(t, alpha, shape, vectors.shape[1])
    prof, E = t.profile, t.plain_embed.double()
    v = vectors.double()
    d, width = key.basis.shape[1], v.shape[1]
    A = torch.linalg.inv(key.to_plain)
    y, mu = v @ key.basis, E @ A
    row_sq = float((v * v).sum(1).mean()) / (1 + alpha ** 2)                # the sent rows' mean squared norm
    fresh = alpha ** 2 * row_sq / width                                    # sigma^2 per coordinate, at the mean
    table = _sigma2(E, float(prof.get("alpha_e", 0.0)), prof.get("noise_shape", "entry"), False, E.shape[1])
    AtA = A.T @ A
    # the sent tokens' mean ||mu_j||^2: what the subspace holds less the two noises' share of it
    signal = max(float((y * y).sum(1).mean()) - d * fresh - table * float(torch.trace(AtA)), 1e-12)
    cov = fresh * torch.eye(d, dtype=AtA.dtype) + table * AtA
    vals, vecs = torch.linalg.eigh(cov + FLOOR * torch.eye(d, dtype=AtA.dtype))
    W = vecs @ torch.diag(vals.clamp_min(FLOOR) ** -0.5) @ vecs.T
    # each token's total noise relative to the mean: the row-shaped parts grow with its row's norm
    mu_sq, e_sq = (mu * mu).sum(1), (E * E).sum(1)
    fresh_j = fresh * (mu_sq / signal if shape == "row" else torch.ones_like(mu_sq))
    table_j = table * (e_sq / e_sq.mean() if prof.get("noise_shape", "entry") == "row" else torch.ones_like(e_sq))
    total_j = d * fresh_j + float(torch.trace(AtA)) * table_j
    weights = (total_j / (d * fresh + float(torch.trace(AtA)) * table + FLOOR)).clamp_min(FLOOR).sqrt()
    return y @ W, mu @ W, 1.0, weights


def _vector_sigma2(t: Target, alpha: float, shape: str, width: int) -> float:
    """sigma^2 of a sent vector read through the key: the fresh noise of public level ``alpha`` in ``width``
    coordinates plus the profile's own table noise."""
    prof, E = t.profile, t.plain_embed
    row = shape == "row"
    return max(_sigma2(E, alpha, shape, row, width)
               + _sigma2(E, float(prof.get("alpha_e", 0.0)), prof.get("noise_shape", "entry"), row, E.shape[1]), FLOOR)


@functools.lru_cache(maxsize=1)
def _public_lm(plain_dir: str):
    """The public model as the decoder's prior, loaded once for the calls that decode with it (the calibration
    decodes the attacker's text once per weight, then the victim's)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()


@torch.no_grad()
def state_predictions(t: Target, key: WeightKey, body, vectors: torch.Tensor) -> torch.Tensor:
    """What the server's own forward pass over a doc's vectors (n x d', as a client-held-vocabulary client sent them
    for a prompt) predicts at each position: the final hidden state the body computes there (the server computes
    every prompt position, not only the last) through ``key`` and the public head, as log-probabilities (n x V) of
    the plain token that follows. ``body`` is the stock causal LM loaded from the server folder."""
    hidden = body.model(inputs_embeds=vectors[None].to(body.dtype)).last_hidden_state[0]
    logits = key.embed_side(hidden) @ t.plain_head.double().T
    return torch.log_softmax(logits, -1)[:, : t.arch.vocab].float()


@torch.no_grad()
def decode_vectors(t: Target, key: WeightKey, docs: list[torch.Tensor], alpha: float, shape: str = "row",
                   beam: int = 4, evidence: float = 1.0, progress=None, predictions: list[torch.Tensor] | None = None,
                   prediction_weight: float = 0.0) -> list[np.ndarray]:
    """The stream read as text: each doc (n x d', the vectors a client-held-vocabulary client sent, in order) decoded
    by a beam search over the noisy channel, the public model as the language prior. A prefix's score adds, at each
    position, ``log p_public(x | prefix)`` and ``evidence`` times the vector's log-likelihood under token x (read
    through ``key`` at the public noise level, every id of the vocabulary). ``evidence`` 0 is the language model
    alone, the baseline of what the prior guesses without a vector. With ``predictions`` (one n x V per doc, from
    :func:`state_predictions`) the score at position i also adds ``prediction_weight`` times what the server's own
    forward pass predicted there from the state at i - 1. Returns the decoded plain ids of each doc."""
    if shape not in NOISE_SHAPES:
        raise AloeError(f"unknown noise shape {shape!r}; choose one of {', '.join(NOISE_SHAPES)}")
    if beam < 1:
        raise AloeError("the beam must hold at least one prefix")
    if predictions is not None and len(predictions) != len(docs):
        raise AloeError(f"{len(predictions)} prediction tables for {len(docs)} docs")
    lm = _public_lm(str(t.plain_dir))
    pool = np.arange(t.arch.vocab)
    out = []
    for k, vectors in enumerate(docs):
        n = vectors.shape[0]
        if n == 0:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        x, table, s2, *w = vector_side(t, key, vectors, alpha, shape)
        ll = evidence * key_regression.log_likelihoods(x, table, pool, s2, shape == "row", *w)
        if predictions is not None and prediction_weight and n > 1:
            ll = ll.clone()
            ll[1:] += prediction_weight * predictions[k][: n - 1].to(ll.dtype)
        bos = lm.config.bos_token_id
        if bos is None:
            first, cache = torch.zeros(t.arch.vocab), None
        else:
            res = lm(input_ids=torch.tensor([[int(bos)]]), use_cache=True)
            first, cache = torch.log_softmax(res.logits[0, -1].float(), -1), res.cache
        total = first[: t.arch.vocab] + ll[0]
        score, ids = total.topk(min(beam, t.arch.vocab))
        prefixes = ids[:, None]
        if cache is not None:
            cache.batch_repeat_interleave(len(ids))
        for i in range(1, n):
            res = lm(input_ids=prefixes[:, -1:], cache=cache, use_cache=True)
            cache = res.cache
            lp = torch.log_softmax(res.logits[:, -1].float(), -1)[:, : t.arch.vocab]
            total = (score[:, None] + lp + ll[i][None]).reshape(-1)
            score, flat = total.topk(min(beam, total.numel()))
            rows, tokens = flat // t.arch.vocab, flat % t.arch.vocab
            cache.reorder_cache(rows)
            prefixes = torch.cat([prefixes[rows], tokens[:, None]], 1)
        out.append(prefixes[int(score.argmax())].numpy())
        if progress is not None:
            progress.update(1)
    return out


@torch.no_grad()
def simulate_vectors(t: Target, key: WeightKey, plain_ids: np.ndarray, alpha: float, shape: str = "row",
                     seed: int = 0) -> torch.Tensor:
    """What a client would send for ``plain_ids``, as the attacker simulates it with the key the body gives: each
    plain row written through that key (``x c R U^T``) plus fresh noise of public level ``alpha`` in the d'
    coordinates (the profile's own table noise and the table key's part outside the subspace are left out). For
    the attacker's own calibration; nothing secret."""
    rows = key.write(t.plain_embed[torch.as_tensor(plain_ids)])
    sigma = torch.from_numpy(noise_std(rows.numpy(), alpha, shape)) if alpha > 0 else torch.zeros(len(rows))
    gen = torch.Generator().manual_seed(seed)
    return (rows + torch.randn(rows.shape, generator=gen, dtype=torch.float64) * sigma[:, None]).float()


def calibrate_evidence(t: Target, key: WeightKey, docs: list[np.ndarray], alpha: float, shape: str = "row",
                       beam: int = 4, weights=(1.0, 1.5, 2.0, 3.0), progress=None) -> tuple[float, dict]:
    """The evidence weight of :func:`decode_vectors` the attacker picks on its own text: ``docs`` (plain ids, the
    attacker's corpus) sent through :func:`simulate_vectors` and decoded with each weight; returns the weight that
    reads most and every weight's read. (The prior is conditioned on the decoded prefix, which the noise makes
    unreliable, so the right balance is an empirical one.)"""
    sims = [simulate_vectors(t, key, d, alpha, shape, seed=k) for k, d in enumerate(docs)]
    return _best_weight(t, docs, weights, lambda w: decode_vectors(t, key, sims, alpha, shape, beam, evidence=w,
                                                                   progress=progress),
                        prefer=lambda w: -abs(w - 1.0))


def _best_weight(t: Target, docs: list[np.ndarray], weights, decode, prefer) -> tuple[float, dict]:
    """The weight of ``weights`` under which ``decode(w)`` (the attacker's simulated ``docs`` decoded) reads most of
    them, ties broken by ``prefer``; and every weight's read."""
    truth = np.concatenate(docs)
    keep = ~np.isin(truth, t.fixed_ids)
    reads = {}
    for w in weights:
        got = np.concatenate(decode(float(w)))
        reads[float(w)] = float((got == truth)[keep].mean()) if keep.any() else 0.0
    return max(reads, key=lambda w: (reads[w], prefer(w))), reads


def calibrate_prediction_weight(t: Target, key: WeightKey, body, docs: list[np.ndarray], alpha: float,
                                shape: str = "row", beam: int = 4, evidence: float = 1.0,
                                weights=(0.0, 0.25, 0.5, 1.0), progress=None) -> tuple[float, dict]:
    """The weight of the server's own next-token predictions in :func:`decode_vectors` that the attacker picks on
    its own text: ``docs`` (plain ids, its corpus) sent through :func:`simulate_vectors`, run through ``body`` (the
    stock causal LM of the server folder) for :func:`state_predictions`, and decoded at ``evidence`` with each
    weight; returns the weight that reads most (the smallest among equals) and every weight's read."""
    sims = [simulate_vectors(t, key, d, alpha, shape, seed=k) for k, d in enumerate(docs)]
    preds = [state_predictions(t, key, body, v) for v in sims]
    return _best_weight(t, docs, weights, lambda w: decode_vectors(t, key, sims, alpha, shape, beam, evidence,
                                                                   progress=progress, predictions=preds,
                                                                   prediction_weight=w),
                        prefer=lambda w: -w)


ECHO_TEMPERATURES = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0)
# the truncations the server tries on the state's distribution: nucleus (top-p) and top-k at common client settings
# (1.0 and 0: none), each with a floor, the share of picks it lets fall outside the truncated set (the server's
# read of the state is not the client's, so the client's kept set is not exactly the server's)
ECHO_TOP_PS = (1.0, 0.95, 0.9, 0.8)
ECHO_TOP_KS = (0, 40, 50)
ECHO_FLOORS = (1e-3, 1e-2, 0.1)
ECHO_MIN_PS = (0.0, 0.05, 0.1)   # min-p (0: none); llama.cpp's default is 0.05
ECHO_PENALTIES = (1.0, 1.1, 1.2, 1.3)   # repetition penalties the server tries (1: none)
# OpenAI's (presence, frequency) penalties the server tries, alone and (with ``combined``) after each repetition penalty
ECHO_OUTPUT_PENALTIES = ((0.5, 0.0), (1.0, 0.0), (0.0, 0.5), (0.0, 1.0), (0.5, 0.5))


def _kept_counts(cum: torch.Tensor, top_p: float, top_k: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """How many of each row's most likely tokens a client's top-k, then top-p, then min-p keeps (transformers'
    warpers' rule for top-p: on the top-k renormalised, a token stays while the mass before it is under p).
    ``cum``: the cumulative probabilities of each row sorted in descending order (m x V); ``within``: each row's
    min-p count (:func:`_min_p_counts`), None without min-p."""
    V = cum.shape[1]
    k = V if top_k <= 0 else min(top_k, V)
    if top_p >= 1.0:
        kept = torch.full((cum.shape[0],), k, dtype=torch.long)
    else:
        # cum is non-decreasing along a row: the tokens whose mass before them is under p, counted by bisection
        # (over the whole row: no rank from k on lies under p times the mass of the first k)
        below = torch.searchsorted(cum, top_p * cum[:, k - 1: k], right=False)
        kept = torch.clamp(1 + below[:, 0], max=k)
    return kept if within is None else torch.minimum(kept, within)


def _min_p_counts(neg_logq: torch.Tensor, min_p: float) -> torch.Tensor:
    """How many of each row's most likely tokens min-p keeps: those of at least ``min_p`` times the likeliest one's
    probability (transformers' rule; a ratio that no renormalisation by top-k or top-p moves). ``neg_logq``: the
    negated log-probabilities of each row sorted in descending order (non-decreasing along a row)."""
    within = torch.searchsorted(neg_logq, neg_logq[:, :1] - np.log(min_p), right=True)
    return within[:, 0].clamp_min(1)


def _penalised(logits: torch.Tensor, context: torch.Tensor | None, penalty: float,
               replied: tuple[torch.Tensor, torch.Tensor] | None = None, presence: float = 0.0,
               frequency: float = 0.0) -> torch.Tensor:
    """The client's penalties on the state's logits (m x V): transformers' own repetition penalty on each row's
    ``context`` ids (m x n), or OpenAI's presence and frequency penalties (:class:`~aloe.obfuscation.client.
    OutputPenalty`) on the ids each row's reply picked before it (``replied``: the (row, id) pairs, one per pick,
    repeats included)."""
    if context is not None and penalty != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        logits = RepetitionPenaltyLogitsProcessor(penalty)(context, logits.clone())
    if replied is not None and (presence or frequency) and len(replied[0]):
        rows, ids = replied
        logits = logits.clone()
        if frequency:
            logits.index_put_((rows, ids), torch.full(rows.shape, -frequency, dtype=logits.dtype), accumulate=True)
        if presence:
            once = torch.unique(rows * logits.shape[1] + ids)
            logits.view(-1)[once] -= presence
    return logits


@torch.no_grad()
def echo_posterior(t: Target, key: WeightKey, hidden: torch.Tensor, echoes: torch.Tensor, alpha: float,
                   shape: str = "row", temperatures=ECHO_TEMPERATURES, top_ps=ECHO_TOP_PS, top_ks=ECHO_TOP_KS,
                   min_ps=ECHO_MIN_PS, floors=ECHO_FLOORS, seen: list[np.ndarray] | None = None, penalties=(1.0,),
                   replied: list[np.ndarray] | None = None, output_penalties=(), combined: bool = False,
                   plain_scores: bool = False, refine: int = 0, grid_scores: bool = False):
    """The plain token of each of the first m' picks (m' = len(echoes) <= len(hidden)) scored by the state and its
    echo: the log-probability of the token under a model of the client's sampler on the state read through the key
    and the public head, plus the echo's log-likelihood under each token read through the key (occurrence noise of
    public level ``alpha``). The sampler model is transformers' order: a penalty, either a repetition penalty r on
    the tokens of each pick's context as the server reads it (``seen``: m' arrays of plain ids; r 1 without) or
    OpenAI's presence and frequency penalties (pp, fp) on the picks of the reply before it (``replied``: m' arrays,
    repeats included; ``output_penalties``: the (pp, fp) pairs tried; with ``combined`` each of them after each
    repetition penalty too, as a client that sets both applies them); then ``softmax(logits / T)``, truncated to
    its top-k, then its top-p nucleus, then its min-p set, with a floor f: ``(1 - f) q 1[kept] / q(kept) + f q``.
    The server sees neither the client's settings nor its own head part that moves the pick off the state's argmax,
    so it takes the (penalty, T, top-p, top-k, min-p, f) of the grid under which the echoes it received are most
    likely (the marginal likelihood summed over the picks; nothing of the victim's text); no truncation is the plain
    softmax, where f plays no part. Returns the scores (m' x V, token order) and the fit: ``repetition_penalty``,
    ``presence_penalty``, ``frequency_penalty``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``floor`` (None
    where untruncated), ``log_marginal``, and ``untruncated``, the best plain softmax without a penalty (its
    temperature and log_marginal), for comparison; with ``plain_scores`` that softmax's scores as a third item.
    With ``refine`` (1 or 2), the penalties of the grid's best fit are then searched more finely, each scaled alone by
    0.5-1.5, then (2) by 0.85-1.15 around the new best, every other part of the model searched again with them: a
    client's penalty off the grid (a frequency penalty 0.3, say) is fitted closer. The fit then holds ``grid``, the
    grid's own best penalties and log_marginal (as it does with ``grid_scores``, which returns the grid's scores as
    the third item: the same as the first without ``refine``)."""
    if len(echoes) > len(hidden):
        raise AloeError(f"{len(echoes)} echoes for {len(hidden)} picks")
    for name, lists in (("contexts", seen), ("replies", replied)):
        if lists is not None and len(lists) != len(echoes):
            raise AloeError(f"{len(lists)} {name} for {len(echoes)} echoes")
    V, m = t.arch.vocab, len(echoes)
    pool = np.arange(V)
    logits = (key.embed_side(hidden[:m]) @ t.plain_head.double().T)[:, :V]
    x, table, s2, *w = vector_side(t, key, echoes, alpha, shape)
    ll = torch.cat([key_regression.log_likelihoods(x[s:s + 128], table, pool, s2, shape == "row", *w).double()
                    for s in range(0, m, 128)])
    context = None  # each row's context ids, padded with its own ids (a repeated id is penalised once)
    if seen is not None and any(r != 1.0 for r in penalties):
        if any(len(c) == 0 for c in seen):
            raise AloeError("every pick's context needs at least one id")
        width = max(len(c) for c in seen)
        context = torch.as_tensor(np.stack([np.resize(np.asarray(c, dtype=np.int64), width) for c in seen]))
    picks = None    # the (row, id) pairs of the reply's earlier picks
    if replied is not None and output_penalties:
        picks = (torch.as_tensor(np.repeat(np.arange(m), [len(c) for c in replied]), dtype=torch.long),
                 torch.as_tensor(np.concatenate([np.asarray(c, dtype=np.int64) for c in replied] or [[]]),
                                 dtype=torch.long))
    # the penalties tried: the repetition penalties with a context, the output penalties with the replies
    settings = [(float(r), 0.0, 0.0) for r in penalties] if context is not None else []
    if picks is not None:
        settings += [(1.0, float(pp), float(fp)) for pp, fp in output_penalties]
        if combined and context is not None:
            settings += [(float(r), float(pp), float(fp)) for r in penalties if r != 1.0
                         for pp, fp in output_penalties if pp or fp]
    settings = settings or [(1.0, 0.0, 0.0)]
    rows = torch.arange(m)
    truncations = [(p, k, mp) for p in top_ps for k in top_ks for mp in min_ps]
    best, plain = None, None

    def search(settings):
        nonlocal best, plain
        for r, pp, fp in settings:
            # one order serves every temperature; the echo's likelihoods follow it
            penalised = _penalised(logits, context, r, picks, pp, fp)
            ranked, order = torch.sort(penalised, dim=1, descending=True)
            del penalised
            llr = torch.gather(ll, 1, order)
            for T in temperatures:
                logq = torch.log_softmax(ranked / T, -1)
                cum = torch.cumsum(logq.exp(), 1)
                # the joint mass of the first n ranks and of the rest, by one cumulative sum (the rest's share is
                # float rounding only where it is under ~1e-12 of the whole, and then it weighs nothing)
                x = logq + llr
                top = x.max(1, keepdim=True).values
                pre = torch.cumsum(torch.exp(x - top), 1)
                whole = pre[:, -1]
                neg = -logq
                within = {mp: _min_p_counts(neg, mp) for mp in min_ps if mp > 0}
                del neg
                for p, k, mp in truncations:
                    n = _kept_counts(cum, p, k, within.get(mp))
                    mass, kept = cum[rows, n - 1], pre[rows, n - 1]
                    inside = torch.log(kept) + top[:, 0]
                    outside = torch.log((whole - kept).clamp_min(0)) + top[:, 0]
                    for f in ((None,) if bool((n == V).all()) else floors):
                        if f is None:
                            total = float(inside.sum())
                        else:
                            total = float(torch.logaddexp(torch.log((1 - f) / mass + f) + inside,
                                                          np.log(f) + outside).sum())
                        fit = dict(repetition_penalty=r, presence_penalty=pp, frequency_penalty=fp,
                                   temperature=float(T), top_p=float(p), top_k=int(k), min_p=float(mp), floor=f,
                                   log_marginal=total)
                        if best is None or total > best[0]["log_marginal"]:
                            best = (fit, n, mass)
                        if (r, pp, fp) == (1.0, 0.0, 0.0) and f is None and (plain is None
                                                                              or total > plain["log_marginal"]):
                            plain = dict(fit)
                del logq, cum, x, pre
            del ranked, order, llr

    search(settings)
    grid = best
    for factors in ((0.5, 0.75, 1.25, 1.5), (0.85, 0.93, 1.07, 1.15))[:refine]:
        # a finer look around the grid's penalties: each one the best fit uses, scaled alone (a repetition
        # penalty by its excess over 1), the others held
        r0, pp0, fp0 = (best[0][k] for k in ("repetition_penalty", "presence_penalty", "frequency_penalty"))
        local = []
        if r0 != 1.0 and context is not None:
            local += [(1.0 + (r0 - 1.0) * f, pp0, fp0) for f in factors]
        if pp0 and picks is not None:
            local += [(r0, pp0 * f, fp0) for f in factors]
        if fp0 and picks is not None:
            local += [(r0, pp0, fp0 * f) for f in factors]
        search(local)
    fit, n, mass = best
    scores = _echo_scores(logits, ll, context, picks, fit, n, mass)
    if refine or grid_scores:
        fit = dict(fit, grid={k: grid[0][k] for k in ("repetition_penalty", "presence_penalty",
                                                       "frequency_penalty", "log_marginal")})
    if fit["floor"] is None:
        fit["top_p"], fit["top_k"], fit["min_p"] = 1.0, 0, 0.0
    untruncated = None if plain is None else {"temperature": plain["temperature"],
                                              "log_marginal": plain["log_marginal"]}
    fit = dict(fit, untruncated=untruncated)
    if grid_scores:
        if plain_scores:
            raise ValueError("ask for the grid's scores or the plain softmax's, not both")
        return scores, fit, (scores if grid is best else _echo_scores(logits, ll, context, picks, *grid))
    if not plain_scores:
        return scores, fit
    return scores, fit, None if plain is None else _echo_scores(logits, ll, None, None, plain, None, None)


def _echo_scores(logits: torch.Tensor, ll: torch.Tensor, context: torch.Tensor | None, picks, fit: dict, n, mass):
    """The posterior scores (token order) of :func:`echo_posterior` under one fitted sampler model (``n`` and
    ``mass``: each row's kept count and kept probability, where the model truncates)."""
    penalised = _penalised(logits, context, fit["repetition_penalty"], picks, fit["presence_penalty"],
                           fit["frequency_penalty"])
    ranked, order = torch.sort(penalised, dim=1, descending=True)
    x = torch.log_softmax(ranked / fit["temperature"], -1) + torch.gather(ll, 1, order)
    if fit["floor"] is not None:
        f = fit["floor"]
        inside = torch.arange(x.shape[1])[None, :] < n[:, None]
        x = x + torch.where(inside, torch.log((1 - f) / mass + f)[:, None], torch.tensor(np.log(f), dtype=x.dtype))
    return torch.empty_like(x).scatter_(1, order, x)


@torch.no_grad()
def read_answers(t: Target, key: WeightKey, hidden: torch.Tensor, k: int | None = None,
                 echoes: torch.Tensor | None = None, alpha: float = 0.0, shape: str = "row") -> np.ndarray:
    """Top-k plain candidates (m, k) for the token the client picks after each final hidden state (m x d') the server
    returned in the client-held deployment: the state through ``key`` into the plain frame, then the public head
    (the final norm's gamma folded in). With ``echoes`` (m' x d', m' <= m), the vector the client sent back with
    each of the first m' picks as its next input (occurrence noise of public level ``alpha``), those picks are ranked
    by :func:`echo_posterior`; picks without an echo (the last of a reply cut at the token cap) by the state alone."""
    k = k or t.budget.topk
    cand = torch.topk(key.embed_side(hidden) @ t.plain_head.double().T, k, dim=1).indices
    if echoes is not None and len(echoes):
        scores, _ = echo_posterior(t, key, hidden, echoes, alpha, shape)
        cand[: len(echoes)] = torch.topk(scores, k, dim=1).indices
    return cand.numpy()


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None) -> IdGuess:
    """Every movable obfuscated id read through the key the body gives: its embedding row and, when the server
    holds the head, its head row, by their summed likelihood under the profile's public noise. Reads the same ids
    as the other per-id attacks; no claim on rows the server does not hold."""
    q_ids, uniform = t.query_ids(must=received)
    k = t.budget.topk
    held = t.held_rows[torch.as_tensor(q_ids)]
    if not bool(held.any()):  # the client keeps the tables: no rows to read
        return IdGuess(q_ids, -np.ones((len(q_ids), k), dtype=np.int64), uniform=uniform, extra={"rows_held": 0})
    key = recover(t, progress)
    prof = t.profile
    shape = prof.get("noise_shape", "entry")
    row = shape == "row"
    qi = torch.as_tensor(q_ids)
    E, H = t.plain_embed, t.plain_head
    sides = [(key.embed_side(t.obf_embed[qi]), E, max(_sigma2(E, float(prof.get("alpha_e", 0.0)), shape, row,
                                                              E.shape[1]), FLOOR))]
    if t.head_held:
        sides.append((key.head_side(t.obf_head[qi]), H,
                      max(_sigma2(H, float(prof.get("alpha_h", 0.0)), shape, row, H.shape[1]), FLOOR)))
    cand = t.no_claim_on_unheld(q_ids, torch.as_tensor(key_regression.read(sides, t.movable_ids, k, row)))
    return IdGuess(q_ids, cand.numpy(), uniform=uniform, extra={"sides": len(sides), **key.summary()})
