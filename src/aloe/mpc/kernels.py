"""Compiled (numba) kernels for the local steps of the G-module compare, the bit planes of the prefix DReLU and
select's cross action.

A DReLU expands every element into 64 positions mod p, and the steps between two messages are chains of small
operations on them (a select, a reduction mod p, a running sum, a product, a cyclic shift). Written with numpy or
torch, each operation is a pass over tens of megabytes; here each chain is one pass over the rows, with the values in
registers. Every kernel computes exactly what its plain counterpart in :mod:`aloe.mpc.gmodule` computes (the tests
compare them on random inputs and edge values); they change no message and no random draw.

The kernels take and return numpy arrays (``torch.Tensor.numpy()`` views, no copy), are compiled on first use and
cached on disk (``cache=True``), and release the GIL, so the in-process parties of the tests run them in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_OPTS = {"cache": True, "nogil": True, "boundscheck": False}


@njit(cache=True)
def _small_magic(p: int) -> tuple[int, int]:
    """Multiply-shift division by ``p`` exact for dividends below 2^16 (see :func:`division_magic`)."""
    bits = 0
    while (1 << bits) < p:
        bits += 1
    shift = 16 + bits
    return ((1 << shift) + p - 1) // p, shift


@njit(**_OPTS)
def bits_msb_first(v: np.ndarray, n: int) -> np.ndarray:
    """The low ``n`` bits of each int64 of flat ``v``, most significant first: (len(v), n) uint8 0/1."""
    out = np.empty((v.size, n), dtype=np.uint8)
    for r in range(v.size):
        x = v[r]
        for k in range(n):
            out[r, k] = (x >> (n - 1 - k)) & 1
    return out


@njit(**_OPTS)
def bit_planes(v: np.ndarray, k: int) -> np.ndarray:
    """Bit planes of the low ``k`` bits of flat int64 ``v``: ``out[j, w]`` holds bit ``j`` of elements
    ``64 w .. 64 w + 63`` (element ``64 w + e`` at bit ``e``), zero beyond the last element. (k, ceil(n / 64))
    uint64."""
    n = v.size
    words = (n + 63) // 64
    out = np.zeros((k, words), dtype=np.uint64)
    for w in range(words):
        base = w * 64
        end = min(64, n - base)
        for j in range(k):
            acc = np.uint64(0)
            for e in range(end):
                acc |= np.uint64((v[base + e] >> j) & 1) << np.uint64(e)
            out[j, w] = acc
    return out


@njit(**_OPTS)
def transform_fnz(delta: np.ndarray, b: np.ndarray, left: bool, p: int) -> np.ndarray:
    """Module transform's last step, the sentinel, and first-non-zero's local step, fused.

    ``delta`` (rows, n) uint8 is the opened ``bits xor a``; ``b`` (rows, n) int16 in [0, p) this party's share of
    the dealer's bits mod p. The transformed share is ``z = (-1)^delta b (+ delta on R)`` mod p; the sentinel
    appends ``0`` on L and ``1`` on R; the output (rows, n + 1) int16 is ``y_k = sum_{j<=k} z_j - 2 z_k (+1 on L)``
    mod p. Branch-free (``delta`` is a uniformly random bit, which a branch would mispredict half the time), and
    per row in three passes (transform, running sum, reduction) so that the first and last vectorise."""
    rows, n = b.shape
    out = np.empty((rows, n + 1), dtype=np.int16)
    one = np.int32(1 if left else 0)
    pp = np.int32(p)
    top = pp + 1 - one  # (-1)^delta b + delta for delta = 1: p - b on L, p + 1 - b on R
    magic, shift = _small_magic(p)  # exact below 2^16 > (n + 3) p
    z = np.empty(n + 1, dtype=np.int32)
    acc = np.empty(n + 1, dtype=np.int32)
    for r in range(rows):
        br, dr, o = b[r], delta[r], out[r]
        for k in range(n):
            bv = np.int32(br[k])
            zz = bv + np.int32(dr[k] & 1) * (top - 2 * bv)  # in [0, p + 1]
            z[k] = zz - pp * (zz >= pp)
        z[n] = 1 - one  # the sentinel: 0 on L, 1 on R
        run = np.int32(0)  # kept unreduced (below (n + 1) p)
        for k in range(n + 1):
            run += z[k]
            acc[k] = run
        for k in range(n + 1):
            y = acc[k] - 2 * z[k] + one + 2 * pp  # in [2, (n + 3) p]
            o[k] = y - np.int32((np.int64(y) * magic) >> shift) * pp
    return out


@njit(**_OPTS)
def scaled_rotation(i: np.ndarray, u: np.ndarray, a: np.ndarray, b: np.ndarray, sign_b: int, c: np.ndarray,
                    has_c: bool, p: int) -> np.ndarray:
    """``L_i(u * v mod p)`` per row with ``v = a + sign_b b (+ c)`` mod p (the semidirect action of recover):
    ``a``, ``b``, ``c`` int16 in [0, p), ``sign_b`` is 1 or -1, ``u`` in [1, p), ``i`` the row shifts (>= 0);
    ``out[r, k] = u[r, s] v[r, s] mod p`` with ``s = (k + i[r]) mod N``. The products are computed in order (a
    vectorised pass) and then copied out as the two contiguous pieces of the rotation. Needs ``2 p^2 < 2^16``."""
    rows, n = a.shape
    out = np.empty((rows, n), dtype=np.int16)
    prod = np.empty(n, dtype=np.int16)
    magic, shift = _small_magic(p)  # exact below 2^16 > 2 p^2
    cs = np.int32(1 if has_c else 0)
    sb = np.int32(sign_b)
    pp = np.int32(p)
    for r in range(rows):
        ar, br, cr, ur, o = a[r], b[r], c[r], u[r], out[r]
        for s in range(n):
            v = np.int32(ar[s]) + sb * np.int32(br[s]) + cs * np.int32(cr[s]) + pp  # in [1, 4p)
            v -= pp * (v >= pp)
            v -= pp * (v >= pp)  # in [0, 2p)
            t = np.int32(ur[s]) * v
            prod[s] = t - np.int32((np.int64(t) * magic) >> shift) * pp
        sh = i[r] % n
        for s in range(sh, n):
            o[s - sh] = prod[s]
        for s in range(sh):
            o[s - sh + n] = prod[s]
    return out


@njit(**_OPTS)
def select_open(x: np.ndarray, t: np.ndarray, tm: np.ndarray, xm_hi: np.ndarray, xm_lo: np.ndarray):
    """The message of select's cross action, fused: for this party's share ``x`` (int64, read as the unsigned
    Z_2^65 value ``2 hi + lo``), bits ``t`` and its masks ``tm``, ``(xm_hi, xm_lo)``, returns
    ``dt = t xor tm`` and ``z = (-1)^t (x - xm)`` in Z_2^65 as ``(z_hi, z_lo)``."""
    n = x.size
    dt = np.empty(n, dtype=np.uint8)
    z_hi = np.empty(n, dtype=np.int64)
    z_lo = np.empty(n, dtype=np.uint8)
    for k in range(n):
        v = x[k]
        xh = (v >> 1) & 0x7FFFFFFFFFFFFFFF
        xl = v & 1
        ml = np.int64(xm_lo[k] & 1)
        hi = xh - xm_hi[k] - ml + (xl & ml)  # x + (-xm), with -(2h + l) = 2(-h - l) + l
        lo = xl ^ ml
        tk = np.int64(t[k] & 1)
        z_hi[k] = hi if tk == 0 else -hi - lo
        z_lo[k] = lo
        dt[k] = np.uint8(tk ^ (tm[k] & 1))
    return dt, z_hi, z_lo


@njit(**_OPTS)
def select_finish(x: np.ndarray, t: np.ndarray, dt: np.ndarray, other_dt: np.ndarray, other_hi: np.ndarray,
                  other_lo: np.ndarray, y_hi: np.ndarray, y_lo: np.ndarray, right: bool) -> np.ndarray:
    """Select's last local step, fused: the cross action's share ``c = (-1)^t z' + (-1)^(dt xor dt') y`` (``z'``
    the other party's message), then ``v = x - c`` in Z_2^65 and the halving: ``hi`` on L, ``hi + lo`` on R."""
    n = x.size
    out = np.empty(n, dtype=np.int64)
    for k in range(n):
        tk = np.int64(t[k] & 1)
        oh, ol = other_hi[k], np.int64(other_lo[k] & 1)
        ah = oh if tk == 0 else -oh - ol
        sk = np.int64((dt[k] ^ other_dt[k]) & 1)
        yh, yl = y_hi[k], np.int64(y_lo[k] & 1)
        bh = yh if sk == 0 else -yh - yl
        ch = ah + bh + (ol & yl)  # c = a + b
        cl = ol ^ yl
        v = x[k]
        xh = (v >> 1) & 0x7FFFFFFFFFFFFFFF
        xl = v & 1
        hi = xh - ch - cl + (xl & cl)  # x - c
        lo = xl ^ cl
        out[k] = hi + lo if right else hi
    return out


@njit(**_OPTS)
def sub_mod(a: np.ndarray, b: np.ndarray, p: int) -> np.ndarray:
    """``(a - b) mod p`` as int16 for flat ``a``, ``b`` in [0, p)."""
    out = np.empty(a.size, dtype=np.int16)
    for k in range(a.size):
        v = np.int64(a[k]) - np.int64(b[k])
        out[k] = v + p * (v < 0)
    return out


@njit(**_OPTS)
def first_min_of_sum(w: np.ndarray, big_u: np.ndarray, p: int) -> np.ndarray:
    """Per row, the first index of the minimum of ``(w + big_u) mod p`` (R's step of first-non-zero: the index of
    the unique zero), as int64."""
    rows, n = w.shape
    out = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        # 0 is the least residue: the first zero is the answer (the protocol's rows have exactly one)
        arg = -1
        for k in range(n):
            v = np.int64(w[r, k]) + np.int64(big_u[r, k])
            if v == 0 or v == p:
                arg = k
                break
        if arg < 0:  # no zero: the first minimum, as argmin
            best, arg = np.int64(p), 0
            for k in range(n):
                v = np.int64(w[r, k]) + np.int64(big_u[r, k])
                v -= p * (v >= p)
                better = v < best
                best = v if better else best
                arg = k if better else arg
        out[r] = arg
    return out


@njit(**_OPTS)
def lemire_below(words: np.ndarray, m: int, offset: int, out: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Lemire's exact rejection sampling of Z_m from uniform 16-bit words: ``x = w m``; reject if
    ``x mod 2^16 < 2^16 mod m``, else ``out = (x >> 16) + offset`` (exactly uniform on [offset, offset + m)).
    Word ``k`` fills ``out[positions[k]]`` (or ``out[k]`` where ``positions`` is empty). Returns the positions that
    were rejected, in order, to be redrawn (their ``out`` is overwritten then).

    One pass; rejections (below 0.4% of the words for m < 256, so their branch is predicted) are collected in a
    buffer of a 64th of the words, and only a draw that overflows it is counted first and redone."""
    limit = 65536 % m
    indirect = positions.size > 0
    n = words.size
    cap = n // 64 + 64
    rejected = np.empty(cap, dtype=np.int64)
    j = 0
    if indirect:
        for k in range(n):
            x = np.int64(words[k]) * m
            out[positions[k]] = (x >> 16) + offset
            if x & 0xFFFF < limit:
                if j < cap:
                    rejected[j] = positions[k]
                j += 1
    else:
        for k in range(n):
            x = np.int64(words[k]) * m
            out[k] = (x >> 16) + offset
            if x & 0xFFFF < limit:  # rare: the branch is predicted
                if j < cap:
                    rejected[j] = k
                j += 1
    if j <= cap:
        return rejected[:j]
    rejected = np.empty(j, dtype=np.int64)
    j = 0
    for k in range(n):
        if np.int64(words[k]) * m & 0xFFFF < limit:
            rejected[j] = positions[k] if indirect else k
            j += 1
    return rejected


@njit(**_OPTS)
def pack_digits(v: np.ndarray, m: int, d: int) -> np.ndarray:
    """Base-``m`` digits (``v`` flat, values in [0, m)) packed ``d`` per uint32 word, least significant first,
    zero padded (``m^d <= 2^32``)."""
    n = v.size
    words = (n + d - 1) // d
    out = np.empty(words, dtype=np.uint32)
    for w in range(words):
        acc = 0
        for j in range(d - 1, -1, -1):
            k = w * d + j
            acc = acc * m + (np.int64(v[k]) if k < n else 0)
        out[w] = acc
    return out


def division_magic(d: int, nbits: int) -> tuple[int, int]:
    """``(M, s)`` with ``floor(x / d) = (x M) >> s`` for every ``0 <= x < 2^nbits`` (Granlund and Montgomery's
    round-up method: ``s = nbits + ceil(log2 d)``, ``M = ceil(2^s / d)``), or ``(0, 0)`` when ``x M`` could leave
    a signed 64-bit integer."""
    s = nbits + (d - 1).bit_length()
    m = -(-(1 << s) // d)
    if nbits + m.bit_length() > 63:
        return 0, 0
    return m, s


def unpack_plan(m: int, d: int) -> tuple[int, int, int]:
    """How :func:`unpack_digits` divides words of ``d`` base-``m`` digits by ``m``: ``(magic, shift, 0)`` when one
    multiply-shift is exact for the whole word; otherwise ``(magic, shift, h)``: each word is first split at
    ``m^h`` (``h = d // 2``, one float64 division with an exact correction) and the two parts, below
    ``m^(d - h)``, are divided with the multiply-shift (two independent chains)."""
    magic, shift = division_magic(m, (m**d - 1).bit_length())
    if magic:
        return magic, shift, 0
    h = d // 2
    magic, shift = division_magic(m, (m ** (d - h) - 1).bit_length())
    if not magic:
        raise ValueError(f"no multiply-shift division for base {m}")
    return magic, shift, h


@njit(**_OPTS)
def unpack_digits(x: np.ndarray, n: int, m: int, d: int, out: np.ndarray, magic: int, shift: int,
                  split: int) -> bool:
    """The inverse of :func:`pack_digits` into ``out`` (``n`` digits); False if a word is at or above ``m^d`` or
    the padding is not zero (a malformed message). ``(magic, shift, split) = unpack_plan(m, d)``. Each digit of a
    word depends on the previous quotient, so a whole-word chain is latency-bound; the split halves it."""
    limit = np.int64(1)
    for _ in range(d):
        limit *= m
    mh = np.int64(1)
    for _ in range(split):
        mh *= m
    inv = 1.0 / mh
    ok = True
    full = n // d  # words with no padding digit
    for w in range(full):
        acc = np.int64(x[w])
        ok = ok and acc < limit
        base = w * d
        if split == 0:
            for j in range(d):
                q = (acc * magic) >> shift
                out[base + j] = acc - q * m
                acc = q
        else:
            hi = np.int64(acc * inv)  # acc < 2^32: the float quotient is off by at most one
            hi -= np.int64(hi * mh > acc)
            hi += np.int64((hi + 1) * mh <= acc)
            lo = acc - hi * mh
            for j in range(d - split):
                qh = (hi * magic) >> shift
                if j < split:
                    ql = (lo * magic) >> shift
                    out[base + j] = lo - ql * m
                    lo = ql
                out[base + split + j] = hi - qh * m
                hi = qh
    for w in range(full, x.size):  # the last word, with its zero padding (plain integer division)
        acc = np.int64(x[w])
        ok = ok and acc < limit
        for j in range(d):
            k = w * d + j
            digit = acc % m
            acc //= m
            if k < n:
                out[k] = digit
            else:
                ok = ok and digit == 0
    return ok


@njit(**_OPTS)
def mod_16bit(v: np.ndarray, m: int, magic: int, shift: int) -> np.ndarray:
    """``v mod m`` (int16) for flat int16 ``v`` in [-m^2, 2^16 - m^2): shifted by ``m^2`` into [0, 2^16) and divided
    with ``(magic, shift) = division_magic(m, 16)``."""
    out = np.empty(v.size, dtype=np.int16)
    mm = np.int64(m) * m
    for k in range(v.size):
        t = (np.int64(v[k]) + mm) & 0xFFFF
        out[k] = t - ((t * magic) >> shift) * m
    return out


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every kernel for the argument types the protocols pass, so that the
    first protocol call does not pay for it. Received and drawn buffers are read-only numpy views, which numba types
    separately."""
    bits_msb_first(np.zeros(2, dtype=np.int64), 63)
    bit_planes(np.zeros(2, dtype=np.int64), 31)
    x64, x8 = np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.uint8)
    for t in (x8, x64):
        dt, zh, zl = select_open(x64, t, x8, x64, x8)
        select_finish(x64, t, dt, x8, x64, x8, x64, x8, True)
    d = np.zeros((2, 3), dtype=np.uint8)
    b = np.ones((2, 3), dtype=np.int16)
    transform_fnz(d, b, True, 67)
    i = np.zeros(2, dtype=np.int64)
    scaled_rotation(i, b, b, b, -1, b, True, 67)
    sub_mod(b.ravel(), b.ravel(), 67)
    first_min_of_sum(b, b, 67)
    out = np.zeros(4, dtype=np.int16)
    bad = lemire_below(np.zeros(4, dtype=np.uint16), 67, 0, out, np.zeros(0, dtype=np.int64))
    lemire_below(np.zeros(4, dtype=np.uint16), 67, 1, out, bad)
    for v in (b.ravel(), np.zeros(3, dtype=np.int64)):
        words = pack_digits(v, 67, 5)
        unpack_digits(np.frombuffer(words.tobytes(), dtype=np.uint32), v.size, 67, 5, np.empty(v.size, np.int16),
                      *unpack_plan(67, 5))
    mod_16bit(b.ravel(), 67, *division_magic(67, 16))
