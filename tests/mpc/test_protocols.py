"""Every protocol against its plaintext result on many random inputs and edge values (in-process parties)."""

import math

import pytest
import torch

from aloe.mpc import functions as fn
from aloe.mpc import gmodule as G
from aloe.mpc import triples as T
from aloe.mpc.party import run_local
from aloe.mpc.ring import FixedPoint

from .helpers import reveal_raw, share_raw

torch.set_num_threads(1)
BIG = 2**63
EDGES = torch.tensor([0, 1, -1, 2, -2, BIG - 1, -BIG, BIG - 2, -BIG + 1, 2**62, -(2**62), 2**14, -(2**14)])


def rand64(*shape):
    return torch.randint(-BIG, BIG - 1, shape, dtype=torch.int64)


def run(program, *args, **kw):
    return run_local(program, *args, timeout=30.0, return_stats=True, **kw)


def test_bilinear_beaver_triples_are_exact_in_the_ring():
    x, y = rand64(6, 5), rand64(6, 5)
    a, b = rand64(4, 7), rand64(7, 3)
    img, k = rand64(2, 2, 6, 6), rand64(3, 2, 3, 3)

    def program(party):
        out = {}
        for name, f, u, v in (
            ("mul", T.MUL, x, y),
            ("matmul", lambda p, q: p @ q, a, b),
            ("conv", lambda p, q: torch.nn.functional.conv2d(p, q, padding=1), img, k),
        ):
            su, sv = share_raw(party, u), share_raw(party, v)
            z = T.beaver(party, f, su, sv)
            out[name] = (reveal_raw(party, z), None if party.is_dealer else su)
        return out

    res, stats = run(program)
    assert torch.equal(res["L"]["mul"][0], x * y)
    assert torch.equal(res["L"]["matmul"][0], a @ b)
    assert torch.equal(res["L"]["conv"][0], torch.nn.functional.conv2d(img, k, padding=1))
    assert not torch.equal(res["L"]["mul"][1], x)  # a party's share is not the secret
    # online: each party sends 64 (|x| + |y|) bits per product (plus the test's own sharing and reveals)
    assert stats["D"].offline.bytes_sent > 8 * (30 + 12 + 2 * 3 * 36)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_triangle_triple_forward_and_both_backward_products(kind):
    if kind == "dense":
        maps = T.matmul_maps()
        x, w, dy = rand64(5, 4), rand64(4, 3), rand64(5, 3)
        want = (x @ w, dy @ w.T, x.T @ dy)
    else:
        xs, ws = (2, 2, 7, 7), (3, 2, 3, 3)
        maps = T.conv2d_maps(xs, ws, stride=2, padding=1)
        x, w = rand64(*xs), rand64(*ws)
        y_f = torch.nn.functional.conv2d(x.double(), w.double(), stride=2, padding=1)
        dy = rand64(*y_f.shape)
        # reference in float64 on small integers for the backward maps, exact ring for the forward
        xi, wi, dyi = (t % 97 - 48 for t in (x, w, dy))
        x, w, dy = xi, wi, dyi
        xf, wf, dyf = (t.double() for t in (xi, wi, dyi))
        want = (
            torch.nn.functional.conv2d(x, w, stride=2, padding=1),
            torch.nn.grad.conv2d_input(xs, wf, dyf, stride=2, padding=1).round().long(),
            torch.nn.grad.conv2d_weight(xf, ws, dyf, stride=2, padding=1).round().long(),
        )

    def program(party):
        tri = T.TriangleTriple(party, maps.f, maps.g1, maps.g2)
        y = tri.forward(share_raw(party, x), share_raw(party, w))
        gx, gw = tri.backward(share_raw(party, dy))
        return [reveal_raw(party, t) for t in (y, gx, gw)]

    res, stats = run(program)
    for got, exp in zip(res["L"], want, strict=True):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("owners", [[("L", 4)], [("L", 3), ("R", 5)], [("R", 2), ("L", 2), ("R", 4)]])
def test_triangle_triple_with_an_input_its_owners_hold(owners):
    """A first layer's input held in the clear by its owners (column blocks): the same products as with a shared
    input, each block opened by its owner alone (half the opening of a shared input)."""
    n_in = sum(w for _, w in owners)
    maps = T.matmul_maps()
    x, w, dy = rand64(6, n_in), rand64(n_in, 3), rand64(6, 3)

    def program(party):
        if party.is_dealer:
            xo = T.meta((6, n_in))
        else:  # each party holds its own blocks in the clear and zero elsewhere
            cols = torch.split(x, [width for _, width in owners], -1)
            xo = torch.cat([c if who == party.role else torch.zeros_like(c) for (who, _), c in zip(owners, cols)], -1)
        tri = T.TriangleTriple(party, maps.f, maps.g1, maps.g2)
        ws = share_raw(party, w)
        b0 = party.stats.online.bytes_sent
        y = tri.forward(xo, ws, owners)
        sent = party.stats.online.bytes_sent - b0
        gx, gw = tri.backward(share_raw(party, dy))
        return [reveal_raw(party, t) for t in (y, gx, gw)], sent

    res, _ = run(program)
    for got, exp in zip(res["L"][0], (x @ w, dy @ w.T, x.T @ dy), strict=True):
        assert torch.equal(got, exp)
    mine = {r: sum(width for who, width in owners if who == r) for r in ("L", "R")}
    for r in ("L", "R"):  # the forward's message: this party's own columns and its share of W, plus framing
        assert 8 * (6 * mine[r] + n_in * 3) <= res[r][1] < 8 * (6 * mine[r] + n_in * 3) + 120
    from aloe import AloeError
    from aloe.mpc.tensor import OwnedInput

    def bad_shape(party):
        return OwnedInput.from_blocks(party, [("L", torch.zeros(6, 3) if party.role == "L" else None, (6, 4))])

    with pytest.raises(AloeError, match="declared"):
        run(bad_shape)
    with pytest.raises(AloeError, match="belong to L or R"):
        OwnedInput.from_blocks(None, [("D", None, (6, 4))])
    with pytest.raises(ValueError, match="cover the input"):
        run(lambda party: T.TriangleTriple(party, maps.f, maps.g1, maps.g2).forward(
            T.meta((6, n_in)) if party.is_dealer else x, share_raw(party, w), [("L", 1)]))


def test_module_transform_and_first_nonzero():
    p, n = 67, 64
    z = (torch.rand(300, n) < 0.1).long()
    z[:, -1] = 1
    z[0] = 0
    z[0, -1] = 1  # only the sentinel
    z[1] = 1
    first = torch.argmax(z, dim=-1)

    def program2(party):
        if party.is_dealer:
            zx = T.meta(tuple(z.shape))
        else:
            r = torch.randint(0, 2, z.shape)
            if party.role == "L":
                party.send_peer([(r, 2)])
                zx = r
            else:
                (r,) = party.recv_peer([(tuple(z.shape), 2)])
                zx = r.long() ^ z
        zp = G.module_transform(party, zx, p)
        opened = reveal_raw(party, zp.long() if not party.is_dealer else zp, p)
        idx, _ = G.first_nonzero(party, zp, p)
        idx_open = None if party.is_dealer else reveal_raw(party, idx.long(), 0) % n
        return opened, idx_open

    res, _ = run(program2)
    assert torch.equal(res["L"][0], z)
    assert torch.equal(res["L"][1], first)


def test_recover_hides_values_but_keeps_the_single_zero():
    p = 67
    b = torch.randint(1, p, (50, 64))
    zero_at = torch.randint(0, 64, (50,))
    b[torch.arange(50), zero_at] = 0

    def program(party):
        if party.is_dealer:
            G.recover(party, T.meta(tuple(b.shape)), p)
            return None
        r = torch.randint(0, p, b.shape)
        if party.role == "L":
            party.send_peer([(r, p)])
            share = r
        else:
            (r,) = party.recv_peer([(tuple(b.shape), p)])
            share = (b - r) % p
        rec = G.recover(party, share.to(torch.int16), p)
        return rec

    res, _ = run(program)
    g_shift, g_scale = res["L"].shift, res["L"].scale
    a = res["R"].value.long()
    assert torch.equal(a, G.semidirect_act(g_shift, g_scale.long(), b, p))
    assert torch.equal((a == 0).sum(-1), torch.ones(50, dtype=torch.long))
    assert torch.equal((torch.argmin(a, -1) + g_shift) % 64, zero_at)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("op", ["gt", "ge", "lt", "le"])
def test_private_compare_all_orders(op):
    n = 63
    a = torch.randint(0, 2**n - 1, (400,))
    bb = torch.randint(0, 2**n - 1, (400,))
    bb[:100] = a[:100]  # equal values
    bb[100:150] = a[100:150] + 1  # neighbours
    a[150:160] = 0
    bb[160:170] = 2**n - 1
    want = getattr(torch, op)(a, bb).long()

    def program(party):
        mine = T.meta((400,)) if party.is_dealer else (a if party.role == "L" else bb)
        out = G.private_compare(party, mine, n, op)
        return reveal_raw(party, out, 2)

    res, _ = run(program)
    assert torch.equal(res["L"], want)


def test_drelu_msb_select_relu_and_rounds():
    x = torch.cat([EDGES, rand64(2000), torch.randint(-1000, 1000, (500,))])
    t = torch.randint(0, 2, x.shape)

    def program(party):
        sx = share_raw(party, x)
        st = None if party.is_dealer else (t if party.role == "L" else torch.zeros_like(t))
        if party.is_dealer:
            st = T.meta(tuple(x.shape))
        party.sync()
        d0 = party.stats.depth
        s = G.drelu(party, sx)
        rounds_drelu = party.stats.depth - d0
        party.sync()
        d0 = party.stats.depth
        r, bit = G.relu(party, sx)
        rounds_relu = party.stats.depth - d0
        sel = G.select(party, st, sx)
        back = G.relu_backward(party, bit, sx)
        shares = None if party.is_dealer else sx
        return [reveal_raw(party, s, 2), reveal_raw(party, r), reveal_raw(party, sel), reveal_raw(party, back),
                rounds_drelu, rounds_relu, shares]

    res, stats = run(program)
    s, r, sel, back, _, _, share_l = res["L"]
    assert torch.equal(s, (x >= 0).long())
    assert torch.equal(r, torch.where(x >= 0, x, torch.zeros_like(x)))
    assert torch.equal(sel, t * x)
    assert torch.equal(back, r)
    assert max(res["L"][4], res["R"][4]) == 4
    assert max(res["L"][5], res["R"][5]) == 5
    # the share held by one party is not the secret, and its top bit is balanced
    assert (share_l == x).double().mean() < 0.01
    assert 0.45 < (share_l < 0).double().mean() < 0.55


def test_prime_for_a_compare_length():
    assert [G.prime_for(n) for n in (63, 31, 24, 1)] == [67, 37, 29, 5]


@pytest.mark.parametrize("bits", [31, 20])
def test_sign_read_from_a_lower_bit_is_exact_inside_its_range(bits):
    """DReLU/ReLU with ``bits < 63`` on every edge of ``[-2^bits, 2^bits)`` and random values inside it: the same
    answers as the full compare, in the same 4 (5) rounds, with a shorter compare (less traffic)."""
    lim = 2**bits
    x = torch.cat([torch.tensor([0, 1, -1, lim - 1, -lim, lim - 2, -lim + 1, lim // 2, -lim // 2]),
                   torch.randint(-lim, lim, (3000,)), torch.randint(-1000, 1000, (300,))])

    def program(party, sign_bits):
        sx = share_raw(party, x)
        party.sync()
        d0, b0 = party.stats.depth, party.stats.online.bytes_sent
        r, bit = G.relu(party, sx, sign_bits)
        used = (party.stats.depth - d0, party.stats.online.bytes_sent - b0)
        return [reveal_raw(party, r), reveal_raw(party, bit, 2), used]

    res, _ = run(program, bits)
    r, bit, (rounds, sent_l) = res["L"]
    assert torch.equal(bit, (x >= 0).long())
    assert torch.equal(r, x.clamp(min=0))
    assert max(rounds, res["R"][2][0]) == 5
    full, _ = run(program, 63)
    assert torch.equal(full["L"][0], r)
    short = sent_l + res["R"][2][1]
    assert short < 0.6 * (full["L"][2][1] + full["R"][2][1])
    # outside the range the answer is bit ``bits``, not the sign: the caller's bound matters
    out = torch.tensor([lim, -lim - 1])
    res, _ = run(lambda party: reveal_raw(party, G.drelu(party, share_raw(party, out), bits), 2))
    assert torch.equal(res["L"], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bit 1 to 63"):
        G.msb(None, x, 64)


def test_cross_action_in_z2_65():
    hi, lo, t = rand64(300), torch.randint(0, 2, (300,)), torch.randint(0, 2, (300,))
    v = G.Int65(hi, lo)
    want = v.signed(t)

    def program(party):
        if party.is_dealer:
            G.cross_action(party, T.meta((300,)), None)
            return None
        # L holds the whole value and bit t; R holds zero and bit 0
        mine = v if party.role == "L" else G.Int65(torch.zeros_like(hi), torch.zeros_like(lo))
        tb = t if party.role == "L" else torch.zeros_like(t)
        return G.cross_action(party, tb, mine)

    res, _ = run(program)
    got = res["L"] + res["R"]
    assert torch.equal(got.hi, want.hi) and torch.equal(got.lo.long(), want.lo.long())


def _share_fixed(party, x, fp):
    return share_raw(party, fp.encode(x))


def test_fourier_sigmoid_one_round_and_error_bound():
    fp = FixedPoint(14)
    x = torch.cat([torch.linspace(-12, 12, 2001, dtype=torch.float64), torch.tensor([0.0, -1e-4, 1e-4, 11.99])])

    def program(party):
        sx = _share_fixed(party, x, fp)
        party.sync()
        d0 = party.stats.depth
        before = party.stats.online.bytes_sent
        y = fn.sigmoid(party, sx)
        rounds = party.stats.depth - d0
        sent = party.stats.online.bytes_sent - before
        return reveal_raw(party, y), rounds, sent

    res, _ = run(program)
    y = fp.decode(res["L"][0])
    assert (y - torch.sigmoid(x)).abs().max() < 4e-3
    assert (y - fn.sigmoid_plain(x)).abs().max() < 1e-3  # fixed-point part of the error
    assert max(res["L"][1], res["R"][1]) == 1
    # 19 bits per element each way (plus a 60-byte frame)
    assert res["L"][2] * 8 < 19 * x.numel() + 600


@pytest.mark.parametrize("scale,steps", [(1.0, 16), (3.0, 32)])
def test_ode_softmax_error_and_rounds(scale, steps):
    fp = FixedPoint(14)
    x = torch.randn(64, 10, dtype=torch.float64) * scale
    x[0] = 0.0
    x[1, 3] = 4 * scale

    def program(party):
        sx = _share_fixed(party, x, fp)
        party.sync()
        d0 = party.stats.depth
        y = fn.softmax(party, sx, steps)
        rounds = party.stats.depth - d0
        return reveal_raw(party, y), rounds

    res, _ = run(program)
    y = fp.decode(res["L"][0])
    assert max(res["L"][1], res["R"][1]) == 2 * steps
    assert (y - fn.softmax_plain(x, steps)).abs().max() < 3e-3
    assert (y - torch.softmax(x, -1)).abs().max() < 0.35 / steps + 3e-3
    assert (y.sum(-1) - 1).abs().max() < 5e-3


def test_softmax_steps_rule():
    assert fn.softmax_steps(4) == 16
    assert fn.softmax_steps(20) == 32
    assert fn.softmax_steps(40) == 64


@pytest.mark.parametrize("kernel", [2, 3])
def test_maxpool_and_its_backward(kernel):
    fp = FixedPoint(14)
    x = torch.randn(2, 3, 2 * kernel, 3 * kernel, dtype=torch.float64)
    x[0, 0, 0, 0] = -5.0
    dy = torch.randn(2, 3, 2, 3, dtype=torch.float64)

    def program(party):
        y, state = fn.maxpool2d(party, _share_fixed(party, x, fp), kernel)
        g = fn.maxpool2d_backward(party, state, _share_fixed(party, dy, fp))
        return reveal_raw(party, y), reveal_raw(party, g)

    res, _ = run(program)
    xr = x.clone().requires_grad_(True)
    want = torch.nn.functional.max_pool2d(xr, kernel)
    want.backward(dy)
    assert (fp.decode(res["L"][0]) - want.detach()).abs().max() < 1e-4
    assert (fp.decode(res["L"][1]) - xr.grad).abs().max() < 1e-4


def test_drelu_traffic_matches_the_code_derived_cost():
    n = 1000

    def program(party):
        sx = share_raw(party, rand64(n) if party.role == "L" else torch.zeros(n, dtype=torch.int64))
        party.sync()
        b_on = party.stats.online.bytes_sent
        b_off = party.stats.offline.bytes_sent
        G.drelu(party, sx)
        return party.stats.online.bytes_sent - b_on, party.stats.offline.bytes_sent - b_off

    res, _ = run(program)
    online = 8 * (res["L"][0] + res["R"][0]) / n
    offline = 8 * res["D"][1] / n
    assert 1000 < online < 1030  # 126 + 2 x 64 x 6.4 + 70 = 1015 bits plus frames
    assert 860 < offline < 900  # 63 x 6.4 + 64 x 6.4 + 64 = 877 bits
    assert math.isfinite(online)


def test_gmodule_actions_pm1_and_cyclic_shift():
    x = torch.cat([EDGES, rand64(300)])
    t = torch.randint(0, 2, x.shape)
    v = torch.randint(0, 2, (200, 64))
    i = torch.randint(0, 64, (200,))

    def program(party):
        a = G.pm1_action(party, t if party.role == "L" else None, x if party.role == "R" else None, tuple(x.shape))
        b = G.shift_action(party, i if party.role == "L" else None, v if party.role == "R" else None, (200, 64))
        return reveal_raw(party, a), reveal_raw(party, b, 2)

    res, _ = run(program)
    assert torch.equal(res["L"][0], torch.where(t.bool(), -x, x))
    assert torch.equal(res["L"][1], G.shift_left(v, i))


@pytest.mark.parametrize("n", [64, 32, 16, 8, 7, 65])
def test_shift_left_and_bit_rotation_match_the_definition(n):
    """``out[r, k] = v[r, (k + i[r]) mod n]`` for every shift (0 and n - 1 included), with leading dimensions."""
    v = torch.randint(0, 67, (3, n, n), dtype=torch.int16)
    i = torch.arange(n).repeat(3, 1)[torch.arange(3)].roll(1, 1).reshape(3, n)
    expect = torch.empty_like(v)
    for a in range(3):
        for r in range(n):
            for k in range(n):
                expect[a, r, k] = v[a, r, (k + int(i[a, r])) % n]
    assert torch.equal(G.shift_left(v, i), expect)
    bits = (v & 1).to(torch.uint8)
    assert torch.equal(G.rotate_bits(bits, i), (expect & 1).to(torch.uint8))
    assert torch.equal(G.shift_left(v.to(torch.int64), i), expect.to(torch.int64))


def _padded_forward_input_grad(dy, w, x_shape, stride, padding):
    """The input gradient as a forward convolution of the zero-stuffed, padded ``dy`` (the former formulation)."""
    n, o, h, wd = dy.shape
    k1, k2 = w.shape[2], w.shape[3]
    if stride > 1:
        d = dy.new_zeros((n, o, (h - 1) * stride + 1, (wd - 1) * stride + 1))
        d[:, :, ::stride, ::stride] = dy
        dy = d
    ph, pw = k1 - 1 - padding, k2 - 1 - padding
    out_h, out_w = dy.shape[2] + 2 * ph - k1 + 1, dy.shape[3] + 2 * pw - k2 + 1
    if x_shape[2] > out_h or x_shape[3] > out_w:
        dy = torch.nn.functional.pad(dy, (0, x_shape[3] - out_w, 0, x_shape[2] - out_h))
    return torch.nn.functional.conv2d(dy, w.flip(2, 3).transpose(0, 1), padding=(ph, pw))


@pytest.mark.parametrize("xs,ws,stride,padding", [
    ((3, 2, 9, 9), (4, 2, 5, 5), 1, 0), ((2, 3, 8, 7), (2, 3, 3, 3), 2, 1),
    ((2, 1, 28, 28), (5, 1, 5, 5), 2, 2), ((2, 2, 6, 6), (3, 2, 3, 3), 1, 1),
])
def test_conv_input_gradient_is_exact_in_the_ring(xs, ws, stride, padding):
    w = rand64(*ws)
    y = torch.nn.functional.conv2d(torch.zeros(xs, dtype=torch.int64), w, stride=stride, padding=padding)
    dy = rand64(*y.shape)
    got = T.conv2d_input_grad(dy, w, xs, stride, padding)
    assert got.shape == xs
    assert torch.equal(got, _padded_forward_input_grad(dy, w, xs, stride, padding))


def test_triangle_triple_without_the_input_gradient():
    """A first layer's triple leaves out dX: the same y and dW, no dX, and less from the dealer."""
    xs, ws = (2, 2, 7, 7), (3, 2, 3, 3)
    maps = T.conv2d_maps(xs, ws)
    x, w = rand64(*xs), rand64(*ws)
    dy = rand64(*torch.nn.functional.conv2d(x, w).shape)

    def program(party, need):
        tri = T.TriangleTriple(party, maps.f, maps.g1, maps.g2, need_g1=need)
        y = tri.forward(share_raw(party, x), share_raw(party, w))
        gx, gw = tri.backward(share_raw(party, dy))
        return [reveal_raw(party, y), gx is None, reveal_raw(party, gw)]

    full, s_full = run(program, True)
    part, s_part = run(program, False)
    assert torch.equal(part["L"][0], torch.nn.functional.conv2d(x, w)) and torch.equal(part["L"][0], full["L"][0])
    assert torch.equal(part["L"][2], full["L"][2])
    assert part["L"][1] and part["R"][1] and not full["L"][1]
    saved = s_full["D"].offline.bytes_sent - s_part["D"].offline.bytes_sent
    assert 8 * math.prod(xs) <= saved <= 8 * math.prod(xs) + 64  # one ring element per input element + a frame
