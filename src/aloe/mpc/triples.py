"""Bilinear-map Beaver triples and the extended ("triangle") triple (paper (a), sections 2.1 and 2.2).

All functions work on *raw shares* in Z_2^64 (int64 tensors; the dealer passes ``meta`` tensors that carry shapes
only) and return raw shares of the exact ring product: fixed-point truncation is the caller's business.

Bilinear maps are given as functions ``f(a, b)``; :data:`MUL`, :func:`matmul_maps` and :func:`conv2d_maps` give the
forward map with its two backward maps for the layers (``g1(W, dY) = dX`` and ``g2(dY, x) = dW``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aloe.mpc.party import Party

Bilinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _shape_of(f: Bilinear, a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    return tuple(f(torch.empty(a.shape, dtype=torch.int64, device="meta"),
                   torch.empty(b.shape, dtype=torch.int64, device="meta")).shape)


def meta(shape: tuple[int, ...]) -> torch.Tensor:
    """The dealer's stand-in for a share: shape only."""
    return torch.empty(tuple(shape), dtype=torch.int64, device="meta")


def beaver(party: Party, f: Bilinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Shares of ``f(x, y)`` for shared ``x``, ``y`` and bilinear ``f``: one round, each party sends
    ``64(|x| + |y|)`` bits; the dealer sends ``64 |f(x, y)|`` bits to R."""
    xs, ys = tuple(x.shape), tuple(y.shape)
    zs = _shape_of(f, x, y)
    if party.is_dealer:
        xl, xr = party.draw("L", xs), party.draw("R", xs)
        yl, yr = party.draw("L", ys), party.draw("R", ys)
        party.split(f(xl + xr, yl + yr), zs)
        return meta(zs)
    xm, ym = party.draw(party.role, xs), party.draw(party.role, ys)
    u = party.split(None, zs)
    dx, dy = x - xm, y - ym
    px, py = party.exchange([(dx, 0), (dy, 0)])
    dx, dy = dx + px, dy + py
    if party.role == "L":
        return f(dx + xm, dy) + f(dx, ym) + u
    return f(xm, dy) + f(dx, ym) + u


class TriangleTriple:
    """The extended triple of one layer ``y = f(x, W)`` with backward maps ``dX = g1(W, dY)``, ``dW = g2(dY, x)``.

    :meth:`forward` opens the masked ``x`` and ``W`` once and keeps them; :meth:`backward` opens only the masked
    ``dY``. Both parties together send ``128(|x| + |W| + |dY|)`` bits for forward plus backward, about half of three
    independent triples; the dealer sends ``64(|y| + |x| + |W|)`` bits."""

    def __init__(self, party: Party, f: Bilinear, g1: Bilinear, g2: Bilinear, need_g1: bool = True) -> None:
        """``need_g1=False`` (a first layer, whose input gradient nobody uses) leaves out ``g1``: the dealer neither
        computes nor sends its correction, and :meth:`backward` returns ``None`` for it."""
        self.party, self.f, self.g1, self.g2 = party, f, g1, g2
        self.need_g1 = need_g1
        self._state: tuple | None = None

    def forward(self, x: torch.Tensor, w: torch.Tensor, owners: list[tuple[str, int]] | None = None) -> torch.Tensor:
        """Shares of ``f(x, W)``. ``owners`` declares ``x`` a private input held in the clear: column blocks
        ``(owner, width)`` along its last dimension, where the owner's share is the (encoded) value and the other
        party's is zero. Each block's mask then comes from its owner's stream alone, and only the owner opens the
        block (the Morse-STF code's private-operand triple): half the opening of a shared ``x``, and no sharing."""
        p = self.party
        xs, ws = tuple(x.shape), tuple(w.shape)
        ys = _shape_of(self.f, x, w)
        if owners is not None and sum(width for _, width in owners) != xs[-1]:
            raise ValueError("the owners' blocks must cover the input's last dimension")
        if p.is_dealer:
            if owners is None:
                xl, xr = p.draw("L", xs), p.draw("R", xs)
                xm = xl + xr
            else:
                xm = torch.cat([p.draw(who, (*xs[:-1], width)) for who, width in owners], -1)
            wl, wr = p.draw("L", ws), p.draw("R", ws)
            zl, zr = p.draw("L", ys), p.draw("R", ys)
            wm, zm = wl + wr, zl + zr
            p.split(self.f(xm, wm), ys)
            if self.need_g1:
                p.split(self.g1(wm, zm), xs)
            p.split(self.g2(zm, xm), ws)
            self._state = (xs, ws, ys)
            return meta(ys)
        if owners is None:
            xm = p.draw(p.role, xs)
        else:
            # this party's mask share: its own blocks' masks, zero on the other party's blocks
            widths = [width for _, width in owners]
            xm = torch.cat([p.draw(who, tuple(b.shape)) if who == p.role else torch.zeros_like(b)
                            for (who, _), b in zip(owners, torch.split(x, widths, -1), strict=True)], -1)
        wm, zm = p.draw(p.role, ws), p.draw(p.role, ys)
        dx, dw = x - xm, w - wm
        if owners is None:
            p.send_peer([(dx, 0), (dw, 0)])
        else:
            dx_parts = torch.split(dx, widths, -1)
            mine = [d.contiguous() for (who, _), d in zip(owners, dx_parts, strict=True) if who == p.role]
            p.send_peer([*[(d, 0) for d in mine], (dw, 0)])
        # R's corrections are read after its message has left: the dealer may still be computing them
        u = p.split(None, ys)
        v = p.split(None, xs) if self.need_g1 else None
        w_ = p.split(None, ws)
        if owners is None:
            px, pw = p.recv_peer([(xs, 0), (ws, 0)])
            dx, dw = dx + px, dw + pw
        else:
            # the opened input: this party's own blocks, and the other party's as it opened them
            theirs = [(*xs[:-1], width) for who, width in owners if who != p.role]
            *got, pw = p.recv_peer([*[(s, 0) for s in theirs], (ws, 0)])
            got = iter(got)
            dx = torch.cat([d if who == p.role else next(got) for (who, _), d in zip(owners, dx_parts, strict=True)],
                           -1)
            dw = dw + pw
        self._state = (xm, wm, zm, v, w_, dx, dw)
        if p.role == "L":
            return self.f(dx + xm, dw) + self.f(dx, wm) + u
        return self.f(xm, dw) + self.f(dx, wm) + u

    def backward(self, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Shares of ``g1(W, dY)`` and ``g2(dY, x)`` (the input and weight gradients; the first is ``None`` without
        ``need_g1``)."""
        if self._state is None:
            raise RuntimeError("backward before forward")
        p = self.party
        if p.is_dealer:
            xs, ws, _ = self._state
            return (meta(xs) if self.need_g1 else None), meta(ws)
        xm, wm, zm, v, w_, dx, dw = self._state
        dz = dy - zm
        (pz,) = p.exchange([(dz, 0)])
        dz = dz + pz
        grad_x = self.g1(dw, dy) + self.g1(wm, dz) + v if self.need_g1 else None
        grad_w = self.g2(dy, dx) + self.g2(dz, xm) + w_
        return grad_x, grad_w


# ---------------------------------------------------------------- the bilinear maps of the layers


def MUL(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: N802 - a constant-like name for the map
    return a * b


@dataclass(frozen=True)
class Maps:
    f: Bilinear
    g1: Bilinear  # (W, dY) -> dX
    g2: Bilinear  # (dY, x) -> dW


def matmul_maps() -> Maps:
    """Dense: ``y = x @ W``, ``dX = dY @ W^T``, ``dW = x^T @ dY``."""
    return Maps(
        f=lambda x, w: x @ w,
        g1=lambda w, dy: dy @ w.transpose(-1, -2),
        g2=lambda dy, x: x.transpose(-1, -2) @ dy,
    )


def conv2d_input_grad(dy: torch.Tensor, w: torch.Tensor, x_shape: tuple[int, ...], stride: int = 1,
                      padding: int = 0) -> torch.Tensor:
    """``dX`` of ``conv2d(x, w)``: the transposed convolution (exact on int64, and several times faster than the
    equivalent padded forward convolution; a strided layer's remainder rows come back as output padding)."""
    k1, k2 = w.shape[2], w.shape[3]
    out_pad = tuple(x_shape[2 + a] - ((dy.shape[2 + a] - 1) * stride - 2 * padding + (k1, k2)[a]) for a in (0, 1))
    return F.conv_transpose2d(dy, w, stride=stride, padding=padding, output_padding=out_pad)


def conv2d_weight_grad(dy: torch.Tensor, x: torch.Tensor, w_shape: tuple[int, ...], stride: int = 1,
                       padding: int = 0) -> torch.Tensor:
    """``dW`` of ``conv2d(x, w)`` written with a forward (dilated) convolution."""
    g = F.conv2d(x.transpose(0, 1), dy.transpose(0, 1), padding=padding, dilation=stride)
    return g.transpose(0, 1)[:, :, : w_shape[2], : w_shape[3]]


def conv2d_maps(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: int = 1, padding: int = 0) -> Maps:
    """Conv2d (NCHW, groups 1): forward, input gradient and weight gradient."""
    return Maps(
        f=lambda x, w: F.conv2d(x, w, stride=stride, padding=padding),
        g1=lambda w, dy: conv2d_input_grad(dy, w, x_shape, stride, padding),
        g2=lambda dy, x: conv2d_weight_grad(dy, x, w_shape, stride, padding),
    )
