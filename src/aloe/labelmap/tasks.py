"""The classification tasks, each with its trunk.

- ``words``: next-word prediction on the public-domain KJV + Shakespeare texts: the previous ``context`` words
  predict the next one among the N most frequent words (Zipfian labels; targets outside the vocabulary are
  dropped). Each document is split in order: the first 90% of its tokens train, the last 10% test.
- ``pairs``: an extreme-classification task from the same texts: the previous ``context`` words predict the next
  *two* words jointly, the classes being the N most frequent word pairs of the training split (the texts have only
  about 32k distinct words, too few for next-word classes at N >= 10^5; they have hundreds of thousands of distinct
  pairs). Positions whose next pair is not a class are dropped. Same 90/10 split as ``words``.
- ``synthetic``: a teacher with any N up to 10^6 and beyond. Class y owns ``q`` feature tokens (a hash of y) out
  of a vocabulary of V; an example of class y keeps each of them with probability ``keep`` (at least one) and adds
  ``noise`` uniformly random tokens (a sparse bag-of-features problem like text classification). Examples are
  generated on the fly from a seed, so nothing of size N x (features) is stored.
- ``chars``: Chinese characters (GB2312 order, level 1 first) rendered from the system CJK fonts with random
  affine augmentation; train and test use the same fonts and different random augmentations. Needs the Debian
  packages listed in :data:`CJK_FONT_PACKAGES`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aloe import AloeError

TASKS = ("words", "pairs", "synthetic", "chars")
DEFAULT_CLASSES = {"words": 10_000, "pairs": 100_000, "synthetic": 10_000, "chars": 3755}
TASK_WIDTH = 128  # trunk output width d of every task
TOKEN_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


@dataclass
class Task:
    name: str
    n_classes: int
    width: int
    make_trunk: Callable[[], nn.Module]
    train_batches: Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (batch_size, epoch)
    test_batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    n_train: int
    n_test: int
    info: dict = field(default_factory=dict)
    label_weights: np.ndarray | None = None  # the training label distribution when it is not uniform


def _array_batches(x: torch.Tensor, y: torch.Tensor, seed: int):
    def train(batch_size: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), batch_size):
            idx = perm[s:s + batch_size]
            yield x[idx], y[idx]

    return train


def _ordered_batches(x: torch.Tensor, y: torch.Tensor):
    def test(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, len(y), batch_size):
            yield x[s:s + batch_size], y[s:s + batch_size]

    return test


class MLPTrunk(nn.Module):
    """Token embeddings (concatenated per position, or averaged as a bag) -> two ReLU layers of ``width``."""

    def __init__(self, n_tokens: int, embed: int, positions: int | None, width: int, pad: int | None = None):
        super().__init__()
        self.bag = positions is None
        if self.bag:
            self.embed = nn.EmbeddingBag(n_tokens, embed, mode="mean", padding_idx=pad)
            fan_in = embed
        else:
            self.embed = nn.Embedding(n_tokens, embed)
            fan_in = embed * positions
        self.mlp = nn.Sequential(nn.Linear(fan_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x) if self.bag else self.embed(x).flatten(1)
        return self.mlp(e)


# -------------------------------------------------------------------------------------------------------- words
def _tokens(docs: list[str]) -> list[list[str]]:
    return [TOKEN_RE.findall(d.lower()) for d in docs]


def _corpus_tokens(corpora: tuple[str, ...]) -> list[list[str]]:
    from aloe.assets import load_corpus

    docs: list[list[str]] = []
    for name in corpora:
        loaded = load_corpus(name)
        if not loaded:
            raise AloeError(f"corpus {name!r} has no documents")
        docs.extend(_tokens(loaded))
    return docs


def _split_examples(examples: Callable, train_parts: list, test_parts: list, max_train: int | None,
                    max_test: int | None, seed: int) -> tuple[torch.Tensor, ...]:
    """``examples`` of the train and test parts, each cut to at most ``max_*`` examples drawn without replacement
    (kept in order)."""
    rng = np.random.default_rng(seed)
    out: list[torch.Tensor] = []
    for parts, limit in ((train_parts, max_train), (test_parts, max_test)):
        x, y = examples(parts)
        if limit is not None and limit < len(y):
            idx = torch.from_numpy(np.sort(rng.choice(len(y), limit, replace=False)))
            x, y = x[idx], y[idx]
        out += [x, y]
    return tuple(out)


def _check_validation(validation: float) -> None:
    if not 0.0 <= validation < 1.0:
        raise AloeError(f"the validation fraction must be in [0, 1), got {validation}")


def _validation_parts(train_parts: list, test_parts: list, validation: float) -> tuple[list, list]:
    """(train, test) parts, or with ``validation`` > 0 the tuning split: the first ``1 - validation`` of each
    training part trains and the rest tests; the test parts are left out."""
    if not validation:
        return train_parts, test_parts
    cuts = [int(len(p) * (1.0 - validation)) for p in train_parts]
    return [p[:c] for p, c in zip(train_parts, cuts)], [p[c:] for p, c in zip(train_parts, cuts)]


def words_task(n_classes: int = 10_000, *, context: int = 3, corpora: tuple[str, ...] = ("kjv", "shakespeare"),
               max_train: int | None = None, max_test: int | None = None, width: int = TASK_WIDTH, embed: int = 64,
               seed: int = 0, validation: float = 0.0) -> Task:
    """With ``validation`` > 0 the task is a tuning split: the same classes, but training on the first
    ``1 - validation`` of each document's training part and testing on the rest of it (the test part is unused)."""
    _check_validation(validation)
    docs = _corpus_tokens(corpora)
    splits = [(d[: int(len(d) * 0.9)], d[int(len(d) * 0.9):]) for d in docs]
    counts = Counter(w for tr, _ in splits for w in tr)
    if len(counts) < n_classes:
        raise AloeError(f"the corpora {', '.join(corpora)} have only {len(counts)} distinct training words, "
                        f"fewer than the {n_classes} classes asked for")
    vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_classes]]
    index = {w: i for i, w in enumerate(vocab)}
    unk, bos = n_classes, n_classes + 1

    def examples(parts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for toks in parts:
            ids = np.array([index.get(w, unk) for w in toks], dtype=np.int64)
            padded = np.concatenate([np.full(context, bos, dtype=np.int64), ids])
            if ids.size == 0:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(padded, context + 1)
            keep = windows[:, -1] != unk
            xs.append(windows[keep, :-1])
            ys.append(windows[keep, -1])
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    fit_parts, eval_parts = _validation_parts([tr for tr, _ in splits], [te for _, te in splits], validation)
    x_tr, y_tr, x_te, y_te = _split_examples(examples, fit_parts, eval_parts, max_train, max_test, seed)
    label_counts = np.bincount(y_tr.numpy(), minlength=n_classes)
    return Task(
        name="words", n_classes=n_classes, width=width,
        make_trunk=lambda: MLPTrunk(n_classes + 2, embed, context, width),
        train_batches=_array_batches(x_tr, y_tr, seed), test_batches=_ordered_batches(x_te, y_te),
        n_train=len(y_tr), n_test=len(y_te),
        info={"corpora": list(corpora), "context": context, "vocabulary": n_classes, "validation": validation,
              "train_label_entropy_nats": _entropy(label_counts),
              "test_majority_top1": float((y_te == 0).float().mean())},
        label_weights=label_counts.astype(np.float64) + 0.5,
    )


def pairs_task(n_classes: int = 100_000, *, context: int = 3, corpora: tuple[str, ...] = ("kjv", "shakespeare"),
               input_vocab: int = 20_000, max_train: int | None = None, max_test: int | None = None,
               width: int = TASK_WIDTH, embed: int = 64, seed: int = 0, validation: float = 0.0) -> Task:
    """With ``validation`` > 0 the task is a tuning split: the same classes and inputs, but training on the first
    ``1 - validation`` of each document's training part and testing on the rest of it (the test part is unused)."""
    _check_validation(validation)
    docs = _corpus_tokens(corpora)
    splits = [(d[: int(len(d) * 0.9)], d[int(len(d) * 0.9):]) for d in docs]
    words = sorted({w for d in docs for w in d})
    wid = {w: i for i, w in enumerate(words)}
    n_words = len(words)
    train_ids = [np.array([wid[w] for w in tr], dtype=np.int64) for tr, _ in splits]
    test_ids = [np.array([wid[w] for w in te], dtype=np.int64) for _, te in splits]
    counts = np.bincount(np.concatenate(train_ids), minlength=n_words)
    keys = np.concatenate([a[:-1] * n_words + a[1:] for a in train_ids if len(a) > 1])
    uniq, pair_counts = np.unique(keys, return_counts=True)
    if len(uniq) < n_classes:
        raise AloeError(f"the corpora {', '.join(corpora)} have only {len(uniq)} distinct training word pairs, "
                        f"fewer than the {n_classes} classes asked for")
    top = np.lexsort((uniq, -pair_counts))[:n_classes]  # most frequent first, ties by key
    class_keys = uniq[top]
    by_key = np.argsort(class_keys)
    sorted_keys = class_keys[by_key]
    vocab = np.lexsort((np.arange(n_words), -counts))[: min(input_vocab, n_words)]
    inp = np.full(n_words, len(vocab), dtype=np.int64)  # words outside the input vocabulary: unk = len(vocab)
    inp[vocab] = np.arange(len(vocab))
    bos = len(vocab) + 1

    def examples(parts: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for ids in parts:
            if len(ids) < 2:
                continue
            k = ids[:-1] * n_words + ids[1:]  # the pair starting at each position
            pos = np.minimum(np.searchsorted(sorted_keys, k), len(sorted_keys) - 1)
            hit = sorted_keys[pos] == k
            padded = np.concatenate([np.full(context, bos, dtype=np.int64), inp[ids]])
            ctx = np.lib.stride_tricks.sliding_window_view(padded, context)[: len(k)]
            xs.append(ctx[hit])
            ys.append(by_key[pos[hit]])
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys).astype(np.int64))

    train_ids, test_ids = _validation_parts(train_ids, test_ids, validation)
    x_tr, y_tr, x_te, y_te = _split_examples(examples, train_ids, test_ids, max_train, max_test, seed)
    label_counts = np.bincount(y_tr.numpy(), minlength=n_classes)
    return Task(
        name="pairs", n_classes=n_classes, width=width,
        make_trunk=lambda: MLPTrunk(len(vocab) + 2, embed, context, width),
        train_batches=_array_batches(x_tr, y_tr, seed), test_batches=_ordered_batches(x_te, y_te),
        n_train=len(y_tr), n_test=len(y_te),
        info={"corpora": list(corpora), "context": context, "input_vocabulary": len(vocab), "validation": validation,
              "distinct_words": n_words, "distinct_train_pairs": int(len(uniq)),
              "train_pair_coverage": float(pair_counts[top].sum() / pair_counts.sum()),
              "train_label_entropy_nats": _entropy(label_counts),
              "test_majority_top1": float((y_te == 0).float().mean()),
              "most_frequent_pairs": [f"{words[int(c) // n_words]} {words[int(c) % n_words]}"
                                      for c in class_keys[:5]]},
        label_weights=label_counts.astype(np.float64) + 0.5,
    )


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------------- synthetic
def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)).astype(np.uint64)
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)).astype(np.uint64)
    return z ^ (z >> np.uint64(31))


def class_tokens(labels: np.ndarray, q: int, vocab: int, seed: int) -> np.ndarray:
    """The ``q`` feature tokens of each class: ``hash(seed, y, j) mod V`` (shape (len(labels), q))."""
    y = np.asarray(labels, dtype=np.uint64)[:, None]
    j = np.arange(q, dtype=np.uint64)[None, :]
    key = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) + y * np.uint64(q) + j)
    return (key % np.uint64(vocab)).astype(np.int64)


def synthetic_task(n_classes: int = 10_000, *, n_train: int = 200_000, n_test: int = 5_000, q: int = 8,
                   keep: float = 0.5, noise: int = 4, vocab: int | None = None, zipf: float = 0.0,
                   width: int = TASK_WIDTH, embed: int = 64, seed: int = 0) -> Task:
    if n_classes < 2:
        raise AloeError(f"need at least 2 classes, got {n_classes}")
    if not 0.0 < keep <= 1.0:
        raise AloeError(f"keep must be in (0, 1], got {keep}")
    vocab = int(vocab or min(1 << 16, max(4096, 4 * n_classes)))
    pad = vocab
    if zipf > 0:
        w = 1.0 / np.arange(1, n_classes + 1, dtype=np.float64) ** zipf
        cdf = np.cumsum(w / w.sum())
    else:
        cdf = None

    def batch(split: int, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, split, index])
        if cdf is None:
            y = rng.integers(0, n_classes, size=size)
        else:
            y = np.minimum(np.searchsorted(cdf, rng.random(size)), n_classes - 1)
        toks = class_tokens(y, q, vocab, seed)
        kept = rng.random((size, q)) < keep
        kept[np.arange(size), rng.integers(0, q, size=size)] = True
        toks = np.where(kept, toks, pad)
        extra = rng.integers(0, vocab, size=(size, noise))
        x = np.concatenate([toks, extra], axis=1)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    def train(batch_size: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n_batches = math.ceil(n_train / batch_size)
        for b in range(n_batches):
            size = min(batch_size, n_train - b * batch_size)
            yield batch(1 + epoch, b, size)

    def test(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(math.ceil(n_test / batch_size)):
            yield batch(0, b, min(batch_size, n_test - b * batch_size))

    return Task(
        name="synthetic", n_classes=n_classes, width=width,
        make_trunk=lambda: MLPTrunk(vocab + 1, embed, None, width, pad=pad),
        train_batches=train, test_batches=test, n_train=n_train, n_test=n_test,
        info={"tokens_per_class": q, "keep": keep, "noise_tokens": noise, "feature_vocabulary": vocab,
              "zipf": zipf, "top_class_probability": 1.0 / n_classes if cdf is None else float(cdf[0])},
        label_weights=None if cdf is None else np.diff(cdf, prepend=0.0),
    )


# -------------------------------------------------------------------------------------------------------- chars
CJK_FONT_PACKAGES = ("fonts-noto-cjk", "fonts-wqy-microhei", "fonts-wqy-zenhei")
# (path, face index): Noto CJK .ttc face 2 is Simplified Chinese
CJK_FONTS = (
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", 2),
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0),
)


def gb2312_characters(n: int) -> list[str]:
    """The first ``n`` GB2312 hanzi in code order (3,755 level-1 characters, then level 2; 6,763 in all)."""
    chars: list[str] = []
    for hi in range(0xB0, 0xF8):
        for lo in range(0xA1, 0xFF):
            try:
                chars.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:
                continue
            if len(chars) == n:
                return chars
    if n > len(chars):
        raise AloeError(f"GB2312 has {len(chars)} hanzi, fewer than the {n} classes asked for")
    return chars


# the Debian package that installs each font file of CJK_FONTS
CJK_FONT_PACKAGE = {
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc": "fonts-noto-cjk",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc": "fonts-noto-cjk",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc": "fonts-wqy-microhei",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc": "fonts-wqy-zenhei",
}


def available_cjk_fonts(fonts: tuple[tuple[str, int], ...] = CJK_FONTS) -> list[tuple[str, int]]:
    return [(p, i) for p, i in fonts if Path(p).is_file()]


def missing_cjk_font_packages(fonts: tuple[tuple[str, int], ...] = CJK_FONTS) -> list[str]:
    """The Debian packages (in :data:`CJK_FONT_PACKAGES` order) whose fonts among ``fonts`` are not installed; a
    font file of no known package is named by its path."""
    missing = {CJK_FONT_PACKAGE.get(p, p) for p, _ in fonts if not Path(p).is_file()}
    return [pkg for pkg in CJK_FONT_PACKAGES if pkg in missing] + sorted(missing - set(CJK_FONT_PACKAGES))


def render_glyphs(chars: list[str], font: tuple[str, int], size: int) -> torch.Tensor:
    """Grey glyphs (len(chars), size, size) in [0, 1], rendered at 2x and downsampled."""
    from PIL import Image, ImageDraw, ImageFont

    big = 2 * size
    face = ImageFont.truetype(font[0], int(big * 0.8), index=font[1])
    out = np.zeros((len(chars), size, size), dtype=np.float32)
    for n, ch in enumerate(chars):
        img = Image.new("L", (big, big), 0)
        ImageDraw.Draw(img).text((big / 2, big / 2), ch, fill=255, font=face, anchor="mm")
        out[n] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(out)


def augment(glyphs: torch.Tensor, generator: torch.Generator, *, rotate: float = 0.17, scale: float = 0.12,
            shift: float = 0.1, shear: float = 0.15, noise: float = 0.1) -> torch.Tensor:
    """Random affine (rotation, scale, shear, shift) + Gaussian pixel noise, one draw per image."""
    n = glyphs.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    a, s, h = u(-rotate, rotate), u(1 - scale, 1 + scale), u(-shear, shear)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos, -sin + h, u(-shift, shift)], 1),
                         torch.stack([sin, cos, u(-shift, shift)], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, *glyphs.shape[1:]], align_corners=False)
    out = F.grid_sample(glyphs[:, None], grid, align_corners=False, padding_mode="zeros")
    out = out + noise * torch.randn(out.shape, generator=generator)
    return out


class ConvTrunk(nn.Module):
    def __init__(self, size: int, width: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Linear(64 * (size // 4) ** 2, width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def chars_task(n_classes: int = 3755, *, size: int = 24, train_per_font: int = 8, test_per_font: int = 1,
               fonts: tuple[tuple[str, int], ...] = CJK_FONTS, width: int = TASK_WIDTH, seed: int = 0) -> Task:
    found = available_cjk_fonts(fonts)
    if not found:
        raise AloeError("the chars task needs a CJK font and none is installed (looked for "
                        f"{', '.join(p for p, _ in fonts)}); install one with 'apt-get install -y "
                        f"--no-install-recommends {' '.join(CJK_FONT_PACKAGES)}'")
    if size % 4:
        raise AloeError(f"image size must be a multiple of 4, got {size}")
    chars = gb2312_characters(n_classes)
    base = torch.cat([render_glyphs(chars, f, size) for f in found])  # (fonts * N, size, size)
    labels = torch.arange(n_classes).repeat(len(found))
    g = torch.Generator().manual_seed(seed)
    x_tr = torch.cat([augment(base, g) for _ in range(train_per_font)])
    y_tr = labels.repeat(train_per_font)
    g_test = torch.Generator().manual_seed(seed + 7919)
    x_te = torch.cat([augment(base, g_test) for _ in range(test_per_font)])
    y_te = labels.repeat(test_per_font)
    return Task(
        name="chars", n_classes=n_classes, width=width, make_trunk=lambda: ConvTrunk(size, width),
        train_batches=_array_batches(x_tr, y_tr, seed), test_batches=_ordered_batches(x_te, y_te),
        n_train=len(y_tr), n_test=len(y_te),
        info={"fonts": [f"{Path(p).name}#{i}" for p, i in found], "image_size": size,
              "train_per_font": train_per_font, "first_char": chars[0], "last_char": chars[-1]},
    )


def make_task(name: str, n_classes: int | None = None, **kwargs) -> Task:
    if name == "words":
        return words_task(n_classes or DEFAULT_CLASSES[name], **kwargs)
    if name == "pairs":
        return pairs_task(n_classes or DEFAULT_CLASSES[name], **kwargs)
    if name == "synthetic":
        return synthetic_task(n_classes or DEFAULT_CLASSES[name], **kwargs)
    if name == "chars":
        return chars_task(n_classes or DEFAULT_CLASSES[name], **kwargs)
    raise AloeError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
