"""Key matrices (Algorithm 1): one INIT per model, then KeyMatGen / InvKeyMatGen per use.

Row-vector convention, y = x W. With d the hidden size, h the expansion and d' = d + 2h:

- ``P = [B | C | E] Z`` (d x d') maps a residual-stream vector into the obfuscated space;
- ``Q = Z^T [B^-1 ; F ; D]`` (d' x d) maps it back;
- ``C F = 0`` and ``E D = 0``, so ``P_i Q_j = B B^-1 + C_i F + E D_j = I_d`` for *every* pair (i, j).

Two designs share these generators:

``paper``
    B = U + lambda V (U Haar-orthogonal, V Gaussian), E = E1 E2 and F = F1 F2 of rank h/2, Z Haar on O(d'), a fresh C
    for each writer. P is not a scaled co-isometry, so the replacement RMSNorm over d' is approximate
    (see :mod:`aloe.obfuscation.norm`).
``exact-norm``
    B = U diag(s) W with d - h singular values equal to c and h of them in [floor * c, c); M = c^2 I - B B^T is PSD of
    rank h and its factor L = [L1 | L2] gives C = L1 N (rows in the left null space of F, so C F = 0) and E = L2 N_E
    (with every fresh D built in the null space of E). Then ``P P^T = c^2 I`` and a stock RMSNorm with a uniform weight
    commutes exactly; the price is a single writer key P shared by every residual writer.

Everything is float64; weights are cast to the deployment dtype only at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aloe.obfuscation.rng import SecureRandom

DESIGNS = ("paper", "exact-norm")


def _orthonormal_rows(rng: SecureRandom, n: int) -> np.ndarray:
    return rng.orthogonal(n) if n else np.zeros((0, 0))


@dataclass
class KeyBases:
    """The per-model bases drawn by INIT. Only ever held by the client; never written into an artifact."""

    d: int
    h: int
    design: str
    B: np.ndarray          # d x d
    B_inv: np.ndarray      # d x d
    E: np.ndarray          # d x h, rank h/2
    F: np.ndarray          # h x d, rank h/2
    Z: np.ndarray          # d' x d', orthogonal
    C_rows: np.ndarray     # h/2 x h, orthonormal rows spanning the left null space of F (C = G C_rows)
    D_cols: np.ndarray     # h x h/2, orthonormal columns spanning the null space of E (D = D_cols G)
    scale: float           # c: P P^T = c^2 I in the exact-norm design (1.0 nominal for the paper design)
    C_fixed: np.ndarray | None = None  # exact-norm: the one C every writer uses
    rng: SecureRandom | None = None

    @property
    def d_out(self) -> int:
        return self.d + 2 * self.h

    def keymat_gen(self, rng: SecureRandom | None = None) -> np.ndarray:
        """KeyMatGen: a writer key P (d x d'). Fresh C per call in the paper design; the shared P otherwise."""
        if self.C_fixed is not None:
            C = self.C_fixed
        else:
            r = rng or self.rng
            C = r.normal((self.d, self.h // 2), std=self.d ** -0.5) @ self.C_rows
        return np.concatenate([self.B, C, self.E], axis=1) @ self.Z

    def sheared_writer(self, rng: SecureRandom, shear: float) -> np.ndarray:
        """A writer key for the embedding that is *not* a scaled isometry: the shared P with its C block moved by
        ``shear * G C_rows`` (G d x h/2 Gaussian with variance 2/h, so ``||e Delta|| ~ shear ||e||``).

        It still inverts exactly under every reader (``(C + Delta) F = 0`` because the rows of ``C_rows`` span the
        left null space of F), so ``P_e Q_j = I``; but ``P_e P_e^T != c^2 I`` and ``P_e P^T != c^2 I``: the stock
        RMSNorm is no longer exact on any residual that holds an embedding component (see docs/aloepri.md)."""
        base = self.keymat_gen(rng.child("base"))
        if shear == 0 or self.h == 0:
            return base
        G = rng.child("shear").normal((self.d, self.h // 2), std=(2.0 / self.h) ** 0.5)
        delta = np.zeros((self.d, self.d_out))
        delta[:, self.d:self.d + self.h] = shear * (G @ self.C_rows)
        return base + delta @ self.Z

    def inv_keymat_gen(self, rng: SecureRandom | None = None) -> np.ndarray:
        """InvKeyMatGen: a reader key Q (d' x d) with a fresh D; inverts every writer key."""
        r = rng or self.rng
        D = self.D_cols @ r.normal((self.h // 2, self.d), std=self.d ** -0.5)
        return self.Z.T @ np.concatenate([self.B_inv, self.F, D], axis=0)


def init_keys(rng: SecureRandom, d: int, h: int, *, design: str = "paper", lam: float = 0.3,
              scale: float | None = None, sv_floor: float = 0.5) -> KeyBases:
    """INIT(d, h, lambda) of Algorithm 1, in the chosen design (see the module docstring)."""
    if design not in DESIGNS:
        raise ValueError(f"unknown key design {design!r}; choose one of {DESIGNS}")
    if h < 0 or h % 2:
        raise ValueError("the expansion h must be a non-negative even number")
    if design == "exact-norm" and h > d:
        raise ValueError("the exact-norm design needs h <= d")
    half = h // 2
    d_out = d + 2 * h
    std = d ** -0.5
    # F = F1 F2 (rank h/2); its left null space holds the rows of every C.
    F = rng.normal((h, half), std=std) @ rng.normal((half, d), std=std) if h else np.zeros((0, d))
    if h:
        uF, _, _ = np.linalg.svd(F, full_matrices=True)
        C_rows = uF[:, half:].T.copy()
    else:
        C_rows = np.zeros((0, 0))
    Z = rng.orthogonal(d_out)

    if design == "paper":
        B = rng.orthogonal(d) + lam * rng.normal((d, d), std=std)
        E = rng.normal((d, half), std=std) @ rng.normal((half, h), std=std) if h else np.zeros((d, 0))
        if h:
            _, _, vE = np.linalg.svd(E, full_matrices=True)
            D_cols = vE[half:].T.copy()
        else:
            D_cols = np.zeros((0, 0))
        return KeyBases(d, h, design, B, np.linalg.inv(B), E, F, Z, C_rows, D_cols, 1.0, None, rng)

    c = float(scale) if scale is not None else float(np.sqrt(d_out / d))
    U = rng.orthogonal(d)
    W = rng.orthogonal(d)
    s = np.full(d, c)
    s[d - h:] = c * rng.uniform((h,), sv_floor, 1.0)
    B = (U * s) @ W
    B_inv = (W.T / s) @ U.T
    L = U[:, d - h:] * np.sqrt(c * c - s[d - h:] ** 2)  # L L^T = c^2 I - B B^T
    NE = _orthonormal_rows(rng, h)
    E = L[:, half:] @ NE[:half] if h else np.zeros((d, 0))
    D_cols = NE[half:].T.copy() if h else np.zeros((0, 0))
    C = L[:, :half] @ C_rows if h else np.zeros((d, 0))
    return KeyBases(d, h, design, B, B_inv, E, F, Z, C_rows, D_cols, c, C, rng)
