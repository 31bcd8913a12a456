"""The models: logistic regression (features split between L and R) and Networks A-D of the SecureNN / Falcon MNIST
suite (28x28 inputs, 10 classes), each as a plain PyTorch module (the baseline and the source of the seeded
initialisation) and as a secure :class:`~aloe.mpc.nn.layers.Sequential` built from it.

- LR: ``Linear(d, 1)``, sigmoid + BCE;
- A: FC 784-128, ReLU, FC 128-128, ReLU, FC 128-10;
- B: conv 16 5x5, ReLU, pool 2, conv 16 5x5, ReLU, pool 2, FC 256-100, ReLU, FC 100-10;
- C (LeNet): conv 20 5x5, ReLU, pool 2, conv 50 5x5, ReLU, pool 2, FC 800-500, ReLU, FC 500-10;
- D: conv 5 5x5 stride 2 padding 2, ReLU, FC 980-100, ReLU, FC 100-10.

Pooling is max or average. With max-pooling the secure model applies the ReLU *after* the pool: ``relu`` and
``max`` commute (``max(relu(a), relu(b)) = relu(max(a, b))``), so the function and its gradient are the same while
the ReLU runs on a quarter of the elements.
"""

from __future__ import annotations

import torch
from torch import nn

from aloe import AloeError
from aloe.mpc.gmodule import COMPARE_BITS
from aloe.mpc.nn import layers as L
from aloe.mpc.party import Party

MODELS = ("lr", "a", "b", "c", "d")
POOLS = ("max", "avg")


def plain_model(name: str, *, features: int = 784, pool: str = "max", seed: int = 0) -> nn.Sequential:
    """The plain PyTorch model with PyTorch's default initialisation under ``torch.manual_seed(seed)``."""
    if pool not in POOLS:
        raise AloeError(f"unknown pooling {pool!r} (max or avg)")

    def pool_layer() -> nn.Module:
        return nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name == "lr":
            return nn.Sequential(nn.Linear(features, 1))
        if name == "a":
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, 10))
        if name == "b":
            return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), pool_layer(), nn.Conv2d(16, 16, 5), nn.ReLU(),
                                 pool_layer(), nn.Flatten(), nn.Linear(256, 100), nn.ReLU(), nn.Linear(100, 10))
        if name == "c":
            return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), pool_layer(), nn.Conv2d(20, 50, 5), nn.ReLU(),
                                 pool_layer(), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
        if name == "d":
            return nn.Sequential(nn.Conv2d(1, 5, 5, stride=2, padding=2), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(980, 100), nn.ReLU(), nn.Linear(100, 10))
    finally:
        torch.random.set_rng_state(gen_state)
    raise AloeError(f"unknown model {name!r} (one of {', '.join(MODELS)})")


def secure_model(party: Party, plain: nn.Sequential, *, chunk: int = L.DEFAULT_CHUNK,
                 sign_bits: int = COMPARE_BITS, drelu: str = "gmodule") -> L.Sequential:
    """The secure twin of ``plain`` with the same initial weights (public, seeded) as trivial shares. ``sign_bits``
    and the DReLU method ``drelu`` go to every ReLU and max-pool (see :class:`~aloe.mpc.nn.layers.ReLU`)."""
    cmp = {"chunk": chunk, "sign_bits": sign_bits, "drelu": drelu}
    mods = list(plain)
    layers: list[L.Layer] = []
    first = True
    i = 0
    while i < len(mods):
        m = mods[i]
        name = f"{i}"
        if isinstance(m, nn.Linear):
            b = None if m.bias is None else m.bias.detach()
            layers.append(L.Dense(party, m.weight.detach().T.contiguous(), b, name=name, need_input_grad=not first))
            first = False
        elif isinstance(m, nn.Conv2d):
            b = None if m.bias is None else m.bias.detach()
            layers.append(L.Conv2d(party, m.weight.detach(), b, stride=m.stride[0], padding=m.padding[0], name=name,
                                   need_input_grad=not first))
            first = False
        elif isinstance(m, nn.ReLU):
            if i + 1 < len(mods) and isinstance(mods[i + 1], nn.MaxPool2d):
                # relu then max-pool == max-pool then relu, with 4x fewer ReLUs
                layers.append(L.MaxPool2d(party, mods[i + 1].kernel_size, **cmp))
                layers.append(L.ReLU(party, **cmp))
                i += 2
                continue
            layers.append(L.ReLU(party, **cmp))
        elif isinstance(m, nn.MaxPool2d):
            layers.append(L.MaxPool2d(party, m.kernel_size, **cmp))
        elif isinstance(m, nn.AvgPool2d):
            layers.append(L.AvgPool2d(party, m.kernel_size))
        elif isinstance(m, nn.Flatten):
            layers.append(L.Flatten(party))
        else:
            raise AloeError(f"no secure layer for {type(m).__name__}")
        i += 1
    return L.Sequential(layers)


def load_weights(plain: nn.Sequential, secure_weights: dict) -> nn.Sequential:
    """Put revealed secure weights (keyed ``"<index>.weight"`` / ``"<index>.bias"``, Dense weights stored
    (in, out)) into ``plain``."""
    with torch.no_grad():
        for key, value in secure_weights.items():
            idx, kind = key.split(".")
            mod = plain[int(idx)]
            v = torch.as_tensor(value).to(torch.float32)
            if kind == "weight" and isinstance(mod, nn.Linear):
                v = v.T
            getattr(mod, kind).copy_(v)
    return plain
