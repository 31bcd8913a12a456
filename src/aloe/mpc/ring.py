"""The ring Z_2^64 and fixed-point encoding (paper (a), section "Common setting").

Arithmetic shares live in torch ``int64`` tensors whose two's-complement wrap-around *is* arithmetic mod 2^64
(checked exactly against Python integers in the tests). Reals are encoded as ``round(x * 2^f)`` with ``f`` fractional
bits (default 14, as in the Morse-STF code).

Range/precision trade-off: a value must satisfy ``|x| < 2^(63 - f)`` to be representable, and a product of two
encoded values, which carries ``2f`` fractional bits before truncation, needs ``|x*y| < 2^(63 - 2f)``; with f = 14
that is |x*y| < 2^35 ~ 3.4e10 with resolution 2^-14 ~ 6.1e-5. Local truncation (:func:`truncate_share`) adds at most
one unit in the last place and fails (a huge error) with probability about ``|x| / 2^63`` per element, where ``x`` is
the value being truncated, so keeping values small keeps that probability negligible. :func:`overflow_risk` and
:func:`check_encodable` report values outside the safe range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aloe import AloeError

RING_BITS = 64
DEFAULT_FRAC_BITS = 14


class OverflowRisk(AloeError):
    """A value is too large for the fixed-point encoding: a result would wrap around the ring."""


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding with ``frac_bits`` fractional bits on Z_2^64."""

    frac_bits: int = DEFAULT_FRAC_BITS

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 30:
            raise AloeError(f"fractional bits must be in [0, 30], got {self.frac_bits}")

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    @property
    def max_abs(self) -> float:
        """The safe magnitude 2^(62 - 2f): a value (or product of values) up to it still fits with 2f fractional
        bits, i.e. before the truncation that follows a multiplication."""
        return float(2 ** (62 - 2 * self.frac_bits))

    def encode(self, x: torch.Tensor | float, *, check: bool = True) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float64)
        if check:
            check_encodable(t, self)
        return torch.round(t * self.scale).to(torch.int64)

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float64) / self.scale


def check_encodable(x: torch.Tensor, fp: FixedPoint, *, what: str = "value") -> None:
    """Raise :class:`OverflowRisk` if any element of ``x`` is outside the safe range of ``fp``.

    The safe range is ``|x| <= 2^(62 - 2f)``: a product of two such values (``2f`` fractional bits) stays below
    2^62, one bit short of the sign bit, so multiplication and truncation do not wrap.
    """
    if not torch.isfinite(x).all():
        raise OverflowRisk(f"{what} contains NaN or infinity")
    big = x.abs().max().item() if x.numel() else 0.0
    if big > fp.max_abs:
        raise OverflowRisk(
            f"{what} has magnitude {big:.4g} > {fp.max_abs:.4g}, the safe fixed-point range for f={fp.frac_bits}"
        )


def overflow_risk(x: torch.Tensor, fp: FixedPoint) -> dict:
    """Report how close plaintext values are to the fixed-point limits (used on revealed results).

    Returns the largest magnitude, the headroom in bits before the product range ``2^(62-2f)`` is exceeded, and the
    per-element probability bound ``|x| 2^f / 2^63`` that a local truncation of such a value wraps.
    """
    big = float(x.abs().max().item()) if x.numel() else 0.0
    encoded = big * fp.scale
    headroom = (62 - 2 * fp.frac_bits) - (torch.log2(torch.tensor(max(big, 1e-300))).item())
    return {
        "max_abs": big,
        "headroom_bits": headroom,
        "truncation_failure_probability": min(1.0, encoded / 2.0**63),
        "at_risk": big > fp.max_abs,
    }


def wrap_int(v: int) -> int:
    """A Python integer reduced to the signed representative of Z_2^64 (for exact reference checks)."""
    v %= 1 << RING_BITS
    return v - (1 << RING_BITS) if v >= 1 << (RING_BITS - 1) else v


def truncate_share(share: torch.Tensor, bits: int, party: int) -> torch.Tensor:
    """SecureML local truncation of one additive share by ``bits``: party 0 shifts its share, party 1 shifts the
    negation of its share and negates back. The reconstructed result is ``x >> bits`` up to +-1, except with
    probability about ``|x| / 2^63`` (a wrap)."""
    if bits == 0:
        return share
    if party == 0:
        return share >> bits
    return -((-share) >> bits)


def low_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``v mod 2^bits`` as a non-negative int64 (``bits`` < 64)."""
    return v & ((1 << bits) - 1)


def msb(v: torch.Tensor) -> torch.Tensor:
    """The top bit of each int64 (1 where negative) as uint8."""
    return (v < 0).to(torch.uint8)
