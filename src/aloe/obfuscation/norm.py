"""RMSNorm (section 2.3): fold gamma into the next linear layers, replace the norm by a uniform weight over d'.

``RMSNorm_d'(x~) Q = kappa * x / rms_d'(x~)``, and since ``x~ Q = x`` this equals ``RMSNorm_d(x)`` exactly when
``kappa * sqrt(d') / ||x~|| == sqrt(d) / ||x||``. With the exact-norm keys ``||x~|| = c ||x||`` for every x, so
``kappa = c sqrt(d/d')`` and the epsilon scales to ``eps * c^2 d / d'`` (both exact). With the paper's keys the ratio
``||x~|| / ||x||`` varies with the direction of x; kappa is then calibrated on real hidden states
(:func:`calibrated_kappa`) and the norm is approximate.
"""

from __future__ import annotations

import numpy as np


def fold_gamma(weight: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """``W <- diag(gamma) W`` for a linear layer stored as (out x in)."""
    return weight * gamma[None, :]


def exact_kappa(scale: float, d: int, d_out: int) -> float:
    return float(scale * np.sqrt(d / d_out))


def scaled_eps(eps: float, kappa: float) -> float:
    """The epsilon of the replacement norm: ``eps * kappa^2`` (= eps c^2 d/d' with exact keys)."""
    return float(eps * kappa * kappa)


def calibrated_kappa(plain: np.ndarray, obfuscated: np.ndarray) -> float:
    """kappa from real residual-stream samples: the mean of ``sqrt(d/d') ||x~|| / ||x||`` over rows."""
    d, d_out = plain.shape[1], obfuscated.shape[1]
    ratio = np.linalg.norm(obfuscated, axis=1) / np.maximum(np.linalg.norm(plain, axis=1), 1e-30)
    return float(np.sqrt(d / d_out) * ratio.mean())


def rms_norm(x: np.ndarray, weight: np.ndarray | float, eps: float) -> np.ndarray:
    """Reference RMSNorm over the last axis (as in Llama/Qwen2)."""
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


class SandwichKeys:
    """The residual key for models with post-sublayer (sandwich) norms, as Gemma 3 (docs/aloepri.md, "Gemma 3").

    A post-sublayer norm computes ``RMSNorm(o) diag(g)`` on a sublayer's output o before it joins the residual, so
    the obfuscated model must produce ``RMSNorm(o) diag(g) P`` from ``o P`` with a stock norm, whose weight is diagonal
    in d': ``P diag(g~) = kappa diag(g) P`` for every post norm's generic g. With ``P P^T = c^2 I`` (the pre-norms)
    that leaves keys whose every obfuscated coordinate carries one plain coordinate: plain coordinate i is spread
    over a secret set of slots K_i with secret signed weights of unit norm, times c, and every reader is
    ``P^T / c^2`` plus a fresh random part in the null space of P. It is exact; it does not mix coordinates.
    """

    design = "sandwich"

    def __init__(self, rng, d: int, h: int, scale: float | None = None) -> None:
        self.d, self.h = d, h
        self.scale = float(scale) if scale is not None else float(np.sqrt(self.d_out / d))
        self.rng = rng
        owner = np.concatenate([np.arange(d), np.floor(rng.uniform((2 * h,)) * d).astype(np.int64)])
        self.owner = owner[rng.permutation(self.d_out)]   # slot k carries plain coordinate owner[k]
        w = rng.normal((self.d_out,))
        norms = np.sqrt(np.bincount(self.owner, weights=w * w, minlength=d))
        self.P = np.zeros((d, self.d_out))
        self.P[self.owner, np.arange(self.d_out)] = self.scale * w / norms[self.owner]
        self._null = np.eye(self.d_out) - self.P.T @ self.P / self.scale ** 2

    @property
    def d_out(self) -> int:
        return self.d + 2 * self.h

    def keymat_gen(self, rng=None) -> np.ndarray:
        return self.P

    def inv_keymat_gen(self, rng=None) -> np.ndarray:
        r = rng or self.rng
        return self.P.T / self.scale ** 2 + self._null @ r.normal((self.d_out, self.d), std=self.d ** -0.5)

    def reader_factor(self, rng=None) -> np.ndarray:
        """The fresh part of one reader in factored form ``Q = Q0 + U G`` (G = U^T R, R drawn as
        :meth:`inv_keymat_gen` draws it)."""
        r = rng or self.rng
        return self._null_basis.T @ r.normal((self.d_out, self.d), std=self.d ** -0.5)

    def reader_base(self) -> tuple[np.ndarray, np.ndarray]:
        return self.P.T / self.scale ** 2, self._null_basis

    def writer_factor(self, rng=None) -> None:
        return None

    def writer_base(self) -> tuple[np.ndarray, None]:
        return self.P, None

    @property
    def _null_basis(self) -> np.ndarray:
        """Orthonormal columns (d' x 2h) spanning the null space of P (the projector ``_null`` = U U^T)."""
        if getattr(self, "_basis", None) is None:
            vals, vecs = np.linalg.eigh(self._null)
            self._basis = vecs[:, vals > 0.5]
        return self._basis

    def sheared_writer(self, rng, shear: float) -> np.ndarray:
        if shear:
            raise ValueError("a sheared embedding key is not available with sandwich norms")
        return self.P

    def post_norm_multiplier(self, g: np.ndarray, kappa: float) -> np.ndarray:
        """The stock weight (as a multiplier over d') of a post-sublayer norm with plain multiplier g."""
        return kappa * g[self.owner]
