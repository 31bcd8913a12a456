"""Non-linear functions (paper (a)): the one-round Fourier sigmoid and the ODE/Euler softmax, plus truncation,
opened (masked) operands with reusable masks, and max-pool on top of the G-module compare.

All functions take and return raw int64 fixed-point shares (``f = party.fp.frac_bits`` fractional bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from aloe.mpc import gmodule
from aloe.mpc.party import Party
from aloe.mpc.ring import truncate_share
from aloe.mpc.triples import MUL, Bilinear, meta

# ---------------------------------------------------------------- truncation


def truncate(party: Party, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
    """Local (SecureML) truncation of shares by ``bits`` (default: the fractional bits)."""
    if party.is_dealer:
        return x
    return truncate_share(x, party.fp.frac_bits if bits is None else bits, party.index)


# ---------------------------------------------------------------- opened operands (masks reused)


@dataclass
class Opened:
    """A shared value opened under a dealer mask: value = ``delta + mask`` where ``delta`` is public to L and R and
    ``mask`` is additively shared (each party holds its share; the dealer holds the whole mask).

    Linear combinations of opened values are opened values (masks and deltas combine alike), and the product of two
    opened values under a bilinear map costs no round: only a dealer correction. Opening a value once and using it
    in several products is how the triangle triple and the softmax save traffic."""

    delta: torch.Tensor | None
    mask: torch.Tensor

    def share(self, party: Party) -> torch.Tensor:
        """This party's additive share of the value."""
        if party.is_dealer:
            return meta(tuple(self.mask.shape))
        return self.delta + self.mask if party.role == "L" else self.mask

    def __add__(self, o: Opened) -> Opened:
        return Opened(None if self.delta is None else self.delta + o.delta, self.mask + o.mask)

    def __sub__(self, o: Opened) -> Opened:
        return Opened(None if self.delta is None else self.delta - o.delta, self.mask - o.mask)

    def add_public(self, c: torch.Tensor | int) -> Opened:
        return Opened(None if self.delta is None else self.delta + c, self.mask)


def open_masked(party: Party, *xs: torch.Tensor) -> Opened | list[Opened]:
    """Open each of ``xs`` under a fresh mask, all in one round (each party sends ``|x|`` ring elements per
    tensor). Returns one :class:`Opened` for one tensor, else a list."""
    if party.is_dealer:
        out = [Opened(None, party.draw("L", tuple(x.shape)) + party.draw("R", tuple(x.shape))) for x in xs]
    else:
        masks = [party.draw(party.role, tuple(x.shape)) for x in xs]
        ds = [x - m for x, m in zip(xs, masks, strict=True)]
        others = party.exchange([(d, 0) for d in ds])
        out = [Opened(d + o, m) for d, o, m in zip(ds, others, masks, strict=True)]
    return out[0] if len(out) == 1 else out


def mul_opened(party: Party, a: Opened, b: Opened, f: Bilinear = MUL) -> torch.Tensor:
    """Shares of ``f(a, b)`` for opened ``a``, ``b``: no round; the dealer sends ``64 |f(a, b)|`` bits to R."""
    if party.is_dealer:
        out = f(a.mask, b.mask)
        party.split(out, tuple(out.shape))
        return meta(tuple(out.shape))
    shape = tuple(f(meta(tuple(a.mask.shape)), meta(tuple(b.mask.shape))).shape)
    u = party.split(None, shape)
    if party.role == "L":
        return f(a.delta + a.mask, b.delta) + f(a.delta, b.mask) + u
    return f(a.mask, b.delta) + f(a.delta, b.mask) + u


# ---------------------------------------------------------------- Fourier sigmoid


SIGMOID_PERIOD_BITS = 5  # T = 2^5 = 32: the sine basis has period 32, inputs are valid in (-16, 16)
SIGMOID_TERMS = 8
SIGMOID_FIT_RANGE = 12.0


@lru_cache(maxsize=8)
def sigmoid_coefficients(terms: int = SIGMOID_TERMS, period_bits: int = SIGMOID_PERIOD_BITS,
                         fit_range: float = SIGMOID_FIT_RANGE) -> tuple[float, ...]:
    """Least-squares coefficients ``b_k`` of ``sigmoid(x) - 1/2 ~ sum_k b_k sin(2 pi k x / T)`` on
    ``[-fit_range, fit_range]`` (an odd function, so sines only). With 8 terms and range 12 the max error there is
    about 3e-3 (the code's 5 FFT coefficients: 0.036 on [-8, 8])."""
    period = float(2**period_bits)
    x = np.linspace(-fit_range, fit_range, 8001)
    basis = np.stack([np.sin(2 * np.pi * k * x / period) for k in range(1, terms + 1)], axis=1)
    target = 1.0 / (1.0 + np.exp(-x)) - 0.5
    coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
    return tuple(float(c) for c in coef)


def sigmoid_plain(x: torch.Tensor, terms: int = SIGMOID_TERMS, period_bits: int = SIGMOID_PERIOD_BITS) -> torch.Tensor:
    """The Fourier approximation evaluated in float64 (the function the protocol computes)."""
    coef = sigmoid_coefficients(terms, period_bits)
    period = float(2**period_bits)
    out = torch.full_like(x, 0.5, dtype=torch.float64)
    for k, b in enumerate(coef, start=1):
        out = out + b * torch.sin(2 * math.pi * k * x.double() / period)
    return out


def sigmoid(party: Party, x: torch.Tensor, terms: int = SIGMOID_TERMS,
            period_bits: int = SIGMOID_PERIOD_BITS) -> torch.Tensor:
    """Shares of the Fourier sigmoid of shared ``x`` in one round.

    The dealer shares ``sin`` and ``cos`` of ``2 pi k x' / T`` for a random ``x'``; L and R open
    ``delta = x - x' mod 2^(m+f)`` (enough because T 2^f divides 2^64 and the series is T-periodic: 2(m+f) = 38 bits
    per element in all), then ``sin(a + b) = sin a cos b + cos a sin b`` is linear in the shares. Inputs must lie in
    (-T/2, T/2) = (-16, 16); see :func:`clip` for clipping them securely first."""
    fp = party.fp
    mod_bits = period_bits + fp.frac_bits
    modulus = 1 << mod_bits
    shape = tuple(x.shape)
    kshape = (terms, *shape)
    ks = torch.arange(1, terms + 1, dtype=torch.float64).reshape(-1, *([1] * len(shape)))
    if party.is_dealer:
        xl, xr = party.draw("L", shape, modulus), party.draw("R", shape, modulus)
        theta = 2 * math.pi * ks * (((xl + xr) % modulus).double() / modulus)
        party.split(fp.encode(torch.sin(theta), check=False), kshape, 0, seeded="L")
        party.split(fp.encode(torch.cos(theta), check=False), kshape, 0, seeded="R")
        return meta(shape)
    xm = party.draw(party.role, shape, modulus)
    s_share = party.split(None, kshape, 0, seeded="L")
    c_share = party.split(None, kshape, 0, seeded="R")
    d = (x - xm) % modulus
    (other,) = party.exchange([(d, modulus)])
    delta = ((d + other) % modulus).double() / modulus
    coef = torch.tensor(sigmoid_coefficients(terms, period_bits), dtype=torch.float64)
    coef = coef.reshape(-1, *([1] * len(shape)))
    angle = 2 * math.pi * ks * delta
    a = fp.encode(coef * torch.sin(angle), check=False)
    b = fp.encode(coef * torch.cos(angle), check=False)
    y = (a * c_share + b * s_share).sum(0)
    y = truncate_share(y, fp.frac_bits, party.index)
    if party.role == "L":
        y = y + fp.scale // 2
    return y


def clip(party: Party, x: torch.Tensor, bound: float, method: str = "gmodule") -> torch.Tensor:
    """Shares of ``clamp(x, -bound, bound) = -bound + relu(x + bound) - relu(x - bound)``: the two ReLUs run in
    parallel (5 rounds with the G-module DReLU, 8 with ``method="prefix"``), each reading the full 63-bit sign (the
    clamp is there for inputs of any size)."""
    c = party.fp.encode(bound)
    if party.is_dealer:
        stacked = meta((2, *x.shape))
    else:
        cc = c if party.role == "L" else 0
        stacked = torch.stack([x + cc, x - cc])
    r, _ = gmodule.relu(party, stacked, gmodule.COMPARE_BITS, method)
    if party.is_dealer:
        return meta(tuple(x.shape))
    out = r[0] - r[1]
    return out - c if party.role == "L" else out


# ---------------------------------------------------------------- ODE softmax


def softmax_steps(logit_range: float) -> int:
    """Euler steps r for logits whose per-row range (max - min) is at most ``logit_range``: the smallest power of two
    >= max(16, range). Euler diverges once r < range/2; with r >= range the max error measured is about 0.35/r."""
    need = max(16.0, float(logit_range))
    return 1 << math.ceil(math.log2(need))


def softmax_plain(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The Euler iteration in float64 (what the protocol computes, without fixed-point rounding)."""
    xt = x.double() / steps
    y = torch.full_like(xt, 1.0 / x.shape[-1])
    for _ in range(steps):
        s = (y * xt).sum(-1, keepdim=True)
        y = y * (1 + xt - s)
    return y


def softmax(party: Party, x: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """Shares of softmax over the last axis by r = ``steps`` Euler steps of ``y' = y (x - <y, x>)`` from
    ``y(0) = 1/m``: each step is ``s = <y, x/r>`` then ``y <- y (1 + x/r - s)``, 2 rounds per step.

    ``x/r`` is opened once and its mask reused in every step; each step opens ``y`` (m values per row) and ``s``
    (1 value per row) and reuses the opened ``y`` in both products, so each party sends 64 (m + 1) bits per row per
    step. ``steps`` must be a power of two (the division by r is a local shift)."""
    if steps < 1 or steps & (steps - 1):
        raise ValueError("softmax steps must be a power of two")
    fp = party.fp
    m = x.shape[-1]
    shape = tuple(x.shape)
    row_shape = (*shape[:-1], 1)
    xt = truncate(party, x, int(math.log2(steps)))
    one = fp.scale
    if party.is_dealer:
        y = meta(shape)
    else:
        y = torch.full(shape, round(fp.scale / m) if party.role == "L" else 0, dtype=torch.int64)
    xo = None
    for _ in range(steps):
        if xo is None:  # x/r is opened together with the first y
            yo, xo = open_masked(party, y, xt)
        else:
            yo = open_masked(party, y)
        p = truncate(party, mul_opened(party, yo, xo))
        s = p.sum(-1, keepdim=True) if not party.is_dealer else meta(row_shape)
        so = open_masked(party, s)
        q = (xo - so).add_public(one)  # 1 + x/r - s, masks broadcast over the row
        y = truncate(party, mul_opened(party, yo, q))
    return y


# ---------------------------------------------------------------- max-pool


@dataclass
class PoolState:
    """What max-pool keeps for its backward pass: the XOR-shared choice bits of each tournament level."""

    bits: list
    shapes: list  # candidate shapes per level, after padding to an even count
    counts: list  # candidate counts per level before padding
    in_shape: tuple
    kernel: int


def _windows(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H, W) -> (k*k, N, C, H/k, W/k): the window elements, non-overlapping (stride = kernel)."""
    n, c, h, w = x.shape
    v = x.reshape(n, c, h // k, k, w // k, k).permute(3, 5, 0, 1, 2, 4)
    return v.reshape(k * k, n, c, h // k, w // k)


def _unwindows(v: torch.Tensor, k: int, shape: tuple) -> torch.Tensor:
    n, c, h, w = shape
    return v.reshape(k, k, n, c, h // k, w // k).permute(2, 3, 4, 0, 5, 1).reshape(n, c, h, w)


def maxpool2d(party: Party, x: torch.Tensor, kernel: int = 2,
              sign_bits: int = gmodule.COMPARE_BITS, method: str = "gmodule") -> tuple[torch.Tensor, PoolState]:
    """Shares of non-overlapping ``kernel x kernel`` max-pooling (NCHW) by a tournament: each level compares pairs
    (``max(a, b) = b + [a >= b](a - b)``: DReLU + select, 5 rounds with the G-module DReLU, 7 with the prefix
    one) and halves the candidates; ``ceil(log2 k^2)``
    levels. Returns the output and the choice bits for :func:`maxpool2d_backward`. With ``sign_bits < 63`` the
    differences must lie in ``[-2^sign_bits, 2^sign_bits)`` (see :func:`~aloe.mpc.gmodule.msb`). ``method``: the
    DReLU's (:func:`~aloe.mpc.gmodule.drelu`)."""
    shape = tuple(x.shape)
    if shape[2] % kernel or shape[3] % kernel:
        raise ValueError("max-pool needs the spatial size divisible by the kernel")
    cand = _windows(meta(shape) if party.is_dealer else x, kernel)
    bits, shapes, counts = [], [], []
    while cand.shape[0] > 1:
        counts.append(cand.shape[0])
        if cand.shape[0] % 2:
            cand = torch.cat([cand, cand[-1:]])  # a repeated candidate never wins a strict comparison twice
        a, b = cand[0::2], cand[1::2]
        diff = a - b
        s = gmodule.drelu(party, diff, sign_bits, method)
        chosen = gmodule.select(party, s, diff)
        bits.append(s)
        shapes.append(tuple(cand.shape))
        cand = meta(tuple(b.shape)) if party.is_dealer else b + chosen
    return cand[0], PoolState(bits, shapes, counts, shape, kernel)


def maxpool2d_backward(party: Party, state: PoolState, dy: torch.Tensor) -> torch.Tensor:
    """Route ``dy`` back to the arg-max of each window with the stored bits (one select per level)."""
    grad = dy.unsqueeze(0)
    levels = zip(reversed(state.bits), reversed(state.shapes), reversed(state.counts), strict=True)
    for s, cshape, count in levels:
        to_a = gmodule.select(party, s, grad)
        if party.is_dealer:
            grad = meta((count, *cshape[1:]))
            continue
        g = torch.empty(cshape, dtype=torch.int64)
        g[0::2] = to_a
        g[1::2] = grad - to_a
        if count < cshape[0]:  # the padded duplicate of the last candidate: fold its gradient back
            g = torch.cat([g[: count - 1], g[count - 1 :].sum(0, keepdim=True)])
        grad = g
    if party.is_dealer:
        return meta(state.in_shape)
    return _unwindows(grad, state.kernel, state.in_shape)
