"""Attention (Algorithm 2, section 2.4), per KV-head group, in Hugging Face weight layout (out x in).

For the q heads i of group g (row-vector convention)::

    W~_q^(i) = Q_q^(i) W_q^(i) R H Z_block        W~_k^(g) = Q_k^(g) W_k^(g) R H^-1 Z_block
    W~_v^(g) = Q_v^(g) W_v^(g) U_vo               W~_o^(i) = U_vo^-1 W_o^(i) P_o^(i)

- R: a 2x2 rotation on every RoPE pair (j, j + head_dim/2) (HF's rotate_half layout). It commutes with RoPE: exact.
- H: one scale per pair, on both of its coordinates: exact (q k^T unchanged, commutes with RoPE).
- Z_block: a windowed permutation of the pairs (BlockPerm(beta, gamma)); a pair moved to another position is rotated
  by that position's RoPE frequency, so this is the one approximate step. beta = 1 turns it off.
- U_vo: a well-conditioned random matrix between v and o: exact.
- KV heads are permuted (and their q-head groups with them), and q heads are permuted within each group: exact.

R, H, Z_block and U_vo are shared by the q heads of one group (they read the same K and V).

QK-norm (Qwen3, Gemma 3: an RMSNorm over head_dim on every q and k head, before RoPE, with one weight vector shared
by all heads; docs/aloepri.md, "QK-norm"): the map inside the norm must keep the norm, so W_q and W_k get only
``R Z_block`` with R restricted to quarter turns, and H moves into the norm weights,
``diag(w~) = Z^T R^T diag(w) R diag(H) Z`` (``H^-1`` for k), which is diagonal exactly for quarter turns. Because the
weight is shared by all heads, R, H and Z_block are drawn once per layer; U_vo stays per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aloe.obfuscation.keys import KeyBases
from aloe.obfuscation.rng import SecureRandom


def pair_rotation(angles: np.ndarray) -> np.ndarray:
    """R (head_dim x head_dim): rotation by ``angles[j]`` in the plane of coordinates (j, j + head_dim/2)."""
    half = len(angles)
    R = np.zeros((2 * half, 2 * half))
    c, s = np.cos(angles), np.sin(angles)
    j = np.arange(half)
    R[j, j] = c
    R[j, j + half] = s
    R[j + half, j] = -s
    R[j + half, j + half] = c
    return R


def block_permutation(rng: SecureRandom, inv_freq: np.ndarray, beta: int, gamma: float) -> np.ndarray:
    """BlockPerm(beta, gamma): ``sigma[j]`` is the new position of RoPE pair j.

    Walking from the highest frequency, a window of w in [1, min(beta, remaining)] pairs is drawn with probability
    softmax(gamma * (freq[t + w - 1] - freq[t])) and its pairs are shuffled uniformly, so high-frequency pairs almost
    never move and only close low frequencies are exchanged.
    """
    m = len(inv_freq)
    sigma = np.arange(m)
    t = 0
    while t < m:
        c = min(beta, m - t)
        logits = gamma * (inv_freq[t:t + c] - inv_freq[t])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        w = int(np.searchsorted(np.cumsum(p), rng.uniform(()) * 1.0, side="right")) + 1
        w = min(w, c)
        sigma[t:t + w] = t + rng.permutation(w)
        t += w
    return sigma


def pair_permutation_matrix(sigma: np.ndarray) -> np.ndarray:
    """Z_block as a head_dim x head_dim matrix: ``(x Z)[sigma[j]] = x[j]`` for both coordinates of each pair."""
    half = len(sigma)
    Z = np.zeros((2 * half, 2 * half))
    j = np.arange(half)
    Z[j, sigma] = 1.0
    Z[j + half, sigma + half] = 1.0
    return Z


def well_conditioned(rng: SecureRandom, n: int, spread: float = 2.0) -> np.ndarray:
    """U = O1 diag(s) O2 with s in [1/spread, spread]: random, invertible, condition number <= spread^2."""
    s = np.exp(rng.uniform((n,), -np.log(spread), np.log(spread)))
    return (rng.orthogonal(n) * s) @ rng.orthogonal(n)


@dataclass
class GroupTransform:
    """The secret intra-head maps of one KV group (head_dim x head_dim each; H as the vector of its diagonal)."""

    A_q: np.ndarray
    A_k: np.ndarray
    A_v: np.ndarray
    A_o: np.ndarray
    sigma: np.ndarray
    R: np.ndarray
    H: np.ndarray
    Zb: np.ndarray


def group_transform(rng: SecureRandom, inv_freq: np.ndarray, *, beta: int, gamma: float,
                    qk_scale: tuple[float, float], vo_spread: float, quarter_turns: bool = False) -> GroupTransform:
    """``quarter_turns`` restricts the pair rotations to multiples of pi/2 (the ones exact under QK-norm)."""
    half = len(inv_freq)
    u = rng.uniform((half,), 0.0, 2 * np.pi)
    R = pair_rotation(np.floor(u / (np.pi / 2)) * (np.pi / 2) if quarter_turns else u)
    s = rng.uniform((half,), *qk_scale)
    H = np.concatenate([s, s])
    sigma = block_permutation(rng, inv_freq, beta, gamma) if beta > 1 else np.arange(half)
    Zb = pair_permutation_matrix(sigma)
    U = well_conditioned(rng, 2 * half, vo_spread)
    return GroupTransform(A_q=(R * H) @ Zb, A_k=(R / H) @ Zb, A_v=U, A_o=np.linalg.inv(U), sigma=sigma, R=R, H=H,
                          Zb=Zb)


def qk_norm_weight(t: GroupTransform, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The QK-norm weight (as a multiplier) of the obfuscated model: ``diag(w~) = Z^T R^T diag(w) R diag(scale) Z``.

    With ``W~ = W R Z`` (no H) the stock engine computes ``RMSNorm(q R Z) w~ = RMSNorm(q) R Z diag(w~)``, which
    equals ``(RMSNorm(q) w) R diag(scale) Z``, the plain normed q under the usual R H Z, iff the product is diagonal;
    it is for quarter-turn R (a quarter turn swaps the two weights of its pair). Anything else is refused."""
    M = t.Zb.T @ t.R.T @ (weight[:, None] * t.R) @ (scale[:, None] * t.Zb)
    diag = np.diag(M).copy()
    if np.abs(M - np.diag(diag)).max() > 1e-12 * max(1.0, np.abs(diag).max()):
        raise ValueError("the pair rotation does not commute with the QK-norm weight (quarter turns only)")
    return diag


def attention_secrets(rng: SecureRandom, *, n_heads: int, n_kv: int, inv_freq: np.ndarray, beta: int,
                      gamma_bp: float, qk_scale: tuple[float, float], vo_spread: float, permute_heads: bool = True,
                      qk_norm: tuple[np.ndarray, np.ndarray] | None = None, qk_gain: float = 1.0):
    """The secret maps of one attention block: the KV-head slots, per group its :class:`GroupTransform` and the
    permutation of its q heads, and the QK-norm weights (multipliers; empty without QK-norm)."""
    G = n_heads // n_kv
    kv_slot = rng.child("kv-perm").permutation(n_kv) if permute_heads else np.arange(n_kv)
    norms, shared = {}, None
    if qk_norm is not None:
        shared = group_transform(rng.child("qk-norm"), inv_freq, beta=beta, gamma=gamma_bp, qk_scale=qk_scale,
                                 vo_spread=vo_spread, quarter_turns=True)
        norms = {"q_norm": qk_norm_weight(shared, qk_norm[0], shared.H),
                 "k_norm": qk_norm_weight(shared, qk_norm[1], 1.0 / shared.H)}
    groups = []
    for g in range(n_kv):
        t = group_transform(rng.child(f"group{g}"), inv_freq, beta=beta, gamma=gamma_bp, qk_scale=qk_scale,
                            vo_spread=vo_spread)
        if shared is not None:
            A = qk_gain * shared.R @ shared.Zb
            t = GroupTransform(A_q=A, A_k=A, A_v=t.A_v, A_o=t.A_o, sigma=shared.sigma, R=shared.R, H=shared.H,
                               Zb=shared.Zb)
        in_group = rng.child(f"group{g}/perm").permutation(G) if permute_heads else np.arange(G)
        groups.append((t, in_group))
    return kv_slot, groups, norms


def obfuscate_attention(w: dict[str, np.ndarray], gamma: np.ndarray, *, n_heads: int, n_kv: int, head_dim: int,
                        keys: KeyBases, rng: SecureRandom, inv_freq: np.ndarray, beta: int, gamma_bp: float,
                        qk_scale: tuple[float, float], vo_spread: float, writer_keys: list[np.ndarray],
                        permute_heads: bool = True, qk_norm: tuple[np.ndarray, np.ndarray] | None = None,
                        qk_gain: float = 1.0) -> dict[str, np.ndarray]:
    """Obfuscate one attention block.

    ``w`` holds ``q``, ``k``, ``v``, ``o`` weights (HF layout) and optionally ``q_bias``, ``k_bias``, ``v_bias``,
    ``o_bias``; ``gamma`` is the weight of the RMSNorm before attention (folded into q, k, v); ``writer_keys[i]`` is
    the key P_o of plain q head i (and ``writer_keys[0]`` also carries the o bias).

    ``qk_norm`` = (w_q, w_k), the QK-norm weights as multipliers (head_dim each), switches to the QK-norm transform
    (module docstring) and adds ``q_norm`` / ``k_norm`` (multipliers) to the result. ``qk_gain`` scales q and k
    before their norm: ``RMSNorm_{eps g^2}(g q) = RMSNorm_eps(q)``, so a norm epsilon scaled by g^2 stays exact.
    """
    G = n_heads // n_kv
    hd = head_dim
    d_out = keys.d_out
    kv_slot, groups, norms = attention_secrets(
        rng, n_heads=n_heads, n_kv=n_kv, inv_freq=inv_freq, beta=beta, gamma_bp=gamma_bp, qk_scale=qk_scale,
        vo_spread=vo_spread, permute_heads=permute_heads, qk_norm=qk_norm, qk_gain=qk_gain)
    out = {
        "q": np.empty((n_heads * hd, d_out)), "k": np.empty((n_kv * hd, d_out)),
        "v": np.empty((n_kv * hd, d_out)), "o": np.empty((d_out, n_heads * hd)), **norms,
    }
    for name, n in (("q_bias", n_heads), ("k_bias", n_kv), ("v_bias", n_kv)):
        if name in w:
            out[name] = np.empty(n * hd)
    readers = rng.child("readers")
    for g, (t, in_group) in enumerate(groups):
        gs = slice(g * hd, (g + 1) * hd)
        ks = slice(kv_slot[g] * hd, (kv_slot[g] + 1) * hd)
        for name, A in (("k", t.A_k), ("v", t.A_v)):
            Wp = (w[name][gs] * gamma[None, :]).T               # d x hd, gamma folded
            out[name][ks] = (keys.inv_keymat_gen(readers) @ Wp @ A).T
            if f"{name}_bias" in w:
                out[f"{name}_bias"][ks] = w[f"{name}_bias"][gs] @ A
        for r in range(G):
            i = g * G + r
            j = kv_slot[g] * G + in_group[r]
            src, dst = slice(i * hd, (i + 1) * hd), slice(j * hd, (j + 1) * hd)
            Wq = (w["q"][src] * gamma[None, :]).T
            out["q"][dst] = (keys.inv_keymat_gen(readers) @ Wq @ t.A_q).T
            if "q_bias" in w:
                out["q_bias"][dst] = w["q_bias"][src] @ t.A_q
            Wo = w["o"][:, src].T                                 # hd x d
            out["o"][:, dst] = (t.A_o @ Wo @ writer_keys[i]).T
    if "o_bias" in w:
        out["o_bias"] = w["o_bias"] @ writer_keys[0]
    return out


def obfuscate_attention_f32(get, gamma: np.ndarray, *, n_heads: int, n_kv: int, head_dim: int, keys, fast,
                            rng: SecureRandom, writer_factors: list, **secrets):
    """:func:`obfuscate_attention` in float32 with the factored keys (``fast``: a
    :class:`aloe.obfuscation.keys.Float32Keys`; ``writer_factors[i]``: the fresh part of P_o of q head i), drawing
    the same secrets in the same order. ``get(key)`` returns the plain torch weight ``q``, ``k``, ``v``, ``o`` or a
    float64 numpy ``*_bias`` (None when absent); the result is yielded one tensor at a time under the same keys
    (biases and QK-norm weights as float64 numpy), each plain weight read only when its turn comes. All heads of one
    projection are one batched product."""
    import torch

    G, hd = n_heads // n_kv, head_dim
    kv_slot, groups, norms = attention_secrets(rng, n_heads=n_heads, n_kv=n_kv, **secrets)
    readers = rng.child("readers")
    g32 = torch.from_numpy(gamma).float()
    # the destination slot of every plain head, its transform and the fresh part of its reader, in the draw order
    dst = {"k": np.asarray(kv_slot[:n_kv]), "v": np.asarray(kv_slot[:n_kv]), "q": np.empty(n_heads, dtype=np.int64)}
    A = {name: np.empty((n_heads if name in "qo" else n_kv, hd, hd)) for name in "qkvo"}
    factors = {"k": [None] * n_kv, "v": [None] * n_kv, "q": [None] * n_heads}
    for g, (t, in_group) in enumerate(groups):
        for name, M in (("k", t.A_k), ("v", t.A_v)):
            A[name][g] = M
            factors[name][g] = keys.reader_factor(readers)
        for r in range(G):
            i = g * G + r
            dst["q"][i] = kv_slot[g] * G + in_group[r]
            A["q"][i], A["o"][i] = t.A_q, t.A_o
            factors["q"][i] = keys.reader_factor(readers)
    yield from norms.items()

    def placed(rows, slots):
        res = torch.empty_like(rows)
        res[torch.from_numpy(slots)] = rows
        return res.reshape(len(slots) * hd, -1)

    for name in ("q", "k", "v"):
        n = len(dst[name])
        W = get(name).float().reshape(n, hd, -1) * g32                    # plain heads, gamma folded
        At = torch.from_numpy(np.ascontiguousarray(A[name].transpose(0, 2, 1))).float()
        yield name, placed(fast.read(torch.bmm(At, W), np.stack(factors[name])), dst[name])
        del W
        b = get(f"{name}_bias")
        if b is not None:
            b = np.einsum("nh,nhk->nk", b.reshape(n, hd), A[name])
            out = np.empty_like(b)
            out[dst[name]] = b
            yield f"{name}_bias", out.reshape(-1)
    Wo = get("o").float().T.reshape(n_heads, hd, -1)                     # head i: hd x d
    Gw = None if writer_factors[0] is None else np.stack(writer_factors)
    rows = fast.write(torch.bmm(torch.from_numpy(A["o"]).float(), Wo), Gw)
    del Wo
    yield "o", placed(rows, dst["q"]).T.contiguous()
    b = get("o_bias")
    if b is not None:
        yield "o_bias", fast.write_vector(b, writer_factors[0])
