"""Secure layers against PyTorch autograd (threads; tiny shapes): forward, input and weight gradients, and the
momentum SGD step with the fixed-point learning rate."""

import time

import pytest
import torch
from torch import nn

from aloe import AloeError
from aloe.mpc.nn.models import plain_model, secure_model
from aloe.mpc.nn.optim import SGD, quantize_rate
from aloe.mpc.party import run_local
from aloe.mpc.tensor import SharedTensor

from .helpers import reveal_raw

torch.set_num_threads(1)


def _tiny(pool: str) -> nn.Sequential:
    torch.manual_seed(1)
    pool_layer = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), pool_layer, nn.Flatten(), nn.Linear(3 * 3 * 3, 4), nn.ReLU(),
                         nn.Linear(4, 2)).double()


def _program(party, plain, x, dy, sign_bits=63, drelu="gmodule"):
    net = secure_model(party, plain, sign_bits=sign_bits, drelu=drelu)
    xs = SharedTensor.from_private(party, x if party.role == "L" else None, "L", tuple(x.shape))
    out = net.forward(xs)
    g = SharedTensor.from_private(party, dy if party.role == "R" else None, "R", tuple(dy.shape))
    net.backward(g)
    grads = {}
    for q in net.params:
        raw = reveal_raw(party, q.grad)  # weight gradients carry 2f fractional bits
        grads[q.name] = None if raw is None else raw.double() / party.fp.scale**2
    return out.reveal(to="L"), grads


@pytest.mark.parametrize(("pool", "sign_bits", "drelu"), [
    ("max", 63, "gmodule"), ("avg", 63, "gmodule"), ("max", 31, "gmodule"), ("avg", 31, "gmodule"),
    ("max", 31, "prefix"), ("avg", 31, "prefix"), ("max", 63, "prefix"),
])
def test_forward_and_gradients_match_autograd(pool, sign_bits, drelu):
    plain = _tiny(pool)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 2, generator=g, dtype=torch.float64)
    out, grads = run_local(_program, plain, x, dy, sign_bits, drelu)["L"]
    ref = plain(x)
    ref.backward(dy)
    assert (out - ref.detach()).abs().max() < 5e-3
    for i, m in enumerate(plain):
        if isinstance(m, nn.Conv2d | nn.Linear):
            w = m.weight.grad.T if isinstance(m, nn.Linear) else m.weight.grad
            assert (grads[f"{i}.weight"] - w).abs().max() < 1e-2, f"{i}.weight"
            assert (grads[f"{i}.bias"] - m.bias.grad).abs().max() < 1e-2, f"{i}.bias"


def _sgd_program(party, w0, grad, lr, batch, steps):
    from aloe.mpc.nn.layers import Parameter

    q = Parameter(party, "w", w0)
    opt = SGD(party, [q], lr, batch, momentum=0.9)
    for _ in range(steps):
        if not party.is_dealer:
            enc = party.fp.encode(grad) * party.fp.scale  # a gradient with 2f fractional bits
            q.grad = enc if party.role == "L" else torch.zeros_like(enc)
        else:
            q.grad = q.share
        opt.step()
    return q.tensor().reveal(to="L")


def test_sgd_matches_torch_with_quantized_rate():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grad_sum = torch.randn(5, 3, generator=g, dtype=torch.float64) * 8  # a batch-summed gradient
    lr, batch, steps = 0.01, 128, 6
    out = run_local(_sgd_program, w0, grad_sum, lr, batch, steps)["L"]
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=quantize_rate(lr / batch).value * batch, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        w.grad = grad_sum / batch
        opt.step()
    assert (out - w.detach()).abs().max() < 5e-4


def test_quantize_rate():
    r = quantize_rate(0.01 / 128)
    assert 512 <= r.mantissa < 1024
    assert abs(r.value - 0.01 / 128) / (0.01 / 128) < 2**-10
    # a plain fixed-point constant would be far off: round(7.8e-5 * 2^14) / 2^14 = 6.1e-5
    assert abs(round(0.01 / 128 * 2**14) / 2**14 - 0.01 / 128) / (0.01 / 128) > 0.2
    with pytest.raises(AloeError):
        quantize_rate(0.0)


def test_plain_models_have_the_suite_shapes():
    x = torch.zeros(2, 1, 28, 28)
    for name in "abcd":
        assert plain_model(name)(x).shape == (2, 10)
    sizes = {n: sum(p.numel() for p in plain_model(n).parameters()) for n in "abcd"}
    assert sizes["a"] == 784 * 128 + 128 + 128 * 128 + 128 + 1290
    assert sizes["c"] > sizes["b"]


def _shaped_rounds(party, name, rounds):
    from aloe.mpc.nn.wan import shape_links

    shape_links(party, name)
    party.sync()
    t0 = time.perf_counter()
    for _ in range(rounds):
        party.exchange([(torch.zeros(4, dtype=torch.int64), 0)]) if not party.is_dealer else None
    return time.perf_counter() - t0


def test_wan_profile_delays_each_round():
    seconds = run_local(_shaped_rounds, "100mbit-25ms", 4)["L"]
    assert 4 * 0.025 <= seconds < 4 * 0.025 + 2.0
    with pytest.raises(AloeError, match="unknown network profile"):
        run_local(_shaped_rounds, "dialup", 1)
