"""Victim-side runner: builds what the server would receive (obfuscated prompts, a prompt stream), runs the chosen
attacks on it with only the attacker's view (:class:`aloe.attacks.common.Target`), and scores every guess with the
secret. The attacks never see tau; this module holds it only to play the client and to score."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from aloe import AloeError
from aloe.attacks.common import Target
from aloe.attacks.scoring import score_ids, score_sequences

ATTACKS = ("vma", "ia", "nn", "isa", "ima", "tfma", "sda", "behavioural", "anchored", "learned", "decoded",
           "sda-decoded", "key-regression", "weight-key", "post-norm")


@dataclass
class Texts:
    """Plain token ids for every role (the victim's and the attacker's texts are disjoint)."""

    prompts: list[np.ndarray]       # real prompts the victim sends (scored)
    public: np.ndarray              # attacker's public training text (IMA)
    known: np.ndarray               # victim text whose plaintext the attacker knows (IMA, known-plaintext variant)
    stream: np.ndarray              # the victim's stream of prompts observed over time (TFMA, SDA)
    prior: np.ndarray               # attacker's prior corpus, same distribution as the stream (TFMA, SDA)
    prior_cross: np.ndarray | None  # attacker's prior corpus from another distribution
    source: str = ""


def doc_tokens(tok, docs: list[str], n: int) -> np.ndarray:
    """The token ids of ``docs`` tokenized one by one and concatenated, the first ``n``."""
    out: list[int] = []
    for doc in docs:
        out += tok(doc)["input_ids"]
        if len(out) >= n:
            break
    return np.asarray(out[:n], dtype=np.int64)


def real_prompts(tok) -> list[np.ndarray]:
    """The victim's scored prompts: the 8 built-in chat prompts and the first 48 tokens of 8 Lee test documents."""
    from aloe.assets.corpus import load_corpus
    from aloe.obfuscation.fidelity import PROMPTS

    prompts = [np.asarray(tok(p)["input_ids"], dtype=np.int64) for p in PROMPTS]
    return prompts + [np.asarray(tok(d)["input_ids"][:48], dtype=np.int64) for d in load_corpus("lee-test")[:8]]


def corpus_texts(model_dir: Path, budget) -> Texts:
    """Real text: the built-in chat prompts and Lee test documents as prompts; Lee background as the victim's stream
    (first half) and same-distribution prior (second half); KJV as the other-distribution prior and the IMA
    training text; Shakespeare as the known plaintext."""
    from transformers import AutoTokenizer

    from aloe.assets.corpus import load_corpus

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = real_prompts(tok)
    lee = doc_tokens(tok, load_corpus("lee"), 2 * budget.tfma_tokens)
    half = len(lee) // 2
    kjv = doc_tokens(tok, load_corpus("kjv"), max(budget.ima_tokens, budget.tfma_tokens))
    shakespeare = doc_tokens(tok, [d[:200_000] for d in load_corpus("shakespeare")[:2]], 4096)
    return Texts(prompts, kjv[:budget.ima_tokens], shakespeare, lee[:half], lee[half:], kjv,
                 "prompts: 8 chat prompts + 8 Lee test documents (48 tokens); stream: Lee background (1st half); "
                 "prior: Lee background (2nd half); cross prior + IMA training: KJV; known plaintext: Shakespeare")


def synthetic_texts(vocab: int, fixed: np.ndarray, budget, seed: int = 0) -> Texts:
    """Zipf-distributed ids over a fixed (public, non-secret) popularity order, for tiny models without a tokenizer."""
    rng = np.random.default_rng(seed)
    movable = np.setdiff1d(np.arange(vocab), fixed)
    order = rng.permutation(movable)
    p = 1.0 / np.arange(1, len(order) + 1) ** 1.1
    p /= p.sum()

    def draw(n):
        return order[rng.choice(len(order), size=n, p=p)]

    prompts = [draw(budget.seq_len) for _ in range(4)]
    return Texts(prompts, draw(budget.ima_tokens), draw(512), draw(budget.tfma_tokens), draw(budget.tfma_tokens),
                 None, "synthetic Zipf ids")


def texts_for(target: Target) -> Texts:
    """Real corpora when the model has a tokenizer, else synthetic Zipf ids (tiny test models)."""
    d = target.plain_dir
    if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
        return corpus_texts(d, target.budget)
    return synthetic_texts(target.arch.vocab, target.fixed_ids, target.budget)


def _sda_guess(target: Target, texts: Texts, tau: np.ndarray, corpus: np.ndarray, label: str, progress):
    """SDA reads only the traffic (the stream and the prompts, in obfuscated ids) and trains on ``corpus``."""
    from aloe.attacks import sda

    b = target.budget
    return sda.attack([tau[texts.stream], *(tau[p] for p in texts.prompts)], corpus, target.arch.vocab,
                      target.fixed_ids, b.sda_ranks, b.sda_steps, b.topk, b.rng(label), progress)


def _id_guess(name: str, target: Target, received: np.ndarray, texts: Texts, tau: np.ndarray, progress):
    """A per-id attack's guess: SDA's from the traffic and the prior corpus, the others' from the artifact."""
    if name == "sda":
        return _sda_guess(target, texts, tau, texts.prior, "sda", progress)
    from importlib import import_module

    return import_module(f"aloe.attacks.{name.replace('-', '_')}").attack(target, received, progress)


def run(target: Target, names: list[str], tau: np.ndarray, texts: Texts, progress: bool = True) -> dict:
    bad = [n for n in names if n not in ATTACKS]
    if bad:
        raise AloeError(f"unknown attack(s) {', '.join(bad)}; choose from {', '.join(ATTACKS)} or all")
    if len(tau) != target.arch.vocab:
        raise AloeError("the secret's tau does not match the model's vocabulary")
    b = target.budget
    if {"decoded", "sda-decoded"} & set(names):
        from aloe.attacks import decoding

        decoding.check_budget(b)
    if "key-regression" in names:
        from aloe.attacks.key_regression import STARTS

        if b.keyreg_start not in STARTS:
            raise AloeError(f"the key regression starts from one of {', '.join(STARTS)}, not {b.keyreg_start!r}")
    fixed = target.fixed_ids
    received = np.unique(tau[np.concatenate(texts.prompts)]) if texts.prompts else np.zeros(0, np.int64)
    obf_prompts = [tau[p] for p in texts.prompts]
    rng = b.rng("victim")
    vocab_plain = [rng.choice(target.movable_ids, size=b.seq_len) for _ in range(b.sequences)]
    vocab_obf = [tau[s] for s in vocab_plain]
    results: dict[str, dict] = {}
    guesses: dict = {}  # per-id guesses, reused by the decoders in the same run
    for name in names:
        t0 = time.perf_counter()
        bar = tqdm(desc=name, disable=not progress, leave=False, unit="step")
        pr = bar if progress else None
        if name in ("vma", "ia", "nn", "behavioural", "anchored", "learned", "sda", "weight-key", "post-norm"):
            guesses[name] = _id_guess(name, target, received, texts, tau, pr)
            res = score_ids(guesses[name], tau, texts.prompts, fixed)
            if name == "sda":
                res["prior"] = "same distribution"
                if texts.prior_cross is not None:  # the translator trained on text of another kind instead
                    cross = _sda_guess(target, texts, tau, texts.prior_cross, "sda-cross", pr)
                    res["cross_prior"] = {k: v for k, v in score_ids(cross, tau, texts.prompts, fixed).items()
                                          if "recovery" in k}
        elif name in ("decoded", "sda-decoded"):  # a per-id attack's candidates, decoded as text over the traffic
            from aloe.attacks import decoding

            base = "learned" if name == "decoded" else "sda"
            if base not in guesses:
                guesses[base] = _id_guess(base, target, received, texts, tau, pr)
            dec = decoding.attack(target, guesses[base], obf_prompts, tau[texts.stream], pr)
            res = score_ids(dec, tau, texts.prompts, fixed)
            plain_of = np.empty_like(tau)
            plain_of[tau] = np.arange(len(tau))
            # measured with the secret, after the attack: where the decoder's objective puts the victim's reading
            res["readings"] = decoding.reading_logprobs(target, guesses[base], dec, obf_prompts, tau[texts.stream],
                                                        plain_of, dec.extra.get("rank_prior"), b.decode_from_victim,
                                                        b.rng("from-victim"), b.decode_completion, pr)
            res.pop("rank_prior", None)
            per_id = score_ids(guesses[base], tau, texts.prompts, fixed)  # the base attack's own figures, same run
            res["per_id_token_recovery"] = per_id["token_recovery"]
            res["per_id_prompt_token_recovery"] = per_id["prompt_token_recovery"]
        elif name == "key-regression":  # a per-id attack's reading (the learned matcher's), then the key fitted on it
            from aloe.attacks import key_regression

            base = b.keyreg_start
            if base not in guesses:
                guesses[base] = _id_guess(base, target, received, texts, tau, pr)
            res = score_ids(key_regression.attack(target, guesses[base], pr), tau, texts.prompts, fixed)
            per_id = score_ids(guesses[base], tau, texts.prompts, fixed)  # its start, same run
            res["start_attack"] = base
            res["per_id_token_recovery"] = per_id["token_recovery"]
            res["per_id_prompt_token_recovery"] = per_id["prompt_token_recovery"]
        elif name == "tfma":
            from aloe.attacks import tfma

            res = score_ids(tfma.attack(tau[texts.stream], texts.prior, target.arch.vocab, fixed, b.topk), tau,
                            texts.prompts, fixed)
            res["prior"] = "same distribution"
            if texts.prior_cross is not None:
                cross = score_ids(tfma.attack(tau[texts.stream], texts.prior_cross, target.arch.vocab, fixed, b.topk),
                                  tau, texts.prompts, fixed)
                res["cross_prior"] = {k: v for k, v in cross.items() if "recovery" in k}
        elif name == "isa":
            from aloe.attacks import isa

            res = score_sequences(isa.attack(target, vocab_obf, obf_prompts, pr), vocab_plain, texts.prompts, fixed)
        else:  # ima
            from aloe.attacks import ima

            T = b.seq_len
            known_plain = [texts.known[i:i + T] for i in range(0, len(texts.known) - T + 1, T)]
            out = ima.attack(target, texts.public, vocab_obf, obf_prompts,
                             ([tau[s] for s in known_plain], known_plain), pr)
            res = score_sequences(out["ima"], vocab_plain, texts.prompts, fixed)
            res["known_plaintext"] = score_sequences(out["ima_known_plaintext"], vocab_plain, texts.prompts, fixed)
        bar.close()
        res["seconds"] = time.perf_counter() - t0
        res["texts"] = texts.source
        results[name] = res
    return results
