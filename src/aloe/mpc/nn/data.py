"""Training data as each party sees it: every party loads only its own part.

- MNIST (``aloe.assets.corpus.data_root() / "mnist"``, the idx ``.gz`` files): for Networks A-D, L owns the images
  and R owns the labels; for logistic regression the 784 pixels are split *vertically*: L owns the top 14 pixel
  rows (392 features), R owns the bottom 14 rows and the binary label ``digit >= 5``.
- ``blobs``: two Gaussian clusters with ``d`` features (the CrypTen benchmark's 5,000 x 20 shape), columns split
  in half between L and R, labels owned by R; each party generates only its own columns (public seed).

Pixels are scaled to [0, 1]. ``limit`` keeps the first N training examples. The number of examples and the shapes
are public; the values are not.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aloe import AloeError
from aloe.assets.corpus import data_root

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HALF = 14 * 28  # LR: features per party
MNIST_TRAIN = 60_000  # training examples of the full MNIST set


def mnist_dir(root: str | None = None) -> Path:
    """The MNIST directory: ``root`` (a party's own data, holding only the files it owns) or the shared one."""
    d = Path(root) if root else data_root() / "mnist"
    if not any((d / f).exists() for f in FILES["train"]):
        raise AloeError(f"MNIST not found under {d} (expected the idx .gz files)")
    return d


def _idx(path: Path, limit: int | None = None) -> np.ndarray:
    if not path.exists():
        raise AloeError(f"{path} not found (this party's data does not include it)")
    with gzip.open(path, "rb") as fh:
        head = fh.read(4)
        if head[:2] != b"\0\0" or head[2] != 8:
            raise AloeError(f"{path} is not an idx file of unsigned bytes")
        nd = head[3]
        dims = [int.from_bytes(fh.read(4), "big") for _ in range(nd)]
        n = dims[0] if limit is None else min(dims[0], limit)
        per = int(np.prod(dims[1:])) if nd > 1 else 1
        data = np.frombuffer(fh.read(n * per), dtype=np.uint8)
    if data.size != n * per:
        raise AloeError(f"{path} is truncated")
    return data.reshape([n, *dims[1:]])


def mnist_count(split: str = "train", root: str | None = None) -> int:
    d = mnist_dir(root)
    path = next(d / f for f in FILES[split][::-1] if (d / f).exists())  # labels or images: both say the count
    with gzip.open(path, "rb") as fh:
        fh.read(4)
        return int.from_bytes(fh.read(4), "big")


def mnist_images(split: str, limit: int | None = None, root: str | None = None) -> torch.Tensor:
    """(N, 1, 28, 28) float32 in [0, 1]."""
    arr = _idx(mnist_dir(root) / FILES[split][0], limit)
    return torch.from_numpy(arr.astype(np.float32) / 255.0).unsqueeze(1)


def mnist_labels(split: str, limit: int | None = None, root: str | None = None) -> torch.Tensor:
    return torch.from_numpy(_idx(mnist_dir(root) / FILES[split][1], limit).astype(np.int64))


def binary_label(digits: torch.Tensor) -> torch.Tensor:
    """The LR task on MNIST: ``digit >= 5``."""
    return (digits >= 5).to(torch.float32)


def blobs_columns(n: int, d: int, seed: int, part: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Two Gaussian clusters (means +-0.5 in every feature, unit variance); ``part`` "L" / "R" gets its half of the
    columns (R also the labels), "all" everything. Each column block comes from its own seeded generator, so a party
    generates only its own block."""
    half = d // 2
    y = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5).to(torch.float32)
    sign = (2 * y - 1).unsqueeze(1)

    def block(cols: int, tag: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1000 + tag)
        return torch.randn(n, cols, generator=g) + 0.5 * sign

    if part == "L":
        return block(half, 1), None
    if part == "R":
        return block(d - half, 2), y
    return torch.cat([block(half, 1), block(d - half, 2)], 1), y


@dataclass(frozen=True)
class Layout:
    """Public facts about the training data: count, and the shape of each owner's features."""

    n: int
    l_shape: tuple[int, ...]  # L's features per example
    r_shape: tuple[int, ...] | None  # R's features per example (None: R owns only labels)
    classes: int  # 1: binary labels


def layout(model: str, dataset: str, limit: int | None, blobs: tuple[int, int] = (5000, 20), *,
           root: str | None = None, count: int | None = None, owners: tuple = ()) -> Layout:
    """``count`` gives the number of MNIST examples without reading a file (the dealer holds none); ``owners``
    ((name, columns, labels) per data owner, dataset ``owners``) gives the columns the owners share."""
    if dataset == "owners":
        if model != "lr":
            raise AloeError("data from owners (aloe mpc share) is for logistic regression only")
        n = count if limit is None else min(count, limit)
        return Layout(n, (sum(c for _, c, _ in owners),), (0,), 1)
    if dataset == "blobs":
        if model != "lr":
            raise AloeError("the blobs data set is for logistic regression only")
        n, d = blobs
        n = n if limit is None else min(n, limit)
        return Layout(n, (d // 2,), (d - d // 2,), 1)
    if dataset != "mnist":
        raise AloeError(f"unknown data set {dataset!r} (mnist or blobs)")
    total = mnist_count("train", root) if count is None else count
    n = total if limit is None else min(total, limit)
    if model == "lr":
        return Layout(n, (HALF,), (HALF,), 1)
    return Layout(n, (1, 28, 28), None, 10)


def party_data(role: str, model: str, dataset: str, limit: int | None, seed: int,
               blobs: tuple[int, int] = (5000, 20), root: str | None = None,
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(features, labels) of ``role``'s own part; ``None`` for what it does not own (the dealer owns nothing, and
    with data from owners neither do L and R)."""
    if role == "D" or dataset == "owners":
        return None, None
    lay = layout(model, dataset, limit, blobs, root=root)
    if dataset == "blobs":
        return blobs_columns(lay.n, blobs[1], seed, role)
    if model == "lr":
        if role == "L":
            return mnist_images("train", lay.n, root).reshape(lay.n, -1)[:, :HALF], None
        return (mnist_images("train", lay.n, root).reshape(lay.n, -1)[:, HALF:],
                binary_label(mnist_labels("train", lay.n, root)))
    if role == "L":
        return mnist_images("train", lay.n, root), None
    return None, mnist_labels("train", lay.n, root)


def test_data(model: str, dataset: str, seed: int, limit: int | None = None,
              blobs: tuple[int, int] = (5000, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out set the model owner evaluates the revealed model on (MNIST's t10k; fresh blobs)."""
    if dataset == "blobs":
        x, y = blobs_columns(blobs[0] if limit is None else min(limit, blobs[0]), blobs[1], seed + 1, "all")
        return x, y
    x, digits = mnist_images("test", limit), mnist_labels("test", limit)
    if model == "lr":
        return x.reshape(x.shape[0], -1), binary_label(digits)
    return x, digits
