"""Sparse MoE blocks (section 2.6): router, experts and a shared expert, Hugging Face layout (out x in).

For a router ``W_r`` (n_experts x d) reading the normed residual, with the norm's gamma folded in::

    W~_r = Q_r diag(gamma) W_r^T Z_router          expert e  ->  slot pi(e), obfuscated as an FFN (section 2.5)

- Z_router (the permutation pi of the experts) moves router row e to row pi(e) and expert e's weights to slot pi(e):
  the obfuscated logits are the plain ones permuted, and softmax, top-k and the renormalisation of the top-k weights
  are permutation-equivariant, so every token reaches the same experts with the same weights: exact.
- Each expert is an FFN with its own unit permutation and up-scaling (:func:`aloe.obfuscation.ffn.obfuscate_ffn`).
- The router and the shared expert's gate read the normed residual: the same reader transform (a fresh Q) as gate/up.
- The block writes the residual through one key P per layer (every expert's down projection and the shared expert's),
  so the weighted sum of the experts' outputs is written through P as a whole.
"""

from __future__ import annotations

import numpy as np

from aloe.obfuscation.ffn import obfuscate_ffn
from aloe.obfuscation.rng import SecureRandom


def obfuscate_router(router: np.ndarray, gamma: np.ndarray, Q: np.ndarray, slot: np.ndarray | None) -> np.ndarray:
    """A linear map from the normed residual to a few logits (router, shared-expert gate): gamma folded, read through
    Q (d' x d), rows moved to ``slot`` (None: unmoved)."""
    rows = (Q @ (router * gamma[None, :]).T).T
    if slot is None:
        return rows
    out = np.empty_like(rows)
    out[slot] = rows
    return out


def obfuscate_moe(experts: list[dict[str, np.ndarray]], router: np.ndarray, gamma: np.ndarray, *, keys,
                  rng: SecureRandom, scale: tuple[float, float], writer_key: np.ndarray,
                  shared: dict[str, np.ndarray] | None = None, shared_gate: np.ndarray | None = None,
                  permute_experts: bool = True) -> dict:
    """``experts[e]`` holds ``gate``, ``up``, ``down`` of plain expert e; ``router`` is n_experts x d. Returns
    ``experts`` (obfuscated, in slot order), ``router``, and ``shared`` / ``shared_gate`` when given."""
    n = len(experts)
    slot = rng.child("expert-perm").permutation(n) if permute_experts else np.arange(n)
    readers = rng.child("readers")
    out: dict = {"router": obfuscate_router(router, gamma, keys.inv_keymat_gen(readers), slot),
                 "experts": [None] * n}
    for e, w in enumerate(experts):
        out["experts"][slot[e]] = obfuscate_ffn(w, gamma, keys=keys, rng=rng.child(f"expert{e}"), scale=scale,
                                                writer_key=writer_key)
    if shared is not None:
        out["shared"] = obfuscate_ffn(shared, gamma, keys=keys, rng=rng.child("shared"), scale=scale,
                                      writer_key=writer_key)
    if shared_gate is not None:
        out["shared_gate"] = obfuscate_router(shared_gate, gamma, keys.inv_keymat_gen(readers), None)
    return out


def obfuscate_moe_f32(get_expert, n_experts: int, n_ffn: int, router, gamma: np.ndarray, *, keys, fast,
                      rng: SecureRandom, scale: tuple[float, float], writer_factor, shared=None, shared_ffn: int = 0,
                      shared_gate=None, permute_experts: bool = True):
    """:func:`obfuscate_moe` in float32 with the factored keys, drawing the same secrets in the same order, one
    expert at a time: yields ``("router", W)``, then ``(slot, name, W)`` per expert tensor (``get_expert(e)`` gives
    the ``get`` of :func:`aloe.obfuscation.ffn.obfuscate_ffn_f32` for plain expert e), then ``("shared", name, W)``
    and ``("shared_gate", W)`` when given."""
    import torch

    from aloe.obfuscation.ffn import obfuscate_ffn_f32

    slot = rng.child("expert-perm").permutation(n_experts) if permute_experts else np.arange(n_experts)
    readers = rng.child("readers")
    g32 = torch.from_numpy(gamma).float()
    rows = fast.read(router.float() * g32[None, :], keys.reader_factor(readers))
    out = torch.empty_like(rows)
    out[torch.from_numpy(slot)] = rows
    yield "router", out
    for e in range(n_experts):
        for name, t in obfuscate_ffn_f32(get_expert(e), gamma, n_ffn, keys=keys, fast=fast, rng=rng.child(f"expert{e}"),
                                         scale=scale, writer_factor=writer_factor):
            yield int(slot[e]), name, t
    if shared is not None:
        for name, t in obfuscate_ffn_f32(shared, gamma, shared_ffn, keys=keys, fast=fast, rng=rng.child("shared"),
                                         scale=scale, writer_factor=writer_factor):
            yield "shared", name, t
    if shared_gate is not None:
        yield "shared_gate", fast.read(shared_gate.float() * g32[None, :], keys.reader_factor(readers))
