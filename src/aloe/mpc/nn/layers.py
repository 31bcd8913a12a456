"""Layers on shared tensors with forward and backward (paper (a), the ``ml`` layers of Morse-STF).

Every layer works on :class:`~aloe.mpc.tensor.SharedTensor` values (on the dealer: ``meta`` shares, shapes only) and
keeps what its backward pass needs:

- :class:`Dense` and :class:`Conv2d` run one extended ("triangle") triple per training step (section 2.2): forward
  opens the masked input and weight once, backward opens only the masked output gradient and reuses both openings
  for the input gradient and the weight gradient;
- :class:`ReLU` (DReLU + select) keeps the XOR-shared sign bit, and its backward is one select of the gradient by
  that bit (1 round, no new comparison);
- ``sign_bits`` (ReLU and max-pool): the compare reads the sign from that bit, which is exact for inputs (max-pool:
  differences) in ``[-2^sign_bits, 2^sign_bits)`` as ring integers; 63, the default, is exact for every value;
- ``drelu`` (ReLU and max-pool): how the sign bit is computed, ``"gmodule"`` (the G-module compare, 4 rounds) or
  ``"prefix"`` (the parallel-prefix carry of :mod:`aloe.mpc.prefix`, ``1 + ceil(log2 sign_bits)`` rounds); both
  give the same bit;
- :class:`MaxPool2d` (tournament of compares; backward routes the gradient with the stored choice bits),
  :class:`AvgPool2d` and :class:`Flatten` (local).

Weight gradients are left with ``2f`` fractional bits (untruncated) for the optimiser, which folds the learning rate
into a single truncation (:mod:`aloe.mpc.nn.optim`).
"""

from __future__ import annotations

import math

import torch

from aloe.mpc import functions as fn
from aloe.mpc import gmodule
from aloe.mpc.party import Party
from aloe.mpc.tensor import SharedTensor
from aloe.mpc.triples import TriangleTriple, conv2d_maps, matmul_maps, meta

# ReLU and max-pool compares are run in chunks of at most this many elements (bounded memory: a compare expands
# every element into 64 positions); each chunk costs its own rounds
DEFAULT_CHUNK = 1 << 18


class Parameter:
    """A trainable tensor: this party's share (``f`` fractional bits), its momentum share and, after backward, the
    share of its gradient with ``2f`` fractional bits (summed over the batch)."""

    def __init__(self, party: Party, name: str, value: torch.Tensor) -> None:
        """``value`` is the public initial value (seeded initialisation, the same on every party): L holds it as its
        share and R holds 0, so sharing it costs nothing; the first update randomises both shares."""
        self.party, self.name = party, name
        shape = tuple(value.shape)
        if party.is_dealer:
            self.share = meta(shape)
            self.momentum = meta(shape)
        else:
            enc = party.fp.encode(value.double())
            self.share = enc if party.role == "L" else torch.zeros_like(enc)
            self.momentum = torch.zeros(shape, dtype=torch.int64)
        self.grad: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.share.shape)

    def tensor(self) -> SharedTensor:
        return SharedTensor(self.party, self.share)


def _trunc(party: Party, raw: torch.Tensor) -> torch.Tensor:
    return fn.truncate(party, raw)


class Layer:
    params: list[Parameter] = []

    def forward(self, x: SharedTensor) -> SharedTensor:
        raise NotImplementedError

    def backward(self, dy: SharedTensor) -> SharedTensor | None:
        raise NotImplementedError


class TriangleLayer(Layer):
    """A bilinear layer ``y = f(x, W) + b`` on one triangle triple per step: forward opens masked ``x`` and ``W`` once,
    backward reuses both openings for the input and weight gradients. ``need_input_grad=False`` (the first layer)
    returns no input gradient, which ends the backward pass there. Subclasses give the bilinear maps and the bias's
    broadcast."""

    bias_dims: tuple[int, ...] = (0,)   # the dimensions of y that the bias is broadcast over

    def __init__(self, party: Party, weight: torch.Tensor, bias: torch.Tensor | None, name: str,
                 need_input_grad: bool) -> None:
        self.party = party
        self.weight = Parameter(party, f"{name}.weight", weight)
        self.bias = None if bias is None else Parameter(party, f"{name}.bias", bias)
        self.params = [self.weight] + ([self.bias] if self.bias is not None else [])
        self.need_input_grad = need_input_grad
        self._triple: TriangleTriple | None = None

    def maps(self, x: SharedTensor):
        raise NotImplementedError

    def _bias_view(self, y: torch.Tensor) -> torch.Tensor:
        shape = [1 if d in self.bias_dims else n for d, n in enumerate(y.shape)]
        return self.bias.share.reshape(shape)

    def forward(self, x: SharedTensor) -> SharedTensor:
        p = self.party
        maps = self.maps(x)
        self._triple = TriangleTriple(p, maps.f, maps.g1, maps.g2, need_g1=self.need_input_grad)
        y = _trunc(p, self._triple.forward(x.share, self.weight.share, getattr(x, "owners", None)))
        if self.bias is not None:
            y = y + self._bias_view(y)
        return SharedTensor(p, y)

    def backward(self, dy: SharedTensor) -> SharedTensor | None:
        p = self.party
        gx, gw = self._triple.backward(dy.share)
        self._triple = None
        self.weight.grad = gw
        if self.bias is not None:
            self.bias.grad = dy.share.sum(self.bias_dims) * p.fp.scale
        return SharedTensor(p, _trunc(p, gx)) if self.need_input_grad else None


class Dense(TriangleLayer):
    """``y = x W + b``, W of shape (in, out)."""

    def __init__(self, party: Party, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "dense",
                 need_input_grad: bool = True) -> None:
        super().__init__(party, weight, bias, name, need_input_grad)

    def maps(self, x: SharedTensor):
        return matmul_maps()


class Conv2d(TriangleLayer):
    """NCHW convolution (groups 1), W of shape (out, in, k, k)."""

    bias_dims = (0, 2, 3)

    def __init__(self, party: Party, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
                 padding: int = 0, name: str = "conv", need_input_grad: bool = True) -> None:
        super().__init__(party, weight, bias, name, need_input_grad)
        self.stride, self.padding = stride, padding

    def maps(self, x: SharedTensor):
        return conv2d_maps(tuple(x.shape), self.weight.shape, self.stride, self.padding)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)] or [slice(0, 0)]


class ReLU(Layer):
    """ReLU (DReLU by ``drelu``, then a select); the backward pass selects the gradient by the stored sign bit (one
    round, no compare)."""

    def __init__(self, party: Party, chunk: int = DEFAULT_CHUNK, sign_bits: int = gmodule.COMPARE_BITS,
                 drelu: str = "gmodule") -> None:
        self.party, self.chunk, self.sign_bits, self.drelu = party, chunk, sign_bits, drelu
        self._bits: list[torch.Tensor] | None = None
        self._shape: tuple[int, ...] | None = None

    def forward(self, x: SharedTensor) -> SharedTensor:
        p = self.party
        self._shape = tuple(x.shape)
        flat = x.share.reshape(-1)
        outs, bits = [], []
        for sl in _chunks(flat.shape[0], self.chunk):
            o, s = gmodule.relu(p, flat[sl], self.sign_bits, self.drelu)
            outs.append(o)
            bits.append(s)
        self._bits = bits
        return SharedTensor(p, torch.cat(outs).reshape(self._shape))

    def backward(self, dy: SharedTensor) -> SharedTensor:
        p = self.party
        flat = dy.share.reshape(-1)
        outs = [gmodule.relu_backward(p, s, flat[sl])
                for sl, s in zip(_chunks(flat.shape[0], self.chunk), self._bits, strict=True)]
        self._bits = None
        return SharedTensor(p, torch.cat(outs).reshape(self._shape))


class MaxPool2d(Layer):
    """Non-overlapping max-pool (tournament of G-module compares); backward routes the gradient to the arg-max with
    the stored choice bits. Large inputs are pooled in batch chunks."""

    def __init__(self, party: Party, kernel: int = 2, chunk: int = DEFAULT_CHUNK,
                 sign_bits: int = gmodule.COMPARE_BITS, drelu: str = "gmodule") -> None:
        self.party, self.kernel, self.chunk, self.sign_bits, self.drelu = party, kernel, chunk, sign_bits, drelu
        self._states: list | None = None

    def forward(self, x: SharedTensor) -> SharedTensor:
        p = self.party
        n = x.shape[0]
        per = max(1, self.chunk // max(1, math.prod(tuple(x.shape)[1:])))
        outs, states = [], []
        for sl in _chunks(n, per):
            o, st = fn.maxpool2d(p, x.share[sl], self.kernel, self.sign_bits, self.drelu)
            outs.append(o)
            states.append((sl, st))
        self._states = states
        return SharedTensor(p, torch.cat(outs))

    def backward(self, dy: SharedTensor) -> SharedTensor:
        p = self.party
        outs = [fn.maxpool2d_backward(p, st, dy.share[sl]) for sl, st in self._states]
        self._states = None
        return SharedTensor(p, torch.cat(outs))


class AvgPool2d(Layer):
    """Non-overlapping average pooling: a local window sum times the public ``1/k^2`` (no round either way)."""

    def __init__(self, party: Party, kernel: int = 2) -> None:
        self.party, self.kernel = party, kernel

    def forward(self, x: SharedTensor) -> SharedTensor:
        return x.avg_pool2d(self.kernel)

    def backward(self, dy: SharedTensor) -> SharedTensor:
        k = self.kernel
        g = (dy * (1.0 / (k * k))).share
        return SharedTensor(self.party, g.repeat_interleave(k, 2).repeat_interleave(k, 3))


class Flatten(Layer):
    def __init__(self, party: Party) -> None:
        self.party = party
        self._shape: tuple[int, ...] | None = None

    def forward(self, x: SharedTensor) -> SharedTensor:
        self._shape = tuple(x.shape)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: SharedTensor) -> SharedTensor:
        return dy.reshape(self._shape)


class Sequential:
    """Layers in order; ``backward`` runs them in reverse and stops at the first layer that needs no input
    gradient."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers

    @property
    def params(self) -> list[Parameter]:
        return [q for layer in self.layers for q in getattr(layer, "params", [])]

    def forward(self, x: SharedTensor) -> SharedTensor:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy: SharedTensor) -> None:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
            if dy is None:
                return
