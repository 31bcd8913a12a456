"""The parallel-prefix carry DReLU (:mod:`aloe.mpc.prefix`) against the plain sign and the G-module compare."""

import math

import pytest
import torch

from aloe.mpc import gmodule as G
from aloe.mpc import kernels, prefix
from aloe.mpc import triples as T
from aloe.mpc.party import run_local

from .helpers import reveal_raw, share_raw

torch.set_num_threads(1)


def run(program, *args):
    return run_local(program, *args, timeout=30.0, return_stats=True)


def _inputs(bits: int) -> torch.Tensor:
    lim = 2**bits if bits < 63 else 2**63
    edges = [0, 1, -1, lim - 1, -lim, lim // 2, -(lim // 2), lim - 2, -lim + 1]
    inside = torch.randint(-min(lim, 2**62), min(lim, 2**62), (3000,))
    return torch.cat([torch.tensor([e for e in edges if -(2**63) <= e < 2**63]), inside])


@pytest.mark.parametrize("bits", [1, 2, 5, 20, 31, 63])
def test_prefix_sign_matches_the_gmodule_compare_inside_its_range(bits):
    """Every edge of ``[-2^bits, 2^bits)`` and random values inside it (3,009 elements: not a multiple of 64): the
    prefix DReLU gives the sign, the G-module compare the same bits, in ``1 + ceil(log2 bits)`` rounds."""
    x = _inputs(bits)

    def program(party):
        sx = share_raw(party, x)
        party.sync()
        d0 = party.stats.depth
        s = G.drelu(party, sx, bits, "prefix")
        rounds = party.stats.depth - d0
        g = G.drelu(party, sx, bits, "gmodule")
        return reveal_raw(party, s, 2), reveal_raw(party, g, 2), rounds

    res, _ = run(program)
    s, g, rounds = res["L"]
    assert torch.equal(s, (x >= 0).long())
    assert torch.equal(g, s)
    assert max(rounds, res["R"][2]) == 1 + math.ceil(math.log2(bits))


def test_prefix_relu_and_its_backward_and_the_answer_outside_the_range():
    bits = 31
    x = _inputs(bits)
    dy = torch.randint(-(2**40), 2**40, x.shape)

    def program(party, values, grads):
        sx, sd = share_raw(party, values), share_raw(party, grads)
        r, bit = G.relu(party, sx, bits, "prefix")
        back = G.relu_backward(party, bit, sd)
        return reveal_raw(party, r), reveal_raw(party, back)

    res, _ = run(program, x, dy)
    r, back = res["L"]
    assert torch.equal(r, x.clamp(min=0))
    assert torch.equal(back, torch.where(x >= 0, dy, torch.zeros_like(dy)))
    # outside the range the answer is bit ``bits``, as with the G-module compare: the caller's bound matters
    out = torch.tensor([2**bits, -(2**bits) - 1, 2**bits + 5])
    res, _ = run(lambda party: reveal_raw(party, G.drelu(party, share_raw(party, out), bits, "prefix"), 2))
    assert torch.equal(res["L"], torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="bit 1 to 63"):
        prefix.msb(None, x, 0)
    with pytest.raises(ValueError, match="unknown DReLU method"):
        G.drelu(None, x, bits, "linear")


def test_prefix_traffic_per_element_and_masked_openings():
    """Bit 31 over 64,000 elements: 31 generate ANDs (1 bit each way) and 55 Beaver ANDs (2 bits each way), so 282
    bits online and 86 from the dealer per element, against 440 and 368 for the G-module compare. Every word L
    opens is its bits XOR a fresh keystream bit: for the input 0 shared as (0, 0), the opened bits are balanced."""
    n, bits = 64_000, 31
    zero = torch.zeros(n, dtype=torch.int64)

    def program(party, method):
        sent = []
        if party.role == "L":
            send = party.send_peer

            def recording(items):
                sent.extend(t for t, _ in items)
                return send(items)

            party.send_peer = recording
        x = T.meta((n,)) if party.is_dealer else zero
        b_on, b_off = party.stats.online.bytes_sent, party.stats.offline.bytes_sent
        G.drelu(party, x, bits, method)
        used = (party.stats.online.bytes_sent - b_on, party.stats.offline.bytes_sent - b_off)
        return used, sent

    res, _ = run(program, "prefix")
    online = 8 * (res["L"][0][0] + res["R"][0][0]) / n
    offline = 8 * res["D"][0][1] / n
    assert 282 <= online < 283 and 86 <= offline < 87
    words = torch.cat([t.reshape(-1) for t in res["L"][1]]).numpy().view("uint64")
    ones = sum(bin(int(w)).count("1") for w in words[:: max(1, words.size // 4000)])
    sampled = words[:: max(1, words.size // 4000)].size * 64
    assert 0.48 < ones / sampled < 0.52
    res, _ = run(program, "gmodule")
    g_online = 8 * (res["L"][0][0] + res["R"][0][0]) / n
    g_offline = 8 * res["D"][0][1] / n
    assert 440 <= g_online < 441 and 368 <= g_offline < 369


def test_bit_planes_kernel():
    v = torch.randint(-(2**63), 2**63 - 1, (200,)).numpy()
    planes = kernels.bit_planes(v, 63)
    assert planes.shape == (63, 4)
    for e in (0, 1, 63, 64, 127, 199):
        for j in (0, 1, 30, 62):
            assert (int(planes[j, e // 64]) >> (e % 64)) & 1 == (int(v[e]) >> j) & 1
    assert int(planes[5, 3]) >> 8 == 0  # zero beyond the last element
