"""FFN / SwiGLU (section 2.5), Hugging Face layout (out x in)::

    W~_gate = Q_gate W_gate Z_ffn      W~_up = Q_up W_up H_ffn Z_ffn      W~_down = Z_ffn^-1 H_ffn^-1 W_down P_down

Exact: SiLU(a Z) = SiLU(a) Z and (a Z) * (b H Z) = (a * b H) Z. The scaling goes on *up* only (SiLU is not linear).
"""

from __future__ import annotations

import numpy as np

from aloe.obfuscation.keys import KeyBases
from aloe.obfuscation.rng import SecureRandom


def obfuscate_ffn(w: dict[str, np.ndarray], gamma: np.ndarray, *, keys: KeyBases, rng: SecureRandom,
                  scale: tuple[float, float], writer_key: np.ndarray) -> dict[str, np.ndarray]:
    """``w`` holds ``gate``, ``up`` (ffn x d), ``down`` (d x ffn) and optional ``*_bias``; ``gamma`` is the weight of
    the RMSNorm before the FFN (folded into gate and up); ``writer_key`` is P_down."""
    n_ffn = w["gate"].shape[0]
    sigma = rng.child("perm").permutation(n_ffn)     # unit j moves to position sigma[j]
    t = rng.child("scale").uniform((n_ffn,), *scale)
    readers = rng.child("readers")
    out: dict[str, np.ndarray] = {}
    gate = keys.inv_keymat_gen(readers) @ (w["gate"] * gamma[None, :]).T          # d' x ffn
    up = keys.inv_keymat_gen(readers) @ (w["up"] * gamma[None, :]).T * t[None, :]
    out["gate"] = np.empty((n_ffn, keys.d_out))
    out["gate"][sigma] = gate.T
    out["up"] = np.empty((n_ffn, keys.d_out))
    out["up"][sigma] = up.T
    P = writer_key
    down = np.empty((n_ffn, keys.d_out))
    down[sigma] = (w["down"].T / t[:, None]) @ P
    out["down"] = down.T
    if "gate_bias" in w:
        out["gate_bias"] = np.empty(n_ffn)
        out["gate_bias"][sigma] = w["gate_bias"]
    if "up_bias" in w:
        out["up_bias"] = np.empty(n_ffn)
        out["up_bias"][sigma] = w["up_bias"] * t
    if "down_bias" in w:
        out["down_bias"] = w["down_bias"] @ P
    return out


def obfuscate_ffn_f32(get, gamma: np.ndarray, n_ffn: int, *, keys, fast, rng: SecureRandom, scale: tuple[float, float],
                      writer_factor):
    """:func:`obfuscate_ffn` in float32 with the factored keys (``fast``: a
    :class:`aloe.obfuscation.keys.Float32Keys`; ``writer_factor``: the fresh part of P_down, None for the shared P),
    drawing the same secrets in the same order. ``get(key)`` returns the plain torch weight ``gate``, ``up``,
    ``down`` or a float64 numpy ``*_bias`` (None when absent); the result is yielded one tensor at a time under the
    same keys, each plain weight read only when its turn comes. The unit permutation is applied to the inputs
    (ffn x d) rather than the outputs (ffn x d')."""
    import torch

    sigma = rng.child("perm").permutation(n_ffn)
    t = rng.child("scale").uniform((n_ffn,), *scale)
    readers = rng.child("readers")
    inv_np = np.argsort(sigma)
    inv = torch.from_numpy(inv_np)                  # output row k holds plain unit inv[k]
    g32, t32 = torch.from_numpy(gamma).float(), torch.from_numpy(t).float()
    G_gate, G_up = keys.reader_factor(readers), keys.reader_factor(readers)
    x = get("gate").float()[inv].mul_(g32[None, :])
    yield "gate", fast.read(x, G_gate)
    x = get("up").float()[inv].mul_(g32[None, :]).mul_(t32[inv][:, None])
    yield "up", fast.read(x, G_up)
    del x
    yield "down", fast.write_t(get("down").float()[:, inv].div_(t32[inv][None, :]), writer_factor)
    b = get("gate_bias")
    if b is not None:
        yield "gate_bias", b[inv_np]
    b = get("up_bias")
    if b is not None:
        yield "up_bias", (b * t)[inv_np]
    b = get("down_bias")
    if b is not None:
        yield "down_bias", fast.write_vector(b, writer_factor)
