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
