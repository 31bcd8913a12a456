import pytest
import torch

from aloe.mpc.party import run_local
from aloe.mpc.ring import OverflowRisk
from aloe.mpc.tensor import SharedTensor, TriangleLayer

torch.set_num_threads(1)


def own(party, value, owner):
    return SharedTensor.from_private(party, value if party.role == owner else None, owner, tuple(value.shape))


def test_shared_tensor_api_against_plaintext():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    img = torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) * 0.3

    def program(party):
        X, W, I, K = own(party, x, "L"), own(party, w, "R"), own(party, img, "L"), own(party, k, "R")
        out = {
            "add": (X + 1.5 - X * 0.5).reveal(),
            "mul": (X * X).reveal(),
            "matmul": (X @ W).reveal(),
            "matmul_public": (X @ w).reveal(),
            "conv": I.conv2d(K, padding=1).reveal(),
            "relu": X.relu().reveal(),
            "sigmoid": X.sigmoid().reveal(),
            "softmax": X.softmax(dim=1, logit_range=16).reveal(),
            "sum": X.sum(0).reveal(),
            "reshape": X.reshape(2, 12).T.reveal(),
            "pool": I.max_pool2d(2).reveal(),
            "avgpool": I.avg_pool2d(2).reveal(),
            "gt": (X > W[:4, :1].reshape(4, 1)).reveal(),
            "le": (X <= 0.25).reveal(),
            "arith": (X >= 0).to_arith().reveal(),
            "only_l": X.reveal(to="L"),
        }
        return out

    res = run_local(program, timeout=30)
    o = res["L"]
    assert (o["add"] - (x + 1.5 - x * 0.5)).abs().max() < 1e-3
    assert (o["mul"] - x * x).abs().max() < 1e-3
    assert (o["matmul"] - x @ w).abs().max() < 2e-3
    assert (o["matmul_public"] - x @ w).abs().max() < 2e-3
    assert (o["conv"] - torch.nn.functional.conv2d(img, k, padding=1)).abs().max() < 2e-3
    assert (o["relu"] - x.clamp(min=0)).abs().max() < 1e-4
    assert (o["sigmoid"] - torch.sigmoid(x)).abs().max() < 5e-3
    assert (o["softmax"] - torch.softmax(x, 1)).abs().max() < 0.03
    assert (o["sum"] - x.sum(0)).abs().max() < 1e-3
    assert (o["reshape"] - x.reshape(2, 12).T).abs().max() < 1e-4
    assert (o["pool"] - torch.nn.functional.max_pool2d(img, 2)).abs().max() < 1e-4
    assert (o["avgpool"] - torch.nn.functional.avg_pool2d(img, 2)).abs().max() < 1e-3
    assert torch.equal(o["gt"].long(), (x > w[:4, :1].reshape(4, 1)).long())
    assert torch.equal(o["le"].long(), (x <= 0.25).long())
    assert torch.equal(o["arith"], (x >= 0).double())
    assert (o["only_l"] - x).abs().max() < 1e-4
    assert res["R"]["only_l"] is None and res["D"]["add"] is None


def test_triangle_layer_dense_and_conv_gradients():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(8, 3, generator=g, dtype=torch.float64)
    img = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    k = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) * 0.3
    dyc = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)

    def program(party):
        lay = TriangleLayer(party, "dense", x.shape, w.shape)
        y = lay.forward(own(party, x, "L"), own(party, w, "R"))
        gx, gw = lay.backward(own(party, dy, "L"))
        conv = TriangleLayer(party, "conv2d", img.shape, k.shape, stride=2, padding=1)
        yc = conv.forward(own(party, img, "L"), own(party, k, "R"))
        gxc, gwc = conv.backward(own(party, dyc, "L"))
        return [t.reveal() for t in (y, gx, gw, yc, gxc, gwc)]

    got = run_local(program, timeout=30)["L"]
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    (xr @ wr).backward(dy)
    ir, kr = img.clone().requires_grad_(True), k.clone().requires_grad_(True)
    yc = torch.nn.functional.conv2d(ir, kr, stride=2, padding=1)
    yc.backward(dyc)
    for a, b in zip(got, [x @ w, xr.grad, wr.grad, yc.detach(), ir.grad, kr.grad], strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 3e-3


def test_clipped_sigmoid_handles_inputs_outside_the_period():
    x = torch.linspace(-40, 40, 401, dtype=torch.float64)

    def program(party):
        X = own(party, x, "L")
        return X.sigmoid(clip=True).reveal(), X.sigmoid().reveal()

    clipped, raw = run_local(program, timeout=30)["L"]
    assert (clipped - torch.sigmoid(x)).abs().max() < 5e-3
    # without clipping the periodic series is wrong far outside (-16, 16): the reason to clip
    assert (raw - torch.sigmoid(x)).abs().max() > 0.2


def test_private_input_outside_the_fixed_point_range_is_refused():
    def program(party):
        big = torch.tensor([1e12])
        return own(party, big, "L")

    with pytest.raises(OverflowRisk):
        run_local(program, timeout=5)


def test_overflow_risk_is_detected_from_declared_bounds_before_computing():
    x = torch.full((3, 50), 900.0)

    def program(party):
        X = SharedTensor.from_private(party, x if party.role == "L" else None, "L", (3, 50), bound=1000.0)
        Y = X * X  # bound 1e6: fine
        assert Y.bound == 1e6
        try:
            Y @ SharedTensor.from_private(party, x.T if party.role == "R" else None, "R", (50, 3), bound=1000.0)
        except OverflowRisk as exc:  # 1e6 * 1e3 * 50 = 5e10 > 2^34
            return str(exc)
        return "no error"

    res = run_local(program, timeout=10)
    for role in ("L", "R", "D"):
        assert "beyond the safe fixed-point range" in res[role]

    def lying_owner(party):
        return SharedTensor.from_private(party, x if party.role == "L" else None, "L", (3, 50), bound=10.0)

    with pytest.raises(Exception, match="exceeds its declared bound"):
        run_local(lying_owner, timeout=5)


def test_shares_of_a_private_input_do_not_reveal_it():
    x = torch.arange(100, dtype=torch.float64)

    def program(party):
        X = own(party, x, "L")
        return None if party.is_dealer else X.share

    res = run_local(program, timeout=10)
    enc = (x * 2**14).long()
    for role in ("L", "R"):
        assert (res[role] == enc).sum() == 0
    assert torch.equal(res["L"] + res["R"], enc)
