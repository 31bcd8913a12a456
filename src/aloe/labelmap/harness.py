"""One harness for every method: build the output layer for a parameter budget, train, decode, measure.

``budget`` counts the output layer's parameters (weights and biases). With trunk width d, a head/code method gets
``U = budget // (d + 1)`` output units; one-hot needs ``(d + 1) N`` for a full softmax and gets a rank-r factorised
softmax ``r (d + N) + N`` below that.

Methods:
- ``lm-nt``: number-theoretic label map (pairwise-coprime moduli, chosen for the largest guaranteed separation);
- ``lm-it``: information-theoretic map with the same head sizes, balanced under the task's training label
  distribution when it is not uniform (words);
- ``onehot``: softmax over N;
- ``ecoc``: an L = U bit code (random or punctured Hadamard), BCE, loss-based decoding (Hamming also reported);
- ``mach``: R = U // B hashes into B buckets (B = the mean lm-nt head size), mean-probability decoding.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from aloe import AloeError
from aloe.labelmap import decode
from aloe.labelmap.codes import CODES
from aloe.labelmap.maps import (
    LabelMap,
    choose_moduli,
    information_theoretic_map,
    mach_map,
    map_report,
    min_units_number_theoretic,
    number_theoretic_map,
)
from aloe.labelmap.model import HeadsNet, IndependentHeadsNet, SoftmaxNet, heads_loss, n_params
from aloe.labelmap.tasks import Task

METHODS = ("lm-nt", "lm-it", "onehot", "ecoc", "mach")


def default_units(n_classes: int) -> int:
    """Output units used when no budget is given: N / 50 (one-hot's output layer / 50), at least the smallest
    number-theoretic map."""
    return max(n_classes // 50, min_units_number_theoretic(n_classes))


def check_budget(name: str, n_classes: int, width: int, budget: int | None, order: int | None = None) -> None:
    """Raise :class:`AloeError` if ``budget`` cannot hold method ``name``'s output layer (cheap; builds no map)."""
    if name not in METHODS:
        raise AloeError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if budget is not None and budget < 1:
        raise AloeError(f"budget must be positive, got {budget}")
    if name == "onehot":
        if budget is not None and budget < (width + 1) * n_classes and (budget - n_classes) // (width + n_classes) < 1:
            raise AloeError(f"budget {budget} is too small for one-hot over {n_classes} classes "
                            f"(a rank-1 softmax needs {width + 2 * n_classes} parameters)")
        return
    units = budget // (width + 1) if budget is not None else default_units(n_classes)
    if units < 2:
        raise AloeError(f"budget {budget} gives {units} output units (width {width}); too small for any map")
    if name == "ecoc":
        if units < math.ceil(math.log2(n_classes)):
            raise AloeError(f"budget {budget} gives {units} bits, too few for an ECOC code of {n_classes} classes "
                            f"(needs {math.ceil(math.log2(n_classes))})")
    else:
        choose_moduli(n_classes, units, order)


@dataclass
class Method:
    name: str
    n_classes: int
    width: int
    budget: int | None
    order: int | None = None
    code: str = "random"
    seed: int = 0
    label_weights: np.ndarray | None = None
    lmap: LabelMap | None = None
    ecoc: torch.Tensor | None = None
    rank: int | None = None
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise AloeError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        n, d = self.n_classes, self.width
        full = (d + 1) * n
        check_budget(self.name, n, d, self.budget, self.order)
        if self.name == "onehot":
            if self.budget is None or self.budget >= full:
                self.rank = None
            else:
                self.rank = (self.budget - n) // (d + n)
                self.details["rank"] = self.rank
            return
        units = self.budget // (d + 1) if self.budget is not None else default_units(n)
        if self.budget is None:
            self.details["default_units"] = units
        if self.name in ("lm-nt", "lm-it", "mach"):
            moduli = choose_moduli(n, units, self.order)
            if self.name == "lm-nt":
                self.lmap = number_theoretic_map(n, moduli)
            elif self.name == "lm-it":
                self.lmap = information_theoretic_map(n, moduli, weights=self.label_weights, seed=self.seed)
            else:
                buckets = max(2, round(sum(moduli) / len(moduli)))
                reps = units // buckets
                if reps * math.log(buckets) < math.log(n):
                    raise AloeError(f"budget too small for MACH over {n} classes")
                self.lmap = mach_map(n, buckets, reps, seed=self.seed)
        else:
            if self.code not in CODES:
                raise AloeError(f"unknown ECOC code {self.code!r}; choose one of {', '.join(CODES)}")
            self.ecoc = torch.from_numpy(CODES[self.code](n, units, seed=self.seed)).float()

    @property
    def n_outputs(self) -> int:
        if self.lmap is not None:
            return self.lmap.n_units
        if self.ecoc is not None:
            return self.ecoc.shape[1]
        return self.n_classes

    def build(self, task: Task, independent: bool = False) -> torch.nn.Module:
        if self.name == "onehot":
            if independent:
                raise AloeError("--independent applies to the head methods (lm-nt, lm-it, mach)")
            return SoftmaxNet(task.make_trunk(), task.width, self.n_classes, self.rank)
        if independent:
            if self.lmap is None:
                raise AloeError("--independent applies to the head methods (lm-nt, lm-it, mach)")
            return IndependentHeadsNet(task.make_trunk, task.width, self.lmap.sizes)
        return HeadsNet(task.make_trunk(), task.width, self.n_outputs)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.lmap is not None:
            return heads_loss(out, self._table_t[:, y].T, self.lmap.sizes)
        if self.ecoc is not None:
            return F.binary_cross_entropy_with_logits(out, self.ecoc[y], reduction="sum") / len(y)
        return F.cross_entropy(out, y)

    @property
    def _table_t(self) -> torch.Tensor:
        if not hasattr(self, "_table_cache"):
            self._table_cache = torch.from_numpy(self.lmap.table)
        return self._table_cache

    def decoders(self) -> list[str]:
        if self.name == "onehot":
            return ["softmax"]
        if self.name == "ecoc":
            return ["loss-based", "hamming"]
        if self.name == "mach":
            return ["mean-prob", "sum-logprob"]
        names = ["sum-logprob", "mean-prob"]
        return names + (["crt"] if self.name == "lm-nt" else [])

    def topk(self, out: torch.Tensor, decoder: str, k: int = 5) -> torch.Tensor:
        if decoder == "softmax":
            return decode.topk_logits(out, k)[1]
        if decoder in ("loss-based", "hamming"):
            return decode.topk_linear_code(out, self.ecoc, k, hamming=decoder == "hamming")[1]
        lps = decode.head_log_probs(out, self.lmap.sizes)
        if decoder == "sum-logprob":
            return decode.topk_sum_logprob(lps, self.lmap, k)[1]
        if decoder == "mean-prob":
            return decode.topk_mean_prob(lps, self.lmap, k)[1]
        if decoder == "crt":
            return torch.from_numpy(decode.crt_decode(lps, self.lmap))[:, None]
        raise ValueError(decoder)


def evaluate(model: torch.nn.Module, method: Method, task: Task, *, batch_size: int = 512,
             decoders: list[str] | None = None) -> dict:
    decoders = decoders or method.decoders()
    hits = {d: [0, 0] for d in decoders}
    total = 0
    model.eval()
    with torch.no_grad():
        for x, y in task.test_batches(batch_size):
            out = model(x)
            total += len(y)
            for d in decoders:
                top = method.topk(out, d, 5)
                hit = top == y[:, None]
                hits[d][0] += int(hit[:, :1].any(1).sum())
                hits[d][1] += int(hit.any(1).sum()) if top.shape[1] > 1 else 0
    model.train()
    res = {}
    for d in decoders:
        res[d] = {"top1": hits[d][0] / total}
        if d != "crt":
            res[d]["top5"] = hits[d][1] / total
    return res


def train(task: Task, method_name: str, budget: int | None = None, *, epochs: int = 1, batch_size: int = 256,
          lr: float = 2e-3, seed: int = 0, order: int | None = None, code: str = "random",
          independent: bool = False, progress: bool = False, report_map: bool = True,
          max_steps: int | None = None, step_callback=None, max_seconds: float | None = None) -> dict:
    """Train ``method_name`` on ``task`` within ``budget`` output parameters; return the measured result.
    ``max_seconds`` stops training once the training steps have taken that long (equal-time comparisons)."""
    torch.manual_seed(seed)
    method = Method(method_name, task.n_classes, task.width, budget, order=order, code=code, seed=seed,
                    label_weights=task.label_weights)
    model = method.build(task, independent)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(task.n_train / batch_size)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=f"{task.name}/{method_name}", unit="step", leave=False)
    step = 0
    seen = 0
    compute_s = 0.0
    losses = []
    t_start = time.perf_counter()
    try:
        for epoch in range(epochs):
            for x, y in task.train_batches(batch_size, epoch):
                if step >= total_steps or (max_seconds is not None and compute_s >= max_seconds):
                    break
                t0 = time.perf_counter()
                loss = method.loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                compute_s += time.perf_counter() - t0
                seen += len(y)
                step += 1
                losses.append(loss.item())
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 0:
                        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
                if step_callback is not None:
                    step_callback(step)
    finally:
        if bar is not None:
            bar.close()
    train_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    scores = evaluate(model, method, task)
    eval_s = time.perf_counter() - t0
    primary = method.decoders()[0]
    result = {
        "task": task.name,
        "method": method_name,
        "n_classes": task.n_classes,
        "budget": budget,
        "output_params": model.output_params(),
        "onehot_output_params": (task.width + 1) * task.n_classes,
        "trunk_params": n_params(model) - model.output_params(),
        "n_outputs": method.n_outputs,
        "independent": independent,
        "decoder": primary,
        "top1": scores[primary]["top1"],
        "top5": scores[primary].get("top5"),
        "decoders": scores,
        "train_examples": seen,
        "train_steps": step,
        "epochs": epochs,
        "max_seconds": max_seconds,
        "train_compute_seconds": compute_s,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "train_seconds": train_s,
        "train_examples_per_second": seen / compute_s if compute_s > 0 else None,
        "eval_seconds": eval_s,
        "test_examples": task.n_test,
        "task_info": task.info,
        **method.details,
    }
    if method.lmap is not None:
        result["head_sizes"] = list(method.lmap.sizes)
        result["map_info"] = dict(method.lmap.info)
        if report_map:
            rep = map_report(method.lmap, max_work=50_000_000)
            result["map_report"] = {k: v for k, v in rep.items() if k not in ("mutual_information", "balance")}
            result["map_report"]["min_balance"] = min(rep["balance"])
    if method.ecoc is not None:
        result["code"] = code
        result["code_bits"] = int(method.ecoc.shape[1])
    return result
