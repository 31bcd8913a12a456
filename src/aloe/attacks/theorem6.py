"""The paper's Theorem 6 (design notes section 2.8) as a cheap calculator for alpha_e / alpha_h.

For a static attacker with single-token success probability p_s::

    KL(p_s || 1/n) <= ((n - 1) / 2n) * log det M,
    M = I_2d + (1/(n-1)) S (I_n - J_n/n) S^T,   S = [sigma_e^-1 W_embed^T ; sigma_h^-1 W_head^T]

with sigma the *noise* standard deviations (alpha times each matrix's own standard deviation, as the mechanism
draws them). The bound is turned into the largest p_s compatible with it (binary KL against 1/n, by bisection).
"""

from __future__ import annotations

import math

import torch


def binary_kl(p: float, q: float) -> float:
    out = 0.0
    if p > 0:
        out += p * math.log(p / q)
    if p < 1:
        out += (1 - p) * math.log((1 - p) / (1 - q))
    return out


def max_success(bound: float, n: int) -> float:
    """Largest p in [1/n, 1] with KL(p || 1/n) <= bound."""
    q = 1.0 / n
    if bound >= binary_kl(1.0, q):
        return 1.0
    lo, hi = q, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binary_kl(mid, q) <= bound else (lo, mid)
    return lo


@torch.no_grad()
def theorem6(embed: torch.Tensor, head: torch.Tensor, alpha_e: float, alpha_h: float) -> dict:
    """``embed`` and ``head`` are the plain n x d tables (the head with the final norm folded in, as noised)."""
    n = embed.shape[0]
    if alpha_e <= 0 or alpha_h <= 0:
        return {"alpha_e": alpha_e, "alpha_h": alpha_h, "kl_bound": math.inf, "max_single_token_success": 1.0,
                "n": n}
    se, sh = alpha_e * float(embed.double().std()), alpha_h * float(head.double().std())
    S = torch.cat([embed.double().T / se, head.double().T / sh], 0)
    S = S - S.mean(1, keepdim=True)
    M = torch.eye(S.shape[0], dtype=torch.float64) + (S @ S.T) / (n - 1)
    sign, logdet = torch.linalg.slogdet(M)
    bound = (n - 1) / (2 * n) * float(logdet)
    return {"alpha_e": alpha_e, "alpha_h": alpha_h, "kl_bound": bound, "max_single_token_success":
            max_success(bound, n), "n": n, "chance": 1.0 / n}


def sweep(embed: torch.Tensor, head: torch.Tensor, alphas_e: list[float], alphas_h: list[float]) -> list[dict]:
    return [theorem6(embed, head, ae, ah) for ae in alphas_e for ah in alphas_h]



