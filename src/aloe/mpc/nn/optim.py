"""SGD with momentum on shared parameters, with the learning rate folded into the fixed-point truncation.

PyTorch's SGD does ``v <- mu v + g`` and ``w <- w - lr v`` with ``g`` the batch-mean gradient. Here the gradient is
the batch *sum* with ``2f`` fractional bits (straight from the triangle triple, untruncated), so

- ``v <- trunc_f(mu_f * v + g)``: one truncation for the momentum product and the gradient together;
- ``w <- w - trunc_k(c * v)`` where ``lr / B = c 2^-k`` with ``c`` a 10-bit integer.

A learning rate like 0.01 / 128 = 7.8e-5 is about one unit of the 14-bit fixed point, so multiplying by it as a
fixed-point constant would lose almost all of its precision (``round(7.8e-5 * 2^14) = 1``, 28% off); folding it into
the shift keeps it to 2^-10 relative error (:func:`quantize_rate`), and the plain baseline uses the same quantised
rate. Local share truncation rounds up or down at random in proportion to the discarded fraction, so updates
smaller than one unit still move the weights in expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aloe import AloeError
from aloe.mpc.nn.layers import Parameter
from aloe.mpc.party import Party
from aloe.mpc.ring import truncate_share

RATE_BITS = 10


@dataclass(frozen=True)
class QuantizedRate:
    """``lr / batch = mantissa * 2^-shift``."""

    mantissa: int
    shift: int

    @property
    def value(self) -> float:
        return self.mantissa / 2.0**self.shift


def quantize_rate(rate: float, bits: int = RATE_BITS) -> QuantizedRate:
    """The nearest ``c 2^-k`` to ``rate`` with ``2^(bits-1) <= c < 2^bits``."""
    if not rate > 0 or not math.isfinite(rate):
        raise AloeError(f"the learning rate must be positive, got {rate}")
    k = bits - 1 - math.floor(math.log2(rate))
    c = round(rate * 2.0**k)
    if c >= 1 << bits:
        c, k = c // 2, k - 1
    if k < 0 or k > 60:
        raise AloeError(f"learning rate {rate} is outside what the fixed point can represent")
    return QuantizedRate(c, k)


class SGD:
    """Momentum SGD on :class:`~aloe.mpc.nn.layers.Parameter` shares (no communication: all local)."""

    def __init__(self, party: Party, params: list[Parameter], lr: float, batch: int, momentum: float = 0.9) -> None:
        if not 0 <= momentum < 1:
            raise AloeError("momentum must be in [0, 1)")
        self.party, self.params = party, params
        self.rate = quantize_rate(lr / batch)
        self.mu = party.fp.encode(momentum).item()

    def step(self) -> None:
        p = self.party
        if p.is_dealer:
            return
        f = p.fp.frac_bits
        for q in self.params:
            if q.grad is None:
                raise AloeError(f"{q.name} has no gradient")
            q.momentum = truncate_share(self.mu * q.momentum + q.grad, f, p.index)
            upd = truncate_share(self.rate.mantissa * q.momentum, self.rate.shift, p.index)
            q.share = q.share - upd
            q.grad = None

    def state(self) -> dict[str, torch.Tensor]:
        return {q.name: q.momentum for q in self.params}
