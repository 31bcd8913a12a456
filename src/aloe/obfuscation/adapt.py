"""Adaptation: after noise strong enough to hide the vocabulary tables, the client distils the obfuscated model back
towards the plain one, so that fidelity returns while the published weights move further from the public ones.

The student is the obfuscated checkpoint itself (stock architecture, hidden size d + 2h) and the teacher is the
plain model. The loss is the KL divergence from the teacher's next-token distribution to the student's, compared in
the plain vocabulary order (the student reads ``tau[x]`` and its logits are read back through tau), on offline text
that is disjoint from the text the fidelity measure scores (see :func:`training_token_ids`).

What is trained is chosen so that the output stays a *stock* checkpoint and the noisy tables stay as noisy as the
profile made them:

- LoRA adapters (rank ``adapt_rank``) on every attention and FFN projection of every layer, merged back into the
  weights at the end (peft);
- the weights of every RMSNorm (per coordinate of the obfuscated space; still a plain RMSNorm);
- *not* the embedding or the LM head: trained tables would move back towards the key-transformed plain rows, which is
  what the table attacks read.

Every ``save_every`` steps the trainable tensors, the optimiser and the step are written atomically to a state file,
so an interrupted run resumes where it stopped. Randomness here (LoRA's initial A, the order of the training
windows) is not secret: the adapters end up in the published weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe import AloeError

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "qkv_proj", "gate_up_proj")   # the last two: fused projections (Phi-3)
STATE_FORMAT = "aloe-adapt-state-v1"


@dataclass(frozen=True)
class AdaptConfig:
    steps: int
    lr: float = 1e-3
    rank: int = 8
    seq_len: int = 128
    batch: int = 4
    warmup: int = 10
    save_every: int = 20
    train_norms: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise AloeError("adaptation needs at least one step")
        if self.rank < 1 or self.seq_len < 2 or self.batch < 1 or not self.lr > 0:
            raise AloeError("adaptation needs rank >= 1, seq_len >= 2, batch >= 1 and a positive learning rate")


def training_token_ids(tokenizer, n_tokens: int = 200_000) -> np.ndarray:
    """Offline training text for the distillation, disjoint from what :mod:`aloe.obfuscation.fidelity` scores (the
    first 1,024 tokens of the Lee background corpus): Lee background from its 41st document on, the Lee test
    documents, then Shakespeare and the KJV, interleaved document by document up to ``n_tokens``."""
    from aloe.assets.corpus import load_corpus

    sources = [load_corpus("lee")[40:], load_corpus("lee-test")]
    for name in ("shakespeare", "kjv"):
        try:
            docs = load_corpus(name)
        except AloeError:
            continue  # shared/data absent: the gensim corpora alone still give ~60k tokens
        sources.append([d[i:i + 4000] for d in docs for i in range(0, min(len(d), 40_000), 4000)])
    out: list[int] = []
    for k in range(max(len(s) for s in sources)):
        for s in sources:
            if k < len(s):
                out += tokenizer(s[k])["input_ids"]
        if len(out) >= n_tokens:
            break
    return np.asarray(out[:n_tokens], dtype=np.int64)


def _windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(ids) // seq_len
    if n < 1:
        raise AloeError(f"the training text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def _lr_at(step: int, cfg: AdaptConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, the student's logits read back into the plain vocabulary order."""
    log_p = torch.log_softmax(teacher_logits.float(), -1).flatten(0, -2)
    log_q = torch.log_softmax(student_logits[..., tau].float(), -1).flatten(0, -2)
    return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def _state_key(cfg: AdaptConfig, base_manifest: dict) -> str:
    body = json.dumps([asdict(cfg), base_manifest.get("secret_fingerprint"), base_manifest.get("source")],
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _save_state(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def adapt_model(plain_dir: Path, base_dir: Path, tau: np.ndarray, cfg: AdaptConfig, state_path: Path, *,
                token_ids: np.ndarray | None = None, progress: bool = True):
    """Distil the obfuscated checkpoint in ``base_dir`` from the plain model; returns ``(merged model, stats)``.

    ``state_path`` holds the resumable state; a state made for another configuration or artifact is refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_manifest = json.loads((Path(base_dir) / "aloe.json").read_text())
    key = _state_key(cfg, base_manifest)
    teacher = AutoModelForCausalLM.from_pretrained(str(plain_dir), dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    present = sorted({n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)}
                     & set(TARGET_MODULES))
    if not present:
        raise AloeError("the model has none of the projections LoRA adapts")
    model = get_peft_model(student, LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=0.0,
                                               target_modules=present, bias="none"))
    for name, p in model.named_parameters():
        if cfg.train_norms and "norm" in name and "lora_" not in name:
            p.requires_grad_(True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any("embed_tokens" in n or "lm_head" in n for n in trainable):
        raise AloeError("internal: the vocabulary tables must stay frozen during adaptation")
    opt = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=0.0)

    if token_ids is None:
        token_ids = training_token_ids(AutoTokenizer.from_pretrained(str(plain_dir)))
    windows = _windows(np.asarray(token_ids, dtype=np.int64), cfg.seq_len)
    tau_t = torch.as_tensor(np.asarray(tau, dtype=np.int64))

    start, losses, data_seed = 0, [], secrets.randbits(63)
    state_path = Path(state_path)
    if state_path.is_file():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise AloeError(f"adaptation state {state_path} is unreadable: {exc}") from None
        if state.get("format") != STATE_FORMAT or state.get("key") != key:
            raise AloeError(f"adaptation state {state_path} was made for another artifact or configuration; "
                            "remove it to start again")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                trainable[n].copy_(t)
        opt.load_state_dict(state["optimizer"])
        start, losses, data_seed = int(state["step"]), list(state["losses"]), int(state["data_seed"])

    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="adapt", unit="step", disable=not progress)
    for step in range(start, cfg.steps):
        rows = np.random.default_rng([data_seed, step]).choice(len(windows), size=min(cfg.batch, len(windows)),
                                                               replace=False)
        x = torch.as_tensor(windows[rows])
        with torch.no_grad():
            t_logits = teacher(x).logits
        loss = distillation_loss(t_logits, model(input_ids=tau_t[x]).logits, tau_t)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save_state(state_path, {"format": STATE_FORMAT, "key": key, "step": step + 1, "losses": losses,
                                     "data_seed": data_seed, "optimizer": opt.state_dict(),
                                     "trainable": {n: p.detach().clone() for n, p in trainable.items()}})
    bar.close()
    merged = model.merge_and_unload().eval()
    head = max(1, min(10, len(losses) // 10))
    stats = {"steps": cfg.steps, "resumed_from": start, "lr": cfg.lr, "rank": cfg.rank, "seq_len": cfg.seq_len,
             "batch": cfg.batch, "train_tokens": int(windows.size), "trained": "LoRA on " + ", ".join(present)
             + (" + RMSNorm weights" if cfg.train_norms else ""),
             "kl_first": float(np.mean(losses[:head])) if losses else None,
             "kl_last": float(np.mean(losses[-head:])) if losses else None,
             "seconds_this_run": time.perf_counter() - t0}
    return merged, stats
