"""Training (full softmax cross-entropy over all items) and full-ranking evaluation.

Prefix augmentation is computed in one pass: a sequence s goes through the GRU once and the query at position i-1
scores the target s[i], so a batch of sequences holds exactly the examples (s[:i], s[i]) of the protocol. Long training
sequences are cut into windows of ``max_len`` items overlapping by one (each target appears once); evaluation always
reads the whole prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from aloe.recsys.data import SessionData
from aloe.recsys.metrics import mrr_at, recall_at, target_ranks
from aloe.recsys.models import PopularityModel


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_len: int = 100
    seed: int = 0


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


def train_model(model: nn.Module, data: SessionData, cfg: TrainConfig, *, progress: bool = False) -> dict:
    """Train in place; returns loss history and seconds. The popularity model has nothing to train."""
    if isinstance(model, PopularityModel):
        return {"losses": [], "seconds": 0.0}
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    seqs = _windows(data.train_sequences(), cfg.max_len)
    lengths = np.array([len(s) for s in seqs])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_steps = cfg.epochs * int(np.ceil(len(seqs) / cfg.batch_size))
    bar = tqdm(total=n_steps, disable=not progress, desc=f"train {model.config.kind}", unit="batch", leave=False)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        total, count = 0.0, 0
        for idx in _length_batches(lengths, cfg.batch_size, rng):
            batch = _pad([seqs[i] for i in idx], data.n_items)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            mask = targets != data.n_items
            q = model.queries(inputs)[mask]
            logits = q @ model.item_features().T
            loss = F.cross_entropy(logits, targets[mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(mask.sum())
            count += int(mask.sum())
            bar.update(1)
        losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def test_queries(model: nn.Module, data: SessionData, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The query of every test prefix example and its target, in :meth:`SessionData.prefix_examples` order."""
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
    ranks = torch.cat([target_ranks(queries[i:i + chunk] @ feats.T, targets[i:i + chunk])
                       for i in range(0, len(targets), chunk)]).numpy()
    return {f"recall@{k}": recall_at(ranks, k), f"mrr@{k}": mrr_at(ranks, k), "n_test": int(len(ranks)),
            "ranks": ranks}


def model_dir(cache, data: str, kind: str, augment: bool, seed: int):
    from aloe.assets.cache import cache_root

    tag = f"{data}-{kind}{'-aug' if kind == 'matrix' and augment else ''}-seed{seed}"
    return (cache or cache_root()) / "recsys" / "models" / tag


def fit_and_evaluate(data_name: str, kind: str, *, augment: bool = False, seed: int = 0, epochs: int = 10,
                     batch_size: int = 64, lr: float = 3e-3, matrix_dim: int = 16, hidden: int = 100,
                     embed_dim: int = 64, k: int = 20, cache=None, save: bool = True,
                     progress: bool = False) -> dict:
    """Load the dataset, build and train ``kind`` (pop|vector|matrix), evaluate it by full ranking; with ``save``
    the weights and the result are published atomically under ``<cache>/recsys/models/``."""
    import json

    from aloe.assets.cache import atomic_directory, atomic_write_json
    from aloe.recsys.data import load_dataset
    from aloe.recsys.models import build_model, count_params

    data = load_dataset(data_name, cache=cache)
    torch.manual_seed(seed)
    model = build_model(kind, data.n_items, counts=data.item_counts(), embed_dim=embed_dim, hidden=hidden,
                        matrix_dim=matrix_dim, augment=augment)
    fit = train_model(model, data, TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed),
                      progress=progress)
    ev = evaluate(model, data, k=k)
    result = {
        "data": data_name, "model": kind, "augment": bool(kind == "matrix" and augment), "seed": seed,
        f"recall@{k}": ev[f"recall@{k}"], f"mrr@{k}": ev[f"mrr@{k}"], "n_test": ev["n_test"],
        "params": count_params(model), "config": model.config.as_dict(), "epochs": epochs if kind != "pop" else 0,
        "train_seconds": fit["seconds"], "losses": fit["losses"], "dataset": data.stats,
    }
    if save:
        with atomic_directory(model_dir(cache, data_name, kind, augment, seed), overwrite=True) as tmp:
            torch.save(model.state_dict(), tmp / "model.pt")
            atomic_write_json(tmp / "result.json", json.loads(json.dumps(result)))
    result["model_obj"], result["data_obj"], result["ranks"] = model, data, ev["ranks"]
    return result


def load_trained(data_name: str, kind: str, *, augment: bool = False, seed: int = 0, cache=None):
    """A model saved by :func:`fit_and_evaluate` and its dataset."""
    import json

    from aloe import AloeError
    from aloe.recsys.data import load_dataset
    from aloe.recsys.models import ModelConfig, PopularityModel, SessionModel

    folder = model_dir(cache, data_name, kind, augment, seed)
    if not (folder / "result.json").is_file():
        raise AloeError(f"no trained {kind} model for {data_name} (seed {seed}) in {folder}; run "
                        f"'aloe recsys train --data {data_name} --model {kind}"
                        f"{' --augment' if augment else ''} --seed {seed}' first")
    data = load_dataset(data_name, cache=cache)
    cfg = ModelConfig(**json.loads((folder / "result.json").read_text())["config"])
    model = PopularityModel(data.item_counts()) if cfg.kind == "pop" else SessionModel(cfg)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), data
