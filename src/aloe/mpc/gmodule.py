"""G-module protocols (paper (b)): action, cross action and recover; module transform Z_2 -> Z_p, first non-zero,
private compare, MSB/DReLU in constant rounds, select and ReLU.

Representations (raw shares; the dealer holds ``meta`` tensors that carry shapes only):

- arithmetic shares: int64 tensors, ``x = x_L + x_R mod 2^64``;
- Boolean shares: int64 tensors of 0/1, ``b = b_L xor b_R``;
- shares mod p: int64 tensors in [0, p);
- Z_2^65 values (:class:`Int65`): a pair ``(hi, lo)`` meaning ``2 hi + lo``.

Costs (per element of a 64-bit compare, N = 64 positions, p = 67; both parties summed): module transform 126 bits,
recover 2 x 64 values at 6.4 bits, the final shift 64 + 6 bits: about 1.0 kbit online and 0.9 kbit from the dealer,
in 4 rounds whatever the bit width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aloe.mpc import kernels, prefix
from aloe.mpc.dealer import small_mod
from aloe.mpc.party import Party
from aloe.mpc.triples import meta

COMPARE_BITS = 63
DRELU_METHODS = ("gmodule", "prefix")
PRIME = 67  # smallest prime >= 63 + 3 (SecureNN's p)
LOW63 = (1 << 63) - 1


def prime_for(n: int) -> int:
    """The smallest prime ``p >= n + 3``: first-non-zero over the ``n + 1`` positions of an ``n``-bit compare needs
    every non-zero ``y_i`` in ``[1, n + 2]`` to stay non-zero mod ``p``."""
    p = n + 3
    while any(p % d == 0 for d in range(2, int(p**0.5) + 1)):
        p += 1
    return p


def _rows(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------- group actions


def shift_left(v: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The action of Z_N on vectors by cyclic left shift, per row: ``out[r, k] = v[r, (k + i[r]) mod N]``.

    Each row is read as the window ``[i, i + N)`` of the row written twice: a row copy per element of ``i`` rather
    than a gather through an ``N``-times larger index tensor (several times faster)."""
    n = v.shape[-1]
    rows = v.reshape(-1, n).numpy()
    doubled = np.concatenate([rows, rows], axis=1)
    windows = np.lib.stride_tricks.sliding_window_view(doubled, n, axis=1)
    shifts = (i.reshape(-1).to(torch.int64) % n).numpy()
    return torch.from_numpy(windows[np.arange(rows.shape[0]), shifts]).reshape(v.shape)


_WORDS = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def rotate_bits(v: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """:func:`shift_left` for rows of 8, 16, 32 or 64 bits (uint8 0/1): each row is packed into one machine word and
    rotated right by ``i``, 30 times faster than moving bytes. Other row lengths go to :func:`shift_left`."""
    n = v.shape[-1]
    if n not in _WORDS:
        return shift_left(v, i)
    word = _WORDS[n]
    words = np.packbits(v.reshape(-1, n).numpy(), axis=1, bitorder="little").view(word).reshape(-1)
    s = (i.reshape(-1).to(torch.int64) & (n - 1)).numpy().astype(word)
    wrapped = np.where(s == 0, word(0), words << ((word(n) - s) & word(n - 1)))
    out = (words >> s) | wrapped
    return torch.from_numpy(np.unpackbits(out.view(np.uint8).reshape(-1, n // 8), axis=1,
                                          bitorder="little")).reshape(v.shape)


def semidirect_act(i: torch.Tensor, u: torch.Tensor, v: torch.Tensor, p: int) -> torch.Tensor:
    """The action of ``(i, u)`` in Z_N x| (F_p^*)^N on F_p^N: rotate ``u * v`` left by ``i``. It keeps the zero
    pattern up to the rotation and hides every non-zero value behind a uniform scale."""
    return shift_left(mod_small(u * v, p), i)


def pm1_action(party: Party, t: torch.Tensor | None, x: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """G-module action of Z_2 = {+-1} on Z_2^64: L holds bits ``t``, R holds ``x``; returns additive shares of
    ``(-1)^t x``. One round (R->L 64 bits, L->R 1 bit per element); the dealer sends 64 bits per element."""
    shape = tuple(shape)
    if party.is_dealer:
        t2, x2 = party.draw("L", shape, 2), party.draw("R", shape)
        party.split(torch.where(t2.bool(), -x2, x2), shape)
        return meta(shape)
    if party.role == "L":
        t2 = party.draw("L", shape, 2)
        y = party.split(None, shape)
        dt = t.to(torch.uint8) ^ t2
        party.send_peer([(dt, 2)])
        (dx,) = party.recv_peer([(shape, 0)])
        return torch.where(t.bool(), -dx, dx) + torch.where(dt.bool(), -y, y)
    x2 = party.draw("R", shape)
    y = party.split(None, shape)
    party.send_peer([(x - x2, 0)])
    (dt,) = party.recv_peer([(shape, 2)])
    return torch.where(dt.bool(), -y, y)


def shift_action(party: Party, i: torch.Tensor | None, v: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """G-module action of Z_N on (Z_2)^N by cyclic shift ("assistant OT"): L holds shifts ``i`` (one per row), R holds
    bit vectors ``v`` (rows of length N); returns XOR shares of ``L_i(v)``. One round (N bits R->L, log2 N bits
    L->R per row); the dealer sends N bits per row."""
    shape = tuple(shape)
    rows, n = shape[:-1], shape[-1]
    if party.is_dealer:
        i2, x2 = party.draw("L", rows, n), party.draw("R", shape, 2)
        party.split(rotate_bits(x2, i2), shape, 2, seeded="L")
        return meta(shape)
    if party.role == "L":
        i2 = party.draw("L", rows, n)
        y = party.split(None, shape, 2, seeded="L")
        di = (i.to(torch.int64) - i2) % n
        party.send_peer([(di, n)])
        (dx,) = party.recv_peer([(shape, 2)])
        return rotate_bits(dx, i) ^ rotate_bits(y, di)
    x2 = party.draw("R", shape, 2)
    y = party.split(None, shape, 2, seeded="L")
    party.send_peer([(v.to(torch.uint8) ^ x2, 2)])
    (di,) = party.recv_peer([(rows, n)])
    return rotate_bits(y, di)


# ---------------------------------------------------------------- module transform Z_2 -> Z_p


def mod_small(v: torch.Tensor, p: int) -> torch.Tensor:
    """``v mod p`` for small values (int16 out)."""
    return small_mod(v, p)


def _modp(v: torch.Tensor, p: int) -> torch.Tensor:
    """Reduce int16 values in [0, 2p) mod p by a branch-free conditional subtraction."""
    t = v - p
    return t + ((t >> 15) & p)


def _module_transform_open(party: Party, bits: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The round of :func:`module_transform`: the opened ``delta = bits xor a`` (uint8) and this party's share ``b``
    (int16) of the dealer's bits ``a_L xor a_R`` mod p; None on the dealer."""
    shape = tuple(bits.shape)
    if party.is_dealer:
        a_l, a_r = party.draw("L", shape, 2), party.draw("R", shape, 2)
        party.split(a_l ^ a_r, shape, p, seeded="L")
        return None
    a = party.draw(party.role, shape, 2).to(torch.uint8)
    # large temporaries are numpy-allocated: glibc reuses numpy's freed blocks, but not torch's 64-byte-aligned
    # ones, whose fresh pages the kernel must zero on first touch
    mine = _xor(bits.to(torch.uint8), a)
    party.send_peer([(mine, 2)])
    # R reads its correction after its message has left (the dealer may still be computing it)
    b = party.split(None, shape, p, seeded="L").to(torch.int16)
    (theirs,) = party.recv_peer([(shape, 2)])
    return _xor(mine, theirs.to(torch.uint8)), b


def _xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a ^ b`` into a numpy-allocated result (see :func:`_module_transform_open`)."""
    return torch.from_numpy(np.bitwise_xor(a.numpy(), b.numpy()))


def module_transform(party: Party, bits: torch.Tensor, p: int) -> torch.Tensor:
    """XOR-shared bits -> additive shares mod ``p`` (int16) of the same bits. One round, 1 bit per element each
    way; the dealer sends ``log2 p`` bits per element."""
    opened = _module_transform_open(party, bits, p)
    if opened is None:
        return meta(tuple(bits.shape))
    delta, b = opened
    delta = delta.bool()
    # z = delta + (1 - 2 delta) b: L holds (-1)^delta b_L, R holds (-1)^delta b_R + delta
    if party.role == "L":
        return _modp(torch.where(delta, p - b, b), p)
    return _modp(torch.where(delta, p + 1 - b, b), p)


def transform_and_fnz_input(party: Party, bits: torch.Tensor, p: int) -> torch.Tensor:
    """:func:`module_transform` of ``bits`` (rows of n), the sentinel position (L 0, R 1) appended, then
    :func:`fnz_input`: shares mod p (int16, rows of n + 1) that are zero exactly at the first 1 of the XOR of the
    parties' bit rows (or at the sentinel). The same round and values as the three steps, in one compiled pass."""
    shape = tuple(bits.shape)
    full = (*shape[:-1], shape[-1] + 1)
    opened = _module_transform_open(party, bits, p)
    if opened is None:
        return meta(full)
    delta, b = opened
    n = shape[-1]
    if (n + 3) * p >= 1 << 16:
        raise ValueError("the compiled first-non-zero input needs (n + 3) p < 2^16")
    y = kernels.transform_fnz(delta.reshape(-1, n).numpy(), b.reshape(-1, n).numpy(), party.role == "L", p)
    return torch.from_numpy(y).reshape(full)


# ---------------------------------------------------------------- recover and first non-zero


@dataclass
class Recovered:
    """The result of :func:`recover`: L holds the group element ``(shift, scale)``, R holds ``g . b`` in clear."""

    shift: torch.Tensor | None = None  # L
    scale: torch.Tensor | None = None  # L
    value: torch.Tensor | None = None  # R
    extra: list | None = None  # tensors L sent along with its message (received by R)


def recover(party: Party, b: torch.Tensor, p: int, piggyback=None, first_zero: bool = False) -> Recovered:
    """G-module recover for G = Z_N x| (F_p^*)^N: shared ``b`` (rows of length N, mod p, in [0, p)) -> R learns
    ``g . b`` for a uniformly random ``g`` known only to L. Two sequential rounds (R->L then L->R), N log2 p bits each
    way; the dealer sends N log2 p bits. ``piggyback`` (a callable giving extra (tensor, modulus) items) rides on L's
    message. With ``first_zero``, R's ``value`` is instead the index of the first minimum of each row of ``g . b``
    (first-non-zero's position of the zero), computed without materialising ``g . b``."""
    shape = tuple(b.shape)
    rows, n = shape[:-1], shape[-1]
    if party.is_dealer:
        i = party.draw("L", rows, n)
        u = party.draw("L", shape, p, nonzero=True)
        bl, br = party.draw("L", shape, p), party.draw("R", shape, p)
        party.give("R", _scaled_rotation(i, u, bl, br, 1, None, p), shape, p)
        return Recovered()
    if party.role == "L":
        i = party.draw("L", rows, n)
        u = party.draw("L", shape, p, nonzero=True).to(torch.int16)
        bm = party.draw("L", shape, p).to(torch.int16)
        (delta_r,) = party.recv_peer([(shape, p)])
        # g . (b - b' + delta)
        w = _scaled_rotation(i, u, b, bm, -1, delta_r, p)
        extra = piggyback[0](i) if piggyback else []
        party.send_peer([(w, p), *extra])
        return Recovered(shift=i, scale=u)
    bm = party.draw("R", shape, p).to(torch.int16)
    party.send_peer([(_sub_mod(b, bm, p), p)])
    big_u = party.give("R", None, shape, p).to(torch.int16)
    extra_expect = piggyback[1] if piggyback else []
    w, *extra = party.recv_peer([(shape, p), *extra_expect])
    if first_zero:
        flat = kernels.first_min_of_sum(w.reshape(-1, n).numpy(), big_u.reshape(-1, n).numpy(), p)
        return Recovered(value=torch.from_numpy(flat).reshape(rows), extra=extra)
    return Recovered(value=_modp(w.to(torch.int16) + big_u, p), extra=extra)


def _scaled_rotation(i: torch.Tensor, u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sign_b: int,
                     c: torch.Tensor | None, p: int) -> torch.Tensor:
    """``semidirect_act(i, u, a + sign_b b (+ c) mod p)`` for shares in [0, p), one compiled pass (int16)."""
    n = a.shape[-1]
    if 2 * p * p >= 1 << 16:
        raise ValueError("the compiled scaled rotation needs 2 p^2 < 2^16")
    flat = (lambda t: t.reshape(-1, n).numpy())  # noqa: E731
    cc = flat(c) if c is not None else flat(a)
    out = kernels.scaled_rotation(i.reshape(-1).numpy(), flat(u), flat(a), flat(b), sign_b, cc, c is not None, p)
    return torch.from_numpy(out).reshape(a.shape)


def _sub_mod(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """``(a - b) mod p`` (int16) for shares in [0, p)."""
    out = kernels.sub_mod(a.reshape(-1).numpy(), b.reshape(-1).numpy(), p)
    return torch.from_numpy(out).reshape(a.shape)


def fnz_input(z: torch.Tensor, p: int, party: Party) -> torch.Tensor:
    """Local step of first-non-zero: ``y_i = sum_{j<=i} z_j - 2 z_i + 1`` (mod p) on shares; zero exactly at the
    first 1 of ``z``, in [1, N+1] elsewhere."""
    y = torch.cumsum(z, dim=-1, dtype=torch.int16) - 2 * z
    if party.role == "L":
        y = y + 1
    return mod_small(y, p)


def first_nonzero(party: Party, z: torch.Tensor, p: int, piggyback=None) -> tuple[torch.Tensor | None, Recovered]:
    """Index of the first 1 in each row of shared bits ``z`` (additive mod p, p >= N + 2, at least one 1 per row),
    as additive shares mod N: L's share is its random rotation, R's is the position of the zero it sees."""
    if party.is_dealer:
        rec = recover(party, z, p, piggyback)
        return None, rec
    return _fnz_recover(party, fnz_input(z, p, party), p, piggyback)


def _fnz_recover(party: Party, y: torch.Tensor, p: int, piggyback=None) -> tuple[torch.Tensor | None, Recovered]:
    """First-non-zero from its local step's output ``y`` (see :func:`first_nonzero`)."""
    rec = recover(party, y, p, piggyback, first_zero=True)
    if party.role == "L":
        return rec.shift, rec
    if party.is_dealer:
        return None, rec
    return rec.value, rec


# ---------------------------------------------------------------- compare


def _bits_msb_first(v: torch.Tensor, n: int) -> torch.Tensor:
    """The low ``n`` bits of each int64, most significant first, as uint8 (shape ``(*v.shape, n)``)."""
    bits = kernels.bits_msb_first(v.reshape(-1).to(torch.int64).numpy(), n)
    return torch.from_numpy(bits).reshape(*v.shape, n)


def private_compare(party: Party, value: torch.Tensor, n: int = COMPARE_BITS, op: str = "gt",
                    p: int | None = None) -> torch.Tensor:
    """Millionaires' compare: L holds ``a`` and R holds ``b`` (non-negative, < 2^n); returns XOR shares of
    ``a op b`` for op in gt/ge/lt/le. Each party passes its own value (the dealer a meta tensor of the shape).

    Module transform (1 round), first non-zero (2 rounds) and a cyclic-shift action that picks R's answer bit at the
    first differing position (1 round): 4 rounds."""
    if op not in ("gt", "ge", "lt", "le"):
        raise ValueError(f"unknown comparison {op!r}")
    if not 1 <= n <= 63:
        raise ValueError(f"a compare takes 1 to 63 bits, got {n}")
    p = prime_for(n) if p is None else p
    shape = tuple(value.shape)
    big_n = n + 1
    rows = shape
    full = (*shape, big_n)
    # the dealer's part of the final shift action: shift i' for L, random vector x' for R, shares of L_{i'} x'
    if party.is_dealer:
        transform_and_fnz_input(party, meta((*shape, n)), p)
        recover(party, meta(full), p)
        i2 = party.draw("L", rows, big_n)
        x2 = party.draw("R", full, 2)
        party.split(rotate_bits(x2, i2), full, 2, seeded="L")
        return meta(shape)
    bits = _bits_msb_first(value, n)
    y = transform_and_fnz_input(party, bits, p)  # module transform, sentinel (L 0, R 1), first-non-zero's input
    if party.role == "L":
        drawn = {}

        def shift_delta(i_l: torch.Tensor) -> list:
            # L's draw for the shift action comes after recover's draws, as on the dealer
            drawn["i2"] = party.draw("L", rows, big_n)
            return [((i_l - drawn["i2"]) % big_n, big_n)]

        i_l, _ = _fnz_recover(party, y, p, piggyback=(shift_delta, None))
        y_l = party.split(None, full, 2, seeded="L")
        (dx,) = party.recv_peer([(full, 2)])
        delta_g = (i_l - drawn["i2"]) % big_n
        pick = lambda v, k: v.gather(-1, k.to(torch.int64).unsqueeze(-1)).squeeze(-1)  # noqa: E731
        return pick(dx, i_l) ^ pick(y_l, delta_g)
    j_r, rec = _fnz_recover(party, y, p, piggyback=(None, [(rows, big_n)]))
    x2 = party.draw("R", full, 2)
    (delta_g,) = rec.extra
    answer = np.empty(full, dtype=np.uint8)
    answer[..., :n] = bits.numpy() if op in ("lt", "le") else 1 - bits.numpy()
    answer[..., n] = 1 if op in ("le", "ge") else 0
    w = rotate_bits(torch.from_numpy(answer), j_r)
    party.send_peer([(_xor(w, x2.to(torch.uint8)), 2)])
    y_r = party.split(None, full, 2, seeded="L")
    return y_r.gather(-1, delta_g.to(torch.int64).unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- MSB, DReLU, compare of shared values


def msb(party: Party, x: torch.Tensor, bits: int = COMPARE_BITS) -> torch.Tensor:
    """XOR shares of bit ``bits`` of shared ``x``: ``bit(x_L) xor bit(x_R) xor carry`` where the carry out of the
    low ``bits`` bits is a private compare ``low(x_L) > 2^bits - 1 - low(x_R)``.

    With ``bits = 63`` (the default) this is the sign bit of any ring element. With fewer bits it is the sign bit of
    every ``x`` in ``[-2^bits, 2^bits)`` (there, bits ``bits`` to 63 all equal the sign), and the compare is that
    much shorter: 31 bits need 32 positions mod 37 instead of 64 mod 67, less than half the traffic and work. The
    answer for an ``x`` outside that range is the bit, not the sign: the caller states the bound."""
    if not 1 <= bits <= COMPARE_BITS:
        raise ValueError(f"the sign is read from bit 1 to 63, got {bits}")
    if party.is_dealer:
        private_compare(party, x, bits, "gt")
        return meta(tuple(x.shape))
    mask = (1 << bits) - 1
    low = x & mask
    mine = low if party.role == "L" else mask - low
    carry = private_compare(party, mine, bits, "gt")
    return carry ^ ((x >> bits) & 1)


def drelu(party: Party, x: torch.Tensor, bits: int = COMPARE_BITS, method: str = "gmodule") -> torch.Tensor:
    """XOR shares of ``[x >= 0]``; exact for every ``x`` with the default ``bits = 63``, and for ``x`` in
    ``[-2^bits, 2^bits)`` otherwise (see :func:`msb`). ``method``: ``"gmodule"``, the G-module compare (4 rounds),
    or ``"prefix"``, the parallel-prefix carry of :mod:`aloe.mpc.prefix` (``1 + ceil(log2 bits)`` rounds, less
    than half the traffic and far less local work); both give the same bit."""
    if method == "gmodule":
        s = msb(party, x, bits)
    elif method == "prefix":
        s = prefix.msb(party, x, bits)
    else:
        raise ValueError(f"unknown DReLU method {method!r} (one of {', '.join(DRELU_METHODS)})")
    if party.role == "L":
        return s ^ 1
    return s


# ---------------------------------------------------------------- Z_2^65, cross action, select, ReLU


@dataclass
class Int65:
    """An element of Z_2^65 as ``2 hi + lo`` (``hi`` int64, ``lo`` 0/1)."""

    hi: torch.Tensor
    lo: torch.Tensor

    @staticmethod
    def lift(x: torch.Tensor) -> Int65:
        """The 64-bit pattern of ``x`` read as an unsigned integer in Z_2^65."""
        return Int65((x >> 1) & LOW63, x & 1)

    def __add__(self, o: Int65) -> Int65:
        return Int65(self.hi + o.hi + (self.lo & o.lo), self.lo ^ o.lo)

    def __neg__(self) -> Int65:
        return Int65(-self.hi - self.lo, self.lo)

    def __sub__(self, o: Int65) -> Int65:
        return self + (-o)

    def signed(self, t: torch.Tensor) -> Int65:
        """``(-1)^t * self`` for bits ``t``."""
        neg = -self
        return Int65(torch.where(t.bool(), neg.hi, self.hi), torch.where(t.bool(), neg.lo, self.lo))


def cross_action(party: Party, t: torch.Tensor, x: Int65) -> Int65 | None:
    """Shares of ``(-1)^t x`` for XOR-shared bits ``t`` and shared ``x`` in Z_2^65: one round, 66 bits per element
    each way; the dealer sends 65 bits per element."""
    shape = tuple(t.shape)
    if party.is_dealer:
        tl, hl, ll = party.draw("L", shape, 2), party.draw("L", shape), party.draw("L", shape, 2)
        tr, hr, lr = party.draw("R", shape, 2), party.draw("R", shape), party.draw("R", shape, 2)
        y = (Int65(hl, ll) + Int65(hr, lr)).signed(tl ^ tr)
        y_l = Int65(party.draw("L", shape), party.draw("L", shape, 2))
        corr = y - y_l
        party._dealer_send("R", [(corr.hi, 0), (corr.lo, 2)])
        return None
    tm = party.draw(party.role, shape, 2)
    xm = Int65(party.draw(party.role, shape), party.draw(party.role, shape, 2))
    if party.role == "L":
        y = Int65(party.draw("L", shape), party.draw("L", shape, 2))
    else:
        hi, lo = party._dealer_recv([(shape, 0), (shape, 2)])
        y = Int65(hi, lo)
    dt = t ^ tm
    z = (x - xm).signed(t)
    other_dt, other_hi, other_lo = party.exchange([(dt, 2), (z.hi, 0), (z.lo, 2)])
    return Int65(other_hi, other_lo).signed(t) + y.signed(dt ^ other_dt)


def select(party: Party, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shares of ``s * x`` for XOR-shared bits ``s`` and arithmetic ``x``: ``(x - (-1)^s x) / 2`` computed in
    Z_2^65 (where the halving of the even result is exact) with one cross action. One round."""
    shape = tuple(x.shape)
    if party.is_dealer:
        cross_action(party, s, None)
        return meta(shape)
    # the cross action on the lifted x (the same draws and message as :func:`cross_action`), with its local steps
    # and the halving fused into two compiled passes
    tm = party.draw(party.role, shape, 2)
    xm_hi, xm_lo = party.draw(party.role, shape), party.draw(party.role, shape, 2)
    if party.role == "L":
        y_hi, y_lo = party.draw("L", shape), party.draw("L", shape, 2)
    flat = (lambda v: v.reshape(-1).numpy())  # noqa: E731
    xf, sf = flat(x.to(torch.int64).contiguous()), flat(s.contiguous())
    dt, z_hi, z_lo = kernels.select_open(xf, sf, flat(tm), flat(xm_hi), flat(xm_lo))
    items = [(torch.from_numpy(dt).reshape(shape), 2), (torch.from_numpy(z_hi).reshape(shape), 0),
             (torch.from_numpy(z_lo).reshape(shape), 2)]
    party.send_peer(items)
    if party.role == "R":  # read after R's message has left: the dealer may still be computing it
        y_hi, y_lo = party._dealer_recv([(shape, 0), (shape, 2)])
    other_dt, other_hi, other_lo = party.recv_peer([(shape, m) for _, m in items])
    out = kernels.select_finish(xf, sf, dt, flat(other_dt), flat(other_hi), flat(other_lo), flat(y_hi), flat(y_lo),
                                party.role == "R")
    return torch.from_numpy(out).reshape(shape)


def relu(party: Party, x: torch.Tensor, bits: int = COMPARE_BITS,
         method: str = "gmodule") -> tuple[torch.Tensor, torch.Tensor]:
    """Shares of ``max(x, 0)`` and the XOR-shared bit ``[x >= 0]`` (kept for the backward pass): the DReLU's rounds
    plus one. ``bits`` and ``method`` as in :func:`drelu`."""
    s = drelu(party, x, bits, method)
    return select(party, s, x), s


def relu_backward(party: Party, s: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The ReLU gradient from the stored bit: ``s * dy`` (one round, no new compare)."""
    return select(party, s, dy)


def b2a(party: Party, s: torch.Tensor) -> torch.Tensor:
    """XOR-shared bits -> arithmetic fixed-point shares of 0.0/1.0 (one round)."""
    one = torch.full(tuple(s.shape), party.fp.scale if party.role == "L" else 0, dtype=torch.int64)
    if party.is_dealer:
        one = meta(tuple(s.shape))
    return select(party, s, one)
