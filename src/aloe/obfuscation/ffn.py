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
