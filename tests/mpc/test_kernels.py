"""The compiled kernels against the plain torch steps they replace, on random inputs and edge values."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aloe.mpc import gmodule as G
from aloe.mpc import kernels as K
from aloe.mpc.dealer import PRG, new_key

torch.set_num_threads(1)
P = G.PRIME


def _edges(rows: int, n: int, high: int, low: int = 0) -> torch.Tensor:
    """Random values in [low, high) with the first rows at the extremes."""
    t = torch.randint(low, high, (rows, n), dtype=torch.int16)
    t[0], t[1] = low, high - 1
    t[2, ::2], t[2, 1::2] = low, high - 1
    return t


@pytest.mark.parametrize("role", ["L", "R"])
def test_transform_fnz_equals_module_transform_sentinel_and_fnz_input(role):
    rows, n = 300, 63
    b = _edges(rows, n, P)
    delta = torch.randint(0, 2, (rows, n), dtype=torch.uint8)
    delta[3], delta[4] = 0, 1
    d = delta.bool()
    z = G._modp(torch.where(d, P - b, b), P) if role == "L" else G._modp(torch.where(d, P + 1 - b, b), P)
    z = torch.cat([z, torch.full((rows, 1), 0 if role == "L" else 1, dtype=torch.int16)], dim=-1)
    expect = G.fnz_input(z, P, SimpleNamespace(role=role))
    got = K.transform_fnz(delta.numpy(), b.numpy(), role == "L", P)
    assert torch.equal(torch.from_numpy(got), expect)


@pytest.mark.parametrize("sign,with_c", [(-1, True), (1, False)])
def test_scaled_rotation_equals_semidirect_action(sign, with_c):
    rows, n = 257, 64
    a, b, c = _edges(rows, n, P), _edges(rows, n, P).flip(0), _edges(rows, n, P).roll(5, 0)
    u = _edges(rows, n, P, low=1)
    i = torch.randint(0, n, (rows,))
    i[0], i[1] = 0, n - 1
    v = a.to(torch.int64) + sign * b.to(torch.int64) + (c.to(torch.int64) if with_c else 0)
    expect = G.semidirect_act(i, u, torch.remainder(v, P).to(torch.int16), P)
    got = K.scaled_rotation(i.numpy(), u.numpy(), a.numpy(), b.numpy(), sign, c.numpy(), with_c, P)
    assert torch.equal(torch.from_numpy(got), expect)


def test_sub_mod_and_first_min_of_sum():
    a, b = _edges(100, 64, P), _edges(100, 64, P).flip(1)
    got = torch.from_numpy(K.sub_mod(a.reshape(-1).numpy(), b.reshape(-1).numpy(), P)).reshape(a.shape)
    assert torch.equal(got.to(torch.int64), torch.remainder(a.to(torch.int64) - b, P))
    w, big_u = _edges(100, 64, P), _edges(100, 64, P).roll(3, 1)
    w[5] = (P - big_u[5]) % P  # a row that is all zeros: the first index wins
    w[6] = (P - big_u[6] + 1) % P  # all ones but a single zero at 40
    w[6, 40] = (P - big_u[6, 40]) % P
    w[7] = (P - big_u[7] + 2) % P  # no zero: the first minimum (1, at 50 and 60)
    w[7, 50], w[7, 60] = (P - big_u[7, 50] + 1) % P, (P - big_u[7, 60] + 1) % P
    expect = torch.argmin(G._modp(w + big_u, P), dim=-1)
    assert torch.equal(torch.from_numpy(K.first_min_of_sum(w.numpy(), big_u.numpy(), P)), expect)


@pytest.mark.parametrize("m", [3, 66, 67, 255])
def test_lemire_sampling_is_exactly_uniform_over_all_words(m):
    """Over all 2^16 words, the accepted ones map onto each residue exactly floor(2^16 / m) times."""
    words = np.arange(1 << 16, dtype=np.uint16)
    out = np.full(words.size, -1, dtype=np.int16)
    rejected = K.lemire_below(words, m, 0, out, np.zeros(0, dtype=np.int64))
    assert rejected.size == (1 << 16) % m
    kept = np.delete(out, rejected)
    assert (kept >= 0).all() and (kept < m).all()
    assert (np.bincount(kept, minlength=m) == (1 << 16) // m).all()
    shifted = np.full(words.size, -1, dtype=np.int16)
    assert np.array_equal(K.lemire_below(words, m, 1, shifted, np.zeros(0, dtype=np.int64)), rejected)
    assert np.array_equal(np.delete(shifted, rejected), kept + 1)


def test_lemire_rejections_beyond_the_buffer_are_all_reported():
    """A draw with more rejections than the one-pass buffer holds (all words rejected) is counted and redone."""
    m = 255  # 2^16 mod 255 = 1: only the word 0 is rejected
    words = np.zeros(10_000, dtype=np.uint16)
    out = np.zeros(words.size, dtype=np.int16)
    assert np.array_equal(K.lemire_below(words, m, 0, out, np.zeros(0, dtype=np.int64)), np.arange(words.size))
    pos = np.arange(words.size, dtype=np.int64)[::-1].copy()
    assert np.array_equal(K.lemire_below(words, m, 0, out, pos), pos)


def test_prg_below_is_uniform_and_the_same_on_both_ends_of_a_stream():
    key = new_key()
    a, b = PRG(key), PRG(key)
    x, y = a.below((200_000,), P), b.below((200_000,), P)
    assert torch.equal(x, y) and x.dtype == torch.int16
    counts = torch.bincount(x.to(torch.int64), minlength=P).double()
    expect = 200_000 / P
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 150  # 66 degrees of freedom: mean 66, this bound is ~p = 1e-7
    assert torch.equal(a.below((10,), 5), b.below((10,), 5))  # still in step after the rejections
    nz = a.nonzero_below((50_000,), P)
    assert int(nz.min()) == 1 and int(nz.max()) == P - 1


@pytest.mark.parametrize("n", [63, 64, 5])
def test_bits_msb_first_matches_the_integers(n):
    edges = torch.tensor([0, 1, -1, 2**62, -(2**63), 2**63 - 1, 12345])
    v = torch.cat([edges, torch.randint(-(2**63), 2**63 - 1, (50,))])
    bits = G._bits_msb_first(v.reshape(-1, 1), n)
    assert bits.shape == (57, 1, n) and bits.dtype == torch.uint8
    for x, row in zip(v.tolist(), bits.reshape(-1, n).tolist(), strict=True):
        assert row == [((x % 2**64) >> (n - 1 - k)) & 1 for k in range(n)]


@pytest.mark.parametrize("d", [3, 66, 67, 131, 255])
def test_division_magic_is_exact(d):
    """Exhaustive below 2^16; for 67's packed words (below 67^5 < 2^31) on the edges and random words."""
    m, s = K.division_magic(d, 16)
    x = np.arange(1 << 16, dtype=np.int64)
    assert ((x * m) >> s == x // d).all()
    if d == 67:
        m, s = K.division_magic(67, (67**5 - 1).bit_length())
        x = np.concatenate([np.arange(1 << 16), 67**5 - 1 - np.arange(1 << 16), np.random.randint(0, 67**5, 10**6)])
        x = x.astype(np.int64)
        assert ((x * m) >> s == x // 67).all()
    assert K.division_magic(65521, 32) == (0, 0)  # the product would leave int64: the words are split first


@pytest.mark.parametrize("m", [3, 37, 65521])
def test_unpack_of_split_words_is_exact_at_every_boundary(m):
    """Moduli whose whole-word division needs the split (m^d above 2^31): words just below, at and above each
    multiple of the split point m^h, and at the top of the range, decode to Python's digits."""
    from aloe.mpc import comm

    d = comm.digits_per_word(m)
    magic, shift, h = K.unpack_plan(m, d)
    assert h > 0
    top = m**d
    ks = np.unique(np.concatenate([np.arange(64), np.random.randint(0, top // m**h, 4000), [top // m**h - 1]]))
    words = np.unique(np.clip(np.concatenate([ks * m**h - 1, ks * m**h, ks * m**h + 1, [top - 1]]), 0, top - 1))
    out = np.empty(words.size * d, dtype=np.int16 if m < 1 << 15 else np.int64)
    assert K.unpack_digits(words.astype(np.uint32), out.size, m, d, out, magic, shift, h)
    expect = [(int(w) // m**j) % m for w in words for j in range(d)]
    assert out.tolist() == expect
