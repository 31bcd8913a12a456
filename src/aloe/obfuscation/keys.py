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

Everything is float64; weights are cast to the deployment dtype only at the end. For float32/16/bfloat16 outputs the
conversion uses the factored form of the same keys (:class:`Float32Keys`): every reader is ``Q = Q0 + U G`` and
every writer ``P = P0 + G_w V`` with the fresh parts G, G_w drawn exactly as InvKeyMatGen / KeyMatGen draw them, so
the products run as float32 GEMMs without building a d' x d' product per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

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
    _fixed_writer: np.ndarray | None = field(default=None, repr=False)

    @property
    def d_out(self) -> int:
        return self.d + 2 * self.h

    def keymat_gen(self, rng: SecureRandom | None = None) -> np.ndarray:
        """KeyMatGen: a writer key P (d x d'). Fresh C per call in the paper design; the shared P otherwise
        (computed once; read-only)."""
        if self.C_fixed is not None:
            if self._fixed_writer is None:
                P = np.concatenate([self.B, self.C_fixed, self.E], axis=1) @ self.Z
                P.flags.writeable = False
                self._fixed_writer = P
            return self._fixed_writer
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

    def reader_factor(self, rng: SecureRandom | None = None) -> np.ndarray:
        """The fresh part G (h/2 x d) of one reader, drawn as :meth:`inv_keymat_gen` draws it: Q = Q0 + U G."""
        return (rng or self.rng).normal((self.h // 2, self.d), std=self.d ** -0.5)

    def reader_base(self) -> tuple[np.ndarray, np.ndarray]:
        """(Q0, U) with every reader ``Q = Q0 + U G``."""
        d, h, Zt = self.d, self.h, self.Z.T
        return Zt[:, :d] @ self.B_inv + Zt[:, d:d + h] @ self.F, Zt[:, d + h:] @ self.D_cols

    def writer_factor(self, rng: SecureRandom | None = None) -> np.ndarray | None:
        """The fresh part G_w (d x h/2) of one writer, drawn as :meth:`keymat_gen` draws it (None: the shared P)."""
        if self.C_fixed is not None:
            return None
        return (rng or self.rng).normal((self.d, self.h // 2), std=self.d ** -0.5)

    def writer_base(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(P0, V) with every writer ``P = P0 + G_w V`` (V None: one shared P)."""
        if self.C_fixed is not None:
            return self.keymat_gen(), None
        d, h, Z = self.d, self.h, self.Z
        return self.B @ Z[:d] + self.E @ Z[d + h:], self.C_rows @ Z[d:d + h]


class Float32Keys:
    """The factored keys in float32 torch, and the products of weights with them (the float32 conversion path).

    ``read(M, G)`` is ``M Q^T`` and ``write(N, Gw)`` is ``N P`` for a stack of row blocks (one fresh part per
    block); ``write_t(X, Gw)`` is ``P^T X``. A reader is applied in factored form (``M Q0^T + (M G^T) U^T``) for thin
    blocks and formed first (``Q0 + U G``) for tall ones, whichever costs fewer multiply-adds.
    """

    def __init__(self, keys) -> None:
        Q0, U = keys.reader_base()
        P0, V = keys.writer_base()
        self.d, self.d_out = Q0.shape[1], Q0.shape[0]
        self.Q0t = torch.from_numpy(np.ascontiguousarray(Q0.T)).float()   # d x d'
        self.Ut = torch.from_numpy(np.ascontiguousarray(U.T)).float()     # r x d'
        self.P0 = torch.from_numpy(np.array(P0)).float()      # d x d'
        self.V = None if V is None else torch.from_numpy(np.ascontiguousarray(V)).float()   # h/2 x d'
        self.P0_64, self.V_64 = P0, V      # float64, for the few small products kept in float64 (biases)

    def write_vector(self, b: np.ndarray, Gw) -> np.ndarray:
        """``b P`` in float64 for one vector (a bias)."""
        return b @ self.P0_64 if Gw is None or self.V_64 is None else b @ self.P0_64 + (b @ Gw) @ self.V_64

    @staticmethod
    def _t(a) -> torch.Tensor:
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a)).float()

    def read(self, M: torch.Tensor, G) -> torch.Tensor:
        """``M`` (n x k x d) or (k x d), ``G`` (n x r x d) or (r x d): each block times its own ``Q^T``."""
        G = self._t(G)
        k, d, r = M.shape[-2], self.d, G.shape[-2]
        if r and d * self.d_out < k * (d + self.d_out):  # tall blocks: form Q^T = Q0^T + G^T U^T, multiply once
            return torch.matmul(M, self.Q0t + G.transpose(-1, -2) @ self.Ut)
        out = (M.reshape(-1, d) @ self.Q0t).reshape(*M.shape[:-1], self.d_out)
        if r == 0:
            return out
        return out.add_(torch.matmul(torch.matmul(M, G.transpose(-1, -2)), self.Ut))

    def write(self, N: torch.Tensor, Gw) -> torch.Tensor:
        """``N`` (n x k x d) or (k x d), ``Gw`` (n x d x h/2), (d x h/2) or None: each block times its own P."""
        out = (N.reshape(-1, self.d) @ self.P0).reshape(*N.shape[:-1], self.d_out)
        if self.V is None or Gw is None:
            return out
        return out.add_(torch.matmul(torch.matmul(N, self._t(Gw)), self.V))

    def write_t(self, X: torch.Tensor, Gw) -> torch.Tensor:
        """``P^T X`` for X (d x k)."""
        out = self.P0.T @ X
        if self.V is None or Gw is None:
            return out
        return out.add_(self.V.T @ (self._t(Gw).T @ X))


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
