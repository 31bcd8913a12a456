"""The shared tensor: a PyTorch-shaped API over additive shares in Z_2^64 with fixed point.

Each party holds a :class:`SharedTensor` wrapping its share (the dealer's wraps a ``meta`` tensor: shape only), and
all three parties run the same code::

    def program(party, data):
        x = SharedTensor.from_private(party, data if party.role == "L" else None, owner="L", shape=(4, 4))
        w = SharedTensor.from_private(party, ..., owner="R", shape=(4, 2))
        y = (x @ w).relu().sigmoid()
        return y.reveal(to="L")  # a float tensor on L, None elsewhere

Secure operations: ``+ - *`` (shared or public), ``@``, :meth:`conv2d`, :meth:`relu`, :meth:`sigmoid`,
:meth:`softmax`, :meth:`max_pool2d`, comparisons (``>``, ``>=``, ``<``, ``<=``; shared bits), and the local ones
:meth:`sum`, :meth:`reshape`, :meth:`transpose`, indexing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aloe import AloeError
from aloe.mpc import functions as fn
from aloe.mpc import gmodule
from aloe.mpc.party import Party
from aloe.mpc.ring import OverflowRisk, check_encodable, overflow_risk
from aloe.mpc.triples import MUL, TriangleTriple, beaver, conv2d_maps, matmul_maps, meta


def _public(party: Party, v) -> torch.Tensor:
    return party.fp.encode(torch.as_tensor(v, dtype=torch.float64))


class SharedBits:
    """XOR-shared bits (results of comparisons)."""

    def __init__(self, party: Party, share: torch.Tensor) -> None:
        self.party, self.share = party, share

    @property
    def shape(self) -> torch.Size:
        return self.share.shape

    def reveal(self, to: str | None = None) -> torch.Tensor | None:
        p = self.party
        if p.is_dealer:
            return None
        if to is None:
            (o,) = p.exchange([(self.share, 2)])
            return self.share ^ o
        if p.role == to:
            (o,) = p.recv_peer([(tuple(self.share.shape), 2)])
            return self.share ^ o
        p.send_peer([(self.share, 2)])
        return None

    def select(self, x: SharedTensor) -> SharedTensor:
        """``bits * x`` (one round)."""
        return SharedTensor(self.party, gmodule.select(self.party, self.share, x.share), x.bound)

    def to_arith(self) -> SharedTensor:
        """The bits as a shared tensor of 0.0 / 1.0 (one round)."""
        return SharedTensor(self.party, gmodule.b2a(self.party, self.share), 1.0)

    def __invert__(self) -> SharedBits:
        if self.party.role == "L":
            return SharedBits(self.party, self.share ^ 1)
        return SharedBits(self.party, self.share)


class SharedTensor:
    """One party's additive share of a fixed-point tensor."""

    def __init__(self, party: Party, share: torch.Tensor, bound: float | None = None) -> None:
        self.party = party
        self.share = share
        # a public bound on |value| (None: unknown). Declared on private inputs and propagated through operations;
        # an operation whose result could leave the fixed-point range raises OverflowRisk before it runs
        self.bound = bound

    # ------------------------------------------------------------ creation and reveal
    @classmethod
    def from_private(cls, party: Party, value, owner: str, shape: tuple[int, ...] | None = None,
                     bound: float | None = None) -> SharedTensor:
        """Share a private input of ``owner`` (``value`` is ignored elsewhere; the others pass ``shape``).

        The non-owner's share is drawn from its own PRF stream; the dealer, who draws the same, sends it to the owner,
        who keeps ``x - r``: no online traffic, 64 bits per element offline. Raises
        :class:`~aloe.mpc.ring.OverflowRisk` if the owner's values are outside the safe fixed-point range.

        ``bound`` (public, the same on every party) declares ``|x| <= bound``; the owner checks it, and later
        operations use it to detect fixed-point overflow risk before computing."""
        if owner not in ("L", "R"):
            raise AloeError("private inputs belong to L or R")
        other = "R" if owner == "L" else "L"
        if party.role == owner:
            v = torch.as_tensor(value, dtype=torch.float64)
            check_encodable(v, party.fp, what="private input")
            if bound is not None and v.numel() and v.abs().max().item() > bound:
                raise AloeError(f"private input exceeds its declared bound {bound:g}")
            shape = tuple(v.shape)
        elif shape is None:
            raise AloeError("the parties that do not own an input must know its shape")
        shape = tuple(shape)
        if party.is_dealer:
            party.give(owner, party.draw(other, shape), shape)
            return cls(party, meta(shape), bound)
        if party.role == other:
            return cls(party, party.draw(other, shape), bound)
        r = party.give(owner, None, shape)
        return cls(party, party.fp.encode(v) - r, bound)

    @classmethod
    def from_shares(cls, party: Party, share: torch.Tensor) -> SharedTensor:
        return cls(party, share)

    @classmethod
    def public(cls, party: Party, value) -> SharedTensor:
        """A public value as a (trivial) sharing."""
        v = _public(party, value)
        b = float(torch.as_tensor(value, dtype=torch.float64).abs().max()) if v.numel() else 0.0
        if party.is_dealer:
            return cls(party, meta(tuple(v.shape)), b)
        return cls(party, v if party.role == "L" else torch.zeros_like(v), b)

    def reveal(self, to: str | None = None, *, check_overflow: bool = False) -> torch.Tensor | None:
        """The float64 value to both computing parties (``to=None``) or only to ``to``; ``None`` elsewhere.

        With ``check_overflow``, raise :class:`~aloe.mpc.ring.OverflowRisk` if the value is outside the safe range."""
        p = self.party
        if p.is_dealer:
            return None
        if to is None:
            (o,) = p.exchange([(self.share, 0)])
        elif p.role == to:
            (o,) = p.recv_peer([(tuple(self.share.shape), 0)])
        else:
            p.send_peer([(self.share, 0)])
            return None
        out = p.fp.decode(self.share + o)
        if check_overflow and overflow_risk(out, p.fp)["at_risk"]:
            raise OverflowRisk(f"revealed magnitude {out.abs().max().item():.4g} exceeds the safe fixed-point range")
        return out

    # ------------------------------------------------------------ shape
    @property
    def shape(self) -> torch.Size:
        return self.share.shape

    def dim(self) -> int:
        return self.share.dim()

    _KEEP = object()

    def _wrap(self, share: torch.Tensor, bound=_KEEP) -> SharedTensor:
        return SharedTensor(self.party, share, self.bound if bound is SharedTensor._KEEP else bound)

    def _checked(self, bound: float | None, what: str) -> float | None:
        """Raise :class:`OverflowRisk` if a result bounded by ``bound`` may leave the safe fixed-point range."""
        if bound is not None and bound > self.party.fp.max_abs:
            raise OverflowRisk(
                f"{what}: the result may reach {bound:.4g}, beyond the safe fixed-point range "
                f"{self.party.fp.max_abs:.4g} for f={self.party.fp.frac_bits}"
            )
        return bound

    def reshape(self, *shape) -> SharedTensor:
        return self._wrap(self.share.reshape(*shape))

    def view(self, *shape) -> SharedTensor:
        return self.reshape(*shape)

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> SharedTensor:
        return self._wrap(self.share.flatten(start_dim, end_dim))

    def transpose(self, a: int, b: int) -> SharedTensor:
        return self._wrap(self.share.transpose(a, b))

    @property
    def T(self) -> SharedTensor:  # noqa: N802 - mirrors torch
        return self._wrap(self.share.T)

    def __getitem__(self, idx) -> SharedTensor:
        return self._wrap(self.share[idx])

    def sum(self, dim=None, keepdim: bool = False) -> SharedTensor:
        count = self.share.numel() if dim is None else self.share.shape[dim]
        b = None if self.bound is None else self._checked(self.bound * count, "sum")
        if dim is None:
            return self._wrap(self.share.sum(), b)
        return self._wrap(self.share.sum(dim, keepdim=keepdim), b)

    # ------------------------------------------------------------ linear
    def _const(self, v) -> torch.Tensor:
        """A public constant as this party's share (L holds it, R holds 0)."""
        c = _public(self.party, v)
        return c if self.party.role == "L" else torch.zeros_like(c)

    def __add__(self, o) -> SharedTensor:
        if isinstance(o, SharedTensor):
            b = None if self.bound is None or o.bound is None else self._checked(self.bound + o.bound, "add")
            return self._wrap(self.share + o.share, b)
        c = torch.as_tensor(o, dtype=torch.float64)
        b = None if self.bound is None else self._checked(self.bound + float(c.abs().max()), "add")
        if self.party.is_dealer:
            return self._wrap(self.share + meta(tuple(c.shape)), b)
        return self._wrap(self.share + self._const(o), b)

    __radd__ = __add__

    def __neg__(self) -> SharedTensor:
        return self._wrap(-self.share)

    def __sub__(self, o) -> SharedTensor:
        return self + (-o)

    def __rsub__(self, o) -> SharedTensor:
        return (-self) + o

    def __mul__(self, o) -> SharedTensor:
        p = self.party
        if isinstance(o, SharedTensor):
            b = None if self.bound is None or o.bound is None else self._checked(self.bound * o.bound, "mul")
            return self._wrap(fn.truncate(p, beaver(p, MUL, self.share, o.share)), b)
        cf = torch.as_tensor(o, dtype=torch.float64)
        b = None if self.bound is None else self._checked(self.bound * float(cf.abs().max()), "mul")
        if isinstance(o, int) and not isinstance(o, bool):
            return self._wrap(self.share * o, b)
        c = _public(p, o)
        if p.is_dealer:
            return self._wrap(self.share * meta(tuple(c.shape)), b)
        return self._wrap(fn.truncate(p, self.share * c), b)

    __rmul__ = __mul__

    def __truediv__(self, o) -> SharedTensor:
        if isinstance(o, SharedTensor):
            raise AloeError("division by a shared value is not supported")
        return self * (1.0 / torch.as_tensor(o, dtype=torch.float64))

    def __matmul__(self, o) -> SharedTensor:
        p = self.party
        inner = self.shape[-1]
        if isinstance(o, SharedTensor):
            b = None if self.bound is None or o.bound is None else self._checked(
                self.bound * o.bound * inner, "matmul")
            return self._wrap(fn.truncate(p, beaver(p, lambda a, b: a @ b, self.share, o.share)), b)
        cf = torch.as_tensor(o, dtype=torch.float64)
        b = None if self.bound is None else self._checked(self.bound * float(cf.abs().max()) * inner, "matmul")
        c = _public(p, o)
        if p.is_dealer:
            return self._wrap(self.share @ meta(tuple(c.shape)), b)
        return self._wrap(fn.truncate(p, self.share @ c), b)

    def conv2d(self, weight, stride: int = 1, padding: int = 0) -> SharedTensor:
        """NCHW convolution with a shared (Beaver conv triple) or public weight."""
        p = self.party

        def conv(a, b):
            return F.conv2d(a, b, stride=stride, padding=padding)

        fan_in = math.prod(tuple(weight.shape)[1:])
        wb = weight.bound if isinstance(weight, SharedTensor) else float(torch.as_tensor(weight).abs().max())
        b = None if self.bound is None or wb is None else self._checked(self.bound * wb * fan_in, "conv2d")
        if isinstance(weight, SharedTensor):
            return self._wrap(fn.truncate(p, beaver(p, conv, self.share, weight.share)), b)
        c = _public(p, weight)
        if p.is_dealer:
            return self._wrap(conv(self.share, meta(tuple(c.shape))), b)
        return self._wrap(fn.truncate(p, conv(self.share, c)), b)

    # ------------------------------------------------------------ comparisons and non-linear
    def _diff_bits(self, other, op: str) -> SharedBits:
        d = self - other if op in ("gt", "ge") else other - self if op in ("lt", "le") else None
        p = self.party
        if op in ("ge", "le"):
            return SharedBits(p, gmodule.drelu(p, d.share))  # [d >= 0]
        # strict: [d > 0] = not [-d >= 0]
        return ~SharedBits(p, gmodule.drelu(p, (-d).share))

    def __gt__(self, o) -> SharedBits:
        return self._diff_bits(o, "gt")

    def __ge__(self, o) -> SharedBits:
        return self._diff_bits(o, "ge")

    def __lt__(self, o) -> SharedBits:
        return self._diff_bits(o, "lt")

    def __le__(self, o) -> SharedBits:
        return self._diff_bits(o, "le")

    def relu(self) -> SharedTensor:
        out, _ = gmodule.relu(self.party, self.share)
        return self._wrap(out)

    def relu_with_bits(self) -> tuple[SharedTensor, SharedBits]:
        """ReLU and the bit ``[x >= 0]`` for the backward pass (:meth:`SharedBits.select` on the gradient)."""
        out, s = gmodule.relu(self.party, self.share)
        return self._wrap(out), SharedBits(self.party, s)

    def sigmoid(self, *, clip: bool = False, drelu: str = "gmodule") -> SharedTensor:
        """The one-round Fourier sigmoid; inputs must be in (-16, 16) unless ``clip`` (clamps to +-12 first with
        two ReLUs whose sign bit comes from the DReLU method ``drelu``: 5 more rounds, 8 with ``"prefix"``)."""
        x = self.share
        if clip:
            x = fn.clip(self.party, x, fn.SIGMOID_FIT_RANGE, drelu)
        return self._wrap(fn.sigmoid(self.party, x), 1.0)

    def softmax(self, dim: int = -1, *, logit_range: float | None = None, steps: int | None = None) -> SharedTensor:
        """ODE softmax over ``dim``; ``steps`` (a power of two) defaults to :func:`~aloe.mpc.functions.softmax_steps`
        of ``logit_range`` (default 16)."""
        if steps is None:
            steps = fn.softmax_steps(16.0 if logit_range is None else logit_range)
        x = self.share.movedim(dim, -1)
        y = fn.softmax(self.party, x, steps)
        return self._wrap(y.movedim(-1, dim), 1.0)

    def max_pool2d(self, kernel: int = 2) -> SharedTensor:
        out, _ = fn.maxpool2d(self.party, self.share, kernel)
        return self._wrap(out)

    def max_pool2d_with_state(self, kernel: int = 2) -> tuple[SharedTensor, fn.PoolState]:
        """Max-pool and the choice bits for :meth:`max_pool2d_backward`."""
        out, state = fn.maxpool2d(self.party, self.share, kernel)
        return self._wrap(out), state

    @staticmethod
    def max_pool2d_backward(state: fn.PoolState, dy: SharedTensor) -> SharedTensor:
        return SharedTensor(dy.party, fn.maxpool2d_backward(dy.party, state, dy.share))

    def avg_pool2d(self, kernel: int = 2) -> SharedTensor:
        """Non-overlapping average pooling: a local window sum times the public 1/k^2 (no round)."""
        n, c, h, w = self.shape
        if h % kernel or w % kernel:
            raise AloeError("avg-pool needs the spatial size divisible by the kernel")
        summed = self.share.reshape(n, c, h // kernel, kernel, w // kernel, kernel).sum((3, 5))
        total = None if self.bound is None else self.bound * kernel * kernel
        return self._wrap(summed, total) * (1.0 / (kernel * kernel))

    def __repr__(self) -> str:
        return f"SharedTensor(party={self.party.role}, shape={tuple(self.shape)})"


class TriangleLayer:
    """A bilinear layer ``y = f(x, W)`` with its two backward products on one extended triple (fixed point:
    outputs are truncated). ``kind`` is ``"dense"`` (``y = x @ W``) or ``"conv2d"`` (NCHW, with ``stride`` and
    ``padding``)."""

    def __init__(self, party: Party, kind: str, x_shape, w_shape, stride: int = 1, padding: int = 0) -> None:
        if kind == "dense":
            maps = matmul_maps()
        elif kind == "conv2d":
            maps = conv2d_maps(tuple(x_shape), tuple(w_shape), stride, padding)
        else:
            raise AloeError(f"unknown layer kind {kind!r}")
        self.party = party
        self.triple = TriangleTriple(party, maps.f, maps.g1, maps.g2)

    def forward(self, x: SharedTensor, w: SharedTensor) -> SharedTensor:
        return SharedTensor(self.party, fn.truncate(self.party, self.triple.forward(x.share, w.share)))

    def backward(self, dy: SharedTensor) -> tuple[SharedTensor, SharedTensor]:
        gx, gw = self.triple.backward(dy.share)
        return (SharedTensor(self.party, fn.truncate(self.party, gx)),
                SharedTensor(self.party, fn.truncate(self.party, gw)))


class OwnedInput(SharedTensor):
    """A private input that its owners hold in the clear, as column blocks ``(owner, width)`` along the last
    dimension: on each block the owner's share is the encoded value and the other party's is zero. This trivial
    sharing costs nothing to make; a first bilinear layer (:class:`~aloe.mpc.triples.TriangleTriple` with
    ``owners``) masks and opens each block from its owner's side alone. Used as an ordinary shared tensor it is a
    valid sharing too (each party's share is what it already knows)."""

    def __init__(self, party: Party, share: torch.Tensor, owners: list[tuple[str, int]],
                 bound: float | None = None) -> None:
        super().__init__(party, share, bound)
        self.owners = list(owners)

    @classmethod
    def from_blocks(cls, party: Party, blocks: list[tuple[str, torch.Tensor | None, tuple[int, ...]]]) -> OwnedInput:
        """``blocks``: ``(owner, value, shape)`` in column order; the owner passes its values (float), the others
        None. The shapes agree except in the last dimension. Raises :class:`~aloe.mpc.ring.OverflowRisk` if an
        owner's values are outside the safe fixed-point range."""
        owners = [(who, tuple(shape)[-1]) for who, _, shape in blocks]
        if any(who not in ("L", "R") for who, _ in owners):
            raise AloeError("private inputs belong to L or R")
        full = (*tuple(blocks[0][2])[:-1], sum(width for _, width in owners))
        if party.is_dealer:
            return cls(party, meta(full), owners)
        parts = []
        for who, value, shape in blocks:
            if who == party.role:
                v = torch.as_tensor(value, dtype=torch.float64)
                if tuple(v.shape) != tuple(shape):
                    raise AloeError(f"private input of shape {tuple(v.shape)}, declared {tuple(shape)}")
                check_encodable(v, party.fp, what="private input")
                parts.append(party.fp.encode(v))
            else:
                parts.append(torch.zeros(tuple(shape), dtype=torch.int64))
        return cls(party, torch.cat(parts, -1), owners)
