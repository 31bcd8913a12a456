"""Plain vs obfuscated, both loaded with plain transformers: perplexity, next-token agreement, greedy agreement and
the largest logit difference (obfuscated logits mapped back through tau)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe import AloeError
from aloe.obfuscation.secret import check_artifact_secret, load_secret

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "Give me three tips for a job interview.",
    "How does photosynthesis work?",
    "Translate 'good morning' into Spanish.",
    "What are the benefits of regular exercise?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
]


def corpus_token_ids(tokenizer, corpus: str = "lee", n_tokens: int = 1024, text_file: Path | None = None
                     ) -> np.ndarray:
    """The first ``n_tokens`` tokens of a corpus (documents joined by blank lines) or of a text file."""
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise AloeError(f"cannot read text file {text_file}: {exc.strerror}") from None
    else:
        from aloe.assets.corpus import load_corpus

        text = "\n\n".join(load_corpus(corpus))
    ids = np.asarray(tokenizer(text[: n_tokens * 12])["input_ids"], dtype=np.int64)
    if len(ids) < n_tokens:
        raise AloeError(f"the text has only {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return ids[:n_tokens]


def load_models(model: Path, obfuscated: Path, secret_path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    secret = load_secret(secret_path)
    check_artifact_secret(obfuscated, secret)
    tok = AutoTokenizer.from_pretrained(str(model))
    plain = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype).eval()
    obf = AutoModelForCausalLM.from_pretrained(str(obfuscated), dtype=dtype).eval()
    return tok, plain, obf, secret


@torch.no_grad()
def logit_fidelity(plain, obf, tau: np.ndarray, ids: np.ndarray, window: int = 256, progress: bool = False) -> dict:
    tau_t = torch.as_tensor(tau)
    nll_p = nll_o = 0.0
    n = agree = 0
    max_diff = 0.0
    chunks = [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]
    for chunk in tqdm(chunks, desc="perplexity", disable=not progress):
        x = torch.as_tensor(chunk)[None]
        lp = plain(x).logits[0].double()
        lo = obf(tau_t[x]).logits[0].double()[:, tau_t]       # back to plain vocabulary order
        target = x[0, 1:]
        nll_p += torch.nn.functional.cross_entropy(lp[:-1], target, reduction="sum").item()
        nll_o += torch.nn.functional.cross_entropy(lo[:-1], target, reduction="sum").item()
        agree += (lp[:-1].argmax(-1) == lo[:-1].argmax(-1)).sum().item()
        n += len(target)
        max_diff = max(max_diff, (lp - lo).abs().max().item())
    return {"tokens": n, "ppl_plain": exp_or_none(nll_p / n), "ppl_obfuscated": exp_or_none(nll_o / n),
            "ppl_ratio": exp_or_none((nll_o - nll_p) / n), "log_ppl_ratio": (nll_o - nll_p) / n,
            "top1_agreement": agree / n, "max_abs_logit_diff": max_diff}


def exp_or_none(x: float) -> float | None:
    """e ** x, or None where it is past the largest float (a model so broken that its perplexity overflows; its
    logarithm, ``log_ppl_ratio``, is still given)."""
    try:
        return math.exp(x)
    except OverflowError:
        return None


@torch.no_grad()
def greedy_fidelity(tok, plain, obf, tau: np.ndarray, prompts: list[str], max_new_tokens: int = 64,
                    progress: bool = False) -> dict:
    tau_t = torch.as_tensor(tau)
    inv = torch.empty_like(tau_t)
    inv[tau_t] = torch.arange(len(tau_t))
    same = total = exact = 0
    for prompt in tqdm(prompts, desc="greedy", disable=not progress):
        x = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
        a = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           do_sample=False)[0, x.shape[1]:]
        b = obf.generate(tau_t[x], attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=False)[0, x.shape[1]:]
        b = inv[b]
        length = max(len(a), len(b))
        k = min(len(a), len(b))
        same += (a[:k] == b[:k]).sum().item()
        total += length
        exact += int(len(a) == len(b) and bool((a == b).all()))
    return {"greedy_agreement": same / total, "greedy_exact_prompts": exact, "greedy_prompts": len(prompts),
            "greedy_tokens": total}


def measure_fidelity(model: Path, obfuscated: Path, secret: Path, *, corpus: str = "lee", text_file: Path | None = None,
                     n_tokens: int = 1024, n_prompts: int = 8, max_new_tokens: int = 64, progress: bool = True
                     ) -> dict:
    t0 = time.perf_counter()
    tok, plain, obf, sec = load_models(model, obfuscated, secret)
    ids = corpus_token_ids(tok, corpus, n_tokens, text_file)
    out = logit_fidelity(plain, obf, sec.tau, ids, progress=progress)
    if n_prompts:
        if n_prompts > len(PROMPTS):
            raise AloeError(f"at most {len(PROMPTS)} prompts are built in")
        out.update(greedy_fidelity(tok, plain, obf, sec.tau, PROMPTS[:n_prompts], max_new_tokens, progress))
    out["seconds"] = time.perf_counter() - t0
    return out
