"""Training (full softmax cross-entropy over all items, or GRU4Rec's sampled BPR-max / TOP1-max) and full-ranking
evaluation.

Prefix augmentation is computed in one pass: a sequence s goes through the GRU once and the query at position i-1
scores the target s[i], so a batch of sequences holds exactly the examples (s[:i], s[i]) of the protocol. Long training
sequences are cut into windows of ``max_len`` items overlapping by one (each target appears once); evaluation always
reads the whole prefix. Scores come from the model's ``scores(queries, features)`` (one inner product per item, or the
maximum over ComiRec's interests), so the losses and the ranking only see a (rows x items) score matrix.

The sampled losses follow Hidasi & Karatzoglou 2018 (GRU4Rec): the negatives of a batch are its distinct targets (in
batch) plus ``negatives`` items drawn with replacement with probability proportional to ``count ** sample_alpha``, one
draw shared by the whole batch. A negative equal to the row's target is skipped. With ``r_i`` the target's score and
``s_j`` the softmax of the negatives' scores ``r_j``:

- BPR-max: ``-log sum_j s_j sigmoid(r_i - r_j) + bpreg * sum_j s_j r_j^2``;
- TOP1-max: ``sum_j s_j (sigmoid(r_j - r_i) + sigmoid(r_j^2))``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from aloe import AloeError
from aloe.recsys.data import SessionData
from aloe.recsys.metrics import mrr_at, recall_at, target_ranks
from aloe.recsys.models import DEFAULT_INTERESTS, PopularityModel


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_len: int = 100
    seed: int = 0
    loss: str = "ce"  # ce (full softmax) | bpr-max | top1-max (sampled, GRU4Rec)
    negatives: int = 0  # popularity-sampled negatives per batch, beside the in-batch ones (sampled losses only)
    sample_alpha: float = 0.5  # negatives are drawn with probability proportional to count ** sample_alpha
    bpreg: float = 1.0  # BPR-max score regularisation

    def check(self) -> None:
        """One-line errors for option values that make no sense."""
        if self.loss not in LOSSES:
            raise AloeError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.negatives < 0:
            raise AloeError(f"--negatives must be at least 0, got {self.negatives}")
        if self.loss == "ce" and self.negatives:
            raise AloeError("--negatives applies to the sampled losses (bpr-max, top1-max); ce uses the full softmax")
        if not 0.0 <= self.sample_alpha <= 1.0:
            raise AloeError(f"--sample-alpha must be in [0, 1], got {self.sample_alpha}")
        if not self.bpreg >= 0.0:
            raise AloeError(f"--bpreg must be at least 0, got {self.bpreg}")


LOSSES = ("ce", "bpr-max", "top1-max")
DEFAULT_NEGATIVES = 2048  # GRU4Rec's n_sample, used by the sampled losses when no count is given


def _windows(seqs: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for s in seqs:
        if len(s) <= max_len:
            out.append(s)
        else:
            step = max_len - 1
            out.extend(s[i:i + max_len] for i in range(0, len(s) - 1, step) if len(s[i:i + max_len]) >= 2)
    return out


def _pad(seqs: list[np.ndarray], pad: int) -> torch.Tensor:
    t = max(len(s) for s in seqs)
    out = np.full((len(seqs), t), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return torch.from_numpy(out)


def _length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar length (less padding), in random order; ties in length broken at random."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def negative_probs(counts: np.ndarray, alpha: float) -> np.ndarray:
    """Sampling distribution of the extra negatives: ``count ** alpha`` normalised (0: uniform, 1: popularity)."""
    w = np.power(np.asarray(counts, dtype=np.float64), alpha)
    return w / w.sum()


def batch_columns(targets: torch.Tensor, probs: np.ndarray | None, n: int,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The items a batch scores: its distinct targets, then ``n`` items drawn with replacement from ``probs``; and
    each target's column among the distinct targets."""
    uniq, where = torch.unique(targets, return_inverse=True)
    if n and probs is not None:
        uniq = torch.cat([uniq, torch.from_numpy(rng.choice(len(probs), size=n, p=probs))])
    return uniq, where


def sampled_loss(scores: torch.Tensor, columns: torch.Tensor, targets: torch.Tensor, where: torch.Tensor, kind: str,
                 bpreg: float = 1.0) -> torch.Tensor:
    """BPR-max or TOP1-max over the (N, C) scores of the batch ``columns``; ``where`` is each row's target column.
    Columns holding the row's own target are not negatives; rows without any negative are left out."""
    neg = columns[None, :] != targets[:, None]
    keep = neg.any(dim=1)
    scores, neg, where = scores[keep], neg[keep], where[keep]
    if not len(scores):
        return scores.sum()
    r_i = scores.gather(1, where[:, None])
    s = torch.softmax(scores.masked_fill(~neg, float("-inf")), dim=1)
    if kind == "bpr-max":
        hit = (s * torch.sigmoid(r_i - scores)).sum(dim=1)
        loss = -torch.log(hit + 1e-24) + bpreg * (s * scores**2).sum(dim=1)
    elif kind == "top1-max":
        loss = (s * (torch.sigmoid(scores - r_i) + torch.sigmoid(scores**2))).sum(dim=1)
    else:
        raise AloeError(f"unknown sampled loss {kind!r}; choose bpr-max or top1-max")
    return loss.mean()


def train_model(model: nn.Module, data: SessionData, cfg: TrainConfig, *, progress: bool = False,
                epoch_callback: Callable[[int], None] | None = None) -> dict:
    """Train in place; returns loss history and seconds. The popularity model has nothing to train.
    ``epoch_callback(e)`` runs after epoch ``e`` (1-based; its time is not counted in the training seconds)."""
    cfg.check()
    if isinstance(model, PopularityModel):
        return {"losses": [], "seconds": 0.0}
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    neg_rng = np.random.default_rng([cfg.seed, 1])  # its own stream: the batch order does not depend on the loss
    probs = negative_probs(data.item_counts(), cfg.sample_alpha) if cfg.negatives else None
    seqs = _windows(data.train_sequences(), cfg.max_len)
    lengths = np.array([len(s) for s in seqs])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_steps = cfg.epochs * int(np.ceil(len(seqs) / cfg.batch_size))
    bar = tqdm(total=n_steps, disable=not progress, desc=f"train {model.config.kind}", unit="batch", leave=False)
    losses: list[float] = []
    t0 = time.perf_counter()
    callback_s = 0.0
    model.train()
    for epoch in range(cfg.epochs):
        total, count = 0.0, 0
        for idx in _length_batches(lengths, cfg.batch_size, rng):
            batch = _pad([seqs[i] for i in idx], data.n_items)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            mask = targets != data.n_items
            q, t = model.queries(inputs)[mask], targets[mask]
            if cfg.loss == "ce":
                loss = F.cross_entropy(model.scores(q, model.item_features()), t)
            else:
                cols, where = batch_columns(t, probs, cfg.negatives, neg_rng)
                loss = sampled_loss(model.scores(q, model.item_features()[cols]), cols, t, where, cfg.loss,
                                    cfg.bpreg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(mask.sum())
            count += int(mask.sum())
            bar.update(1)
        losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if epoch_callback is not None:
            t_cb = time.perf_counter()
            epoch_callback(epoch + 1)
            model.train()
            callback_s += time.perf_counter() - t_cb
    bar.close()
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0 - callback_s}


@torch.no_grad()
def test_queries(model: nn.Module, data: SessionData, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The query of every test prefix example (shape (N, *query_shape)) and its target, in
    :meth:`SessionData.prefix_examples` order."""
    model.eval()
    seqs, firsts = data.test_sequences(), data.test_first
    qs, ts = [], []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        batch = _pad(chunk, data.n_items)
        q = model.queries(batch[:, :-1])
        for j, (s, first) in enumerate(zip(chunk, firsts[start:start + batch_size])):
            qs.append(q[j, first - 1:len(s) - 1])
            ts.append(torch.from_numpy(s[first:]))
    return torch.cat(qs), torch.cat(ts)


@torch.no_grad()
def evaluate(model: nn.Module, data: SessionData, k: int = 20, chunk: int = 2048) -> dict:
    """Full ranking over all items for every test prefix: Recall@k, MRR@k and the ranks themselves."""
    queries, targets = test_queries(model, data)
    feats = model.item_features()
    ranks = torch.cat([target_ranks(model.scores(queries[i:i + chunk], feats), targets[i:i + chunk])
                       for i in range(0, len(targets), chunk)]).numpy()
    return {f"recall@{k}": recall_at(ranks, k), f"mrr@{k}": mrr_at(ranks, k), "n_test": int(len(ranks)),
            "ranks": ranks}


def model_dir(cache, data: str, kind: str, augment: bool, seed: int, loss: str = "ce",
              interests: int = DEFAULT_INTERESTS):
    from aloe.assets.cache import cache_root

    tag = (f"{data}-{kind}{'-aug' if kind == 'matrix' and augment else ''}"
           f"{f'-k{interests}' if kind == 'comirec' else ''}"
           f"{'' if loss == 'ce' or kind == 'pop' else '-' + loss}-seed{seed}")
    return (cache or cache_root()) / "recsys" / "models" / tag


def fit_and_evaluate(data_name: str, kind: str, *, augment: bool = False, seed: int = 0, epochs: int = 10,
                     batch_size: int = 64, lr: float = 3e-3, matrix_dim: int = 16, hidden: int = 100,
                     embed_dim: int = 64, k: int = 20, cache=None, save: bool = True, progress: bool = False,
                     loss: str = "ce", negatives: int = 0, sample_alpha: float = 0.5, bpreg: float = 1.0,
                     interests: int = DEFAULT_INTERESTS) -> dict:
    """Load the dataset, build and train ``kind`` (pop|vector|matrix|comirec, the last with ``interests`` = K) with
    ``loss`` (see :class:`TrainConfig`), evaluate it by full ranking; with ``save`` the weights and the result are
    published atomically under ``<cache>/recsys/models/``."""
    import json

    from aloe.assets.cache import atomic_directory, atomic_write_json
    from aloe.recsys.data import load_dataset
    from aloe.recsys.models import build_model, check_interests, count_params

    if kind == "comirec":
        check_interests(interests)
    train_cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, loss=loss, negatives=negatives,
                            sample_alpha=sample_alpha, bpreg=bpreg)
    train_cfg.check()
    data = load_dataset(data_name, cache=cache)
    torch.manual_seed(seed)
    model = build_model(kind, data.n_items, counts=data.item_counts(), embed_dim=embed_dim, hidden=hidden,
                        matrix_dim=matrix_dim, augment=augment, interests=interests)
    fit = train_model(model, data, train_cfg, progress=progress)
    ev = evaluate(model, data, k=k)
    result = {
        "data": data_name, "model": kind, "augment": bool(kind == "matrix" and augment), "seed": seed,
        "loss": loss if kind != "pop" else None, "negatives": negatives if kind != "pop" else 0,
        f"recall@{k}": ev[f"recall@{k}"], f"mrr@{k}": ev[f"mrr@{k}"], "n_test": ev["n_test"],
        "params": count_params(model), "config": model.config.as_dict(), "epochs": epochs if kind != "pop" else 0,
        "train_seconds": fit["seconds"], "losses": fit["losses"], "dataset": data.stats,
    }
    if save:
        with atomic_directory(model_dir(cache, data_name, kind, augment, seed, loss, interests),
                              overwrite=True) as tmp:
            torch.save(model.state_dict(), tmp / "model.pt")
            atomic_write_json(tmp / "result.json", json.loads(json.dumps(result)))
    result["model_obj"], result["data_obj"], result["ranks"] = model, data, ev["ranks"]
    return result


TUNE_LRS = (1e-3, 3e-3, 1e-2)
TUNE_SEED = 1000  # the tuning runs' model seed: none of the evaluation seeds (0, 1, ...)


def tune(data_name: str, kind: str, *, augment: bool = False, lrs: tuple[float, ...] = TUNE_LRS,
         max_epochs: int = 10, fraction: float = 0.1, max_validation: int | None = 5000, seed: int = TUNE_SEED,
         batch_size: int = 64, matrix_dim: int = 16, hidden: int = 100, embed_dim: int = 64, k: int = 20,
         cache=None, loss: str = "ce", negatives: int = 0, sample_alpha: float = 0.5, bpreg: float = 1.0,
         interests: int = DEFAULT_INTERESTS, progress: bool = False, data: SessionData | None = None) -> dict:
    """Grid search of the learning rate and the number of epochs on a held-out split of the training sequences
    (:meth:`SessionData.holdout`, so the test split is never seen): one model per learning rate, built and trained
    with seed ``seed`` for ``max_epochs`` epochs and scored by Recall@k on the held-out sequences after every epoch.
    The budget is ``len(lrs) * max_epochs`` training epochs whatever the model. The best point has the highest
    Recall@k; ties go to fewer epochs, then to the earlier learning rate."""
    from aloe.recsys.data import load_dataset
    from aloe.recsys.models import build_model, check_interests

    if kind == "pop":
        raise AloeError("the popularity model has no hyper-parameters to tune")
    if kind == "comirec":
        check_interests(interests)
    if not lrs or any(not lr > 0 for lr in lrs):
        raise AloeError(f"the learning rates to try must be positive, got {list(lrs)}")
    if max_epochs < 1:
        raise AloeError(f"the tuning needs at least 1 epoch, got {max_epochs}")
    full = data if data is not None else load_dataset(data_name, cache=cache)
    split = full.holdout(fraction, seed=0, max_sequences=max_validation)
    curves: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for lr in lrs:
        cfg = TrainConfig(epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed, loss=loss, negatives=negatives,
                          sample_alpha=sample_alpha, bpreg=bpreg)
        cfg.check()
        torch.manual_seed(seed)
        model = build_model(kind, split.n_items, counts=split.item_counts(), embed_dim=embed_dim, hidden=hidden,
                            matrix_dim=matrix_dim, augment=augment, interests=interests)
        curve: list[float] = []
        train_model(model, split, cfg, progress=progress,
                    epoch_callback=lambda _e, m=model, c=curve: c.append(evaluate(m, split, k=k)[f"recall@{k}"]))
        curves[repr(lr)] = curve
    scored = [(curves[repr(lr)][e], -e, -i, lr, e + 1) for i, lr in enumerate(lrs) for e in range(max_epochs)]
    best = max(scored)
    return {"data": data_name, "model": kind, "augment": bool(kind == "matrix" and augment), "loss": loss,
            "lrs": list(lrs), "max_epochs": max_epochs, "seed": seed, "budget_epochs": len(lrs) * max_epochs,
            "validation": split.stats, "curves": curves, "seconds": time.perf_counter() - t0,
            "best": {"lr": best[3], "epochs": best[4], f"recall@{k}": best[0]}}


def load_trained(data_name: str, kind: str, *, augment: bool = False, seed: int = 0, cache=None,
                 interests: int = DEFAULT_INTERESTS):
    """A model saved by :func:`fit_and_evaluate` and its dataset."""
    import json

    from aloe import AloeError
    from aloe.recsys.data import load_dataset
    from aloe.recsys.models import ModelConfig, model_from_config

    folder = model_dir(cache, data_name, kind, augment, seed, interests=interests)
    if not (folder / "result.json").is_file():
        raise AloeError(f"no trained {kind} model for {data_name} (seed {seed}) in {folder}; run "
                        f"'aloe recsys train --data {data_name} --model {kind}"
                        f"{' --augment' if augment else ''}"
                        f"{f' --interests {interests}' if kind == 'comirec' else ''} --seed {seed}' first")
    data = load_dataset(data_name, cache=cache)
    cfg = ModelConfig(**json.loads((folder / "result.json").read_text())["config"])
    model = model_from_config(cfg, data.item_counts())
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), data
