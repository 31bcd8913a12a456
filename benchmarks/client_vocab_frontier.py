"""The client-held vocabulary with fresh per-occurrence noise, measured on SmolLM2-135M-Instruct: what the noise costs
(fidelity) against what each vector the server receives still gives away (occurrence attacks).

The deployment: the exact `balanced` artifact split with `--client-vocab`; the server holds the transformer body
only, the client adds fresh row-shaped noise of level alpha to every embedding it sends and applies the head itself.
For each alpha:

- fidelity (the same measures as `aloe fidelity`): perplexity ratio and top-1 agreement on the Lee corpus
  (1,020 tokens), greedy agreement over 8 chat prompts x 64 new tokens, the obfuscated model fed noisy embeddings
  (every occurrence, every decode step, a fresh draw);
- attacks (`aloe.attacks.occurrence`): every token occurrence of the real prompts (8 chat prompts + 8 Lee test
  documents, as in the rest of the suite) is sent once with fresh noise, and each vector is read alone by the
  invariant attacks, by the states of the server's own body run on it, and by both together, against the full
  vocabulary; the stream-level attacker first links the occurrences of one token and reads each cluster's mean.

    python benchmarks/client_vocab_frontier.py [--alphas 0 0.05 0.1 0.2 0.4 0.8] [--stream-tokens 4000] [--threads 2]
        [--decode-tokens 2000] [--rerun] [--more-traffic N] [--right-key-only] [--weight-key-only [--draws N]]
        [--answers-only [--draws N] [--client-temperature T [--client-top-p P] [--client-top-k K]
        [--client-min-p M] [--client-repetition-penalty R] [--client-presence-penalty P]
        [--client-frequency-penalty F]]]
        [--decode-only [--beam 4] [--draws N]] [--states-only] [--report-only] [--json]

The stream-level attacks also fit the writer key on the linked attack's reading (key regression) and, for
measurement only, read every vector through the right key (fitted with the secret): what the noise itself leaves.
``--decode-only`` reads the prompts as text: every vector through the key the body gives, decoded by a beam search
with the public model as the prior.
``--answers-only`` measures the other half of the traffic: the client decodes the 8 chat prompts greedily and the
server reads each token the client picks from the final hidden state it returned, through the key its body gives;
with ``--client-temperature`` the client samples its picks (stored beside the greedy figures, per setting).
``--more-traffic N`` reruns the stream-level attacks of measured alphas with the prompts among N tokens of other
traffic (a fresh draw, stored beside the point's figures).

Resumable per alpha (a point measured before the linked attack keeps its fidelity and has its attacks redone;
``--rerun`` redoes the attacks of the listed alphas).
Writes benchmarks/results/client_vocab_frontier.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.attacks import client_held, key_regression, occurrence, weight_key  # noqa: E402
from aloe.attacks.common import Budget, Target  # noqa: E402
from aloe.attacks.decoding import decode_linked  # noqa: E402
from aloe.attacks.occurrence import attack_keyed, attack_linked, attack_vectors, score_links, score_occurrences  # noqa: E402
from aloe.attacks.suite import texts_for  # noqa: E402
from aloe.obfuscation.client_vocab import ClientVocabulary, split_vocabulary, with_occurrence_noise  # noqa: E402
from aloe.obfuscation.fidelity import PROMPTS, corpus_token_ids, greedy_fidelity, load_models, logit_fidelity  # noqa: E402
from aloe.obfuscation.secret import load_secret  # noqa: E402
from common import save_png  # noqa: E402
from privacy import RESULTS, all_profiles, build  # noqa: E402

PATH = RESULTS / "client_vocab_frontier.json"
SHAPE = "row"
FAMILIES = ("ia", "states", "combined", "linked")
STREAM_FAMILIES = ("linked_stream", "decoded_stream", "keyed_stream", "keyed_linked_stream", "weight_key_stream",
                   "weight_key_linked_stream", "weight_key_decoded", "weight_key_decoded_wide",
                   "weight_key_decoded_states")
BEAM = 4   # the decoder's beam; --decode-only with another beam stores its figures as weight_key_decoded_wide


def deployment(model: Path, show: bool) -> tuple[Path, Path, Path, Path]:
    """The balanced artifact (shared with the privacy benchmarks' cache) and its client-held split."""
    obf, secret = build(model, all_profiles()["balanced"], show)
    server, client = obf.parent / "balanced-split", obf.parent / "balanced-split.client.safetensors"
    if not server.is_dir():
        split_vocabulary(obf, server, client)
    return obf, secret, server, client


def fidelity(model: Path, alpha: float, paths, tokens: int, prompts: int, new_tokens: int, show: bool) -> dict:
    obf, secret, _, _ = paths
    t0 = time.perf_counter()
    tok, plain, obf_model, sec = load_models(model, obf, secret)
    with_occurrence_noise(obf_model, alpha, SHAPE)
    ids = corpus_token_ids(tok, "lee", tokens)
    fid = logit_fidelity(plain, obf_model, sec.tau, ids, progress=show)
    fid.update(greedy_fidelity(tok, plain, obf_model, sec.tau, PROMPTS[:prompts], new_tokens, show))
    fid["seconds"] = time.perf_counter() - t0
    return fid


def victim(model: Path, alpha: float, paths) -> tuple[Target, object, np.ndarray, ClientVocabulary]:
    """What every measurement of a point starts from: the server's target, the suite's texts, the prompt tokens
    sent (fixed ids dropped) and the client holding the vocabulary with occurrence noise ``alpha``."""
    target = Target(model, paths[2], Budget())
    texts = texts_for(target)
    toks = np.concatenate(texts.prompts)
    return target, texts, toks[~np.isin(toks, target.fixed_ids)], ClientVocabulary(paths[3], occurrence_noise=alpha)


def attacks(model: Path, alpha: float, paths, stream_tokens: int, decode_tokens: int, show: bool) -> dict:
    """Every family on one draw of the occurrence vectors: each vector alone, and the stream-level attacker that
    links the occurrences of one token first, over the prompts alone and over the prompts sent among
    ``stream_tokens`` tokens of other traffic (the first tokens of the suite's stream text, each with its own
    fresh noise; scored on the prompt occurrences); then that attacker's clusters decoded as text with the public
    model as the language prior, over the prompts and the first ``decode_tokens`` of the other traffic."""
    secret = paths[1]
    t1 = time.perf_counter()
    target, texts, toks, client = victim(model, alpha, paths)
    vectors = client.embed(load_secret(secret).tau[toks])
    cands = attack_vectors(target, vectors, alpha, SHAPE)
    out = {f: score_occurrences(cands[f], toks) for f in FAMILIES if f in cands}
    linked = attack_linked(target, vectors, alpha, SHAPE)
    out["linked"] = dict(score_occurrences(linked["candidates"], toks), **score_links(linked["labels"], toks),
                         threshold=linked["threshold"], calibration_same_pairs_missed=linked["same_pairs_missed"],
                         calibration_other_pairs_linked=linked["other_pairs_linked"])
    if stream_tokens > 0:
        out.update(stream_attacks(model, target, texts, toks, vectors, client, secret, alpha, stream_tokens,
                                  decode_tokens, show))
    out["seconds"] = time.perf_counter() - t1
    out["texts"] = texts.source
    return out


def right_key_read(target: Target, client: ClientVocabulary, secret: Path, sent: torch.Tensor, truth: np.ndarray,
                   m: int) -> dict:
    """For measurement, with the secret: every vector sent read alone through the writer key itself (fitted by least
    squares on the client's noise-free table against the plain one, every movable id: exact), by its likelihood
    under the noise. What the noise leaves to a server that has the key. The key is not fitted on the vectors read,
    so their own noise cannot leak into it. Scored on the first ``m`` (the prompt occurrences)."""
    ids = target.movable_ids
    tau = load_secret(secret).tau
    K = torch.linalg.lstsq(target.plain_embed[torch.as_tensor(ids)].double(),
                           client.embed_table[torch.as_tensor(tau[ids])].double()).solution
    xhat = key_regression.back_project(sent, K)
    s2 = key_regression.noise_level(xhat, target.plain_embed, truth, SHAPE == "row")
    rk = key_regression.read([(xhat, target.plain_embed, s2)], ids, target.budget.topk, SHAPE == "row")
    return dict(score_occurrences(rk[:m], truth[:m]), stream_tokens=int(len(truth) - m),
                all_occurrence_recovery=float((rk[:, 0] == truth).mean()), sigma=float(np.sqrt(s2)), key="exact")


def right_key_only(model: Path, alpha: float, paths, stream_tokens: int) -> dict:
    """:func:`right_key_read` alone on a fresh draw of the vectors, the prompts among ``stream_tokens`` tokens of
    other traffic."""
    secret = paths[1]
    target, texts, toks, client = victim(model, alpha, paths)
    extra = texts.stream[~np.isin(texts.stream, target.fixed_ids)][:stream_tokens]
    tau = load_secret(secret).tau
    sent = torch.cat([client.embed(tau[toks]), client.embed(tau[extra])])
    return dict(right_key_read(target, client, secret, sent, np.concatenate([toks, extra]), len(toks)),
                draw="its own")


def weight_key_read(target: Target, sent: torch.Tensor, truth: np.ndarray, m: int, alpha: float,
                    labels: np.ndarray | None = None, key: weight_key.WeightKey | None = None) -> dict:
    """The attack that needs no reading first: the writer key read off the server's body
    (:func:`aloe.attacks.weight_key.recover`, unless ``key`` is that already), every vector sent read through it
    (alone, or with ``labels`` the occurrences of each linked cluster pooled). Scored on the first ``m`` (the prompt
    occurrences)."""
    key = weight_key.recover(target) if key is None else key
    cand = weight_key.read_vectors(target, key, sent, alpha, SHAPE, labels)
    return dict(score_occurrences(cand[:m], truth[:m]), stream_tokens=int(len(truth) - m),
                all_occurrence_recovery=float((cand[:, 0] == truth).mean()), **key.summary())


def weight_key_only(model: Path, alpha: float, paths, stream_tokens: int, link: bool, draws: int = 1) -> dict:
    """:func:`weight_key_read` on a fresh draw of the vectors, the prompts among ``stream_tokens`` tokens of other
    traffic: each vector alone and, with ``link``, the linked attack's clusters pooled; beside it the read through
    the right key (with the secret) on the same draw. With ``draws`` > 1 the read of each vector alone is repeated on
    that many fresh draws in all (``occurrence_recovery_per_draw``, the first being the row's own)."""
    secret = paths[1]
    target, texts, toks, client = victim(model, alpha, paths)
    extra = texts.stream[~np.isin(texts.stream, target.fixed_ids)][:stream_tokens]
    tau = load_secret(secret).tau
    truth = np.concatenate([toks, extra])
    sent = client.embed(tau[truth])
    key = weight_key.recover(target)
    out = {"weight_key_stream": dict(weight_key_read(target, sent, truth, len(toks), alpha, key=key), draw="its own",
                                     right_key_same_draw=right_key_read(target, client, secret, sent, truth,
                                                                        len(toks))["occurrence_recovery"])}
    if draws > 1:
        more = [score_occurrences(weight_key.read_vectors(target, key, client.embed(tau[toks]), alpha, SHAPE), toks)
                for _ in range(draws - 1)]     # the prompts alone: the read takes each vector alone
        out["weight_key_stream"]["occurrence_recovery_per_draw"] = [
            out["weight_key_stream"]["occurrence_recovery"], *(m["occurrence_recovery"] for m in more)]
    if link:
        labels = occurrence.link_occurrences(sent, occurrence.link_threshold(target, alpha, SHAPE)["threshold"])
        out["weight_key_linked_stream"] = dict(weight_key_read(target, sent, truth, len(toks), alpha, labels, key),
                                               draw="its own (as the alone row)")
    return out


def weight_key_answers(model: Path, alpha: float, paths, prompts: int, new_tokens: int, show: bool,
                       draws: int = 1, sampling: dict | None = None) -> dict:
    """The answers: the client-held deployment decodes the chat prompts greedily (the server's body in this process,
    fresh noise on every vector the client sends, the client's own head), and the server reads the token the client
    picks at each step from the final hidden state it returned, through the key its body gives and the public head
    (:func:`aloe.attacks.client_held.answer_reads`). With ``draws`` > 1 the whole session is repeated that many times
    in all, each with its own noise and so its own answers (``answer_recovery_per_draw``, the first being the row's
    own). With ``sampling`` (temperature, top_p) the client samples its picks instead of taking the greedy one."""
    from transformers import AutoTokenizer

    t1 = time.perf_counter()
    target, _, _, client = victim(model, alpha, paths)
    key = weight_key.recover(target)
    tok = AutoTokenizer.from_pretrained(model)
    tau = load_secret(paths[1]).tau
    obf = [tau[x] for x in client_held.chat_prompt_ids(tok, PROMPTS[:prompts])]
    with tqdm(total=len(obf) * draws, desc=f"answers, alpha {alpha}", disable=not show, leave=False) as bar:
        runs = [client_held.answer_reads(target, key, paths[2], client, tau, obf, new_tokens, progress=bar,
                                         sampling=sampling) for _ in range(draws)]
    spread = {} if draws == 1 else {
        "answer_recovery_per_draw": [r["answer_recovery"] for r in runs],
        "answer_recovery_top10_per_draw": [r["answer_recovery_top10"] for r in runs],
        "answer_recovery_with_echo_per_draw": [r["answer_recovery_with_echo"] for r in runs],
        "echo_temperature_per_draw": [r["echo_temperature"] for r in runs],
        "echo_sampler_per_draw": [r["echo_sampler"] for r in runs],
        "answer_recovery_with_echo_untruncated_per_draw": [r["answer_recovery_with_echo_untruncated"] for r in runs],
        "answer_recovery_with_echo_unpenalised_per_draw": [r.get("answer_recovery_with_echo_unpenalised")
                                                           for r in runs],
        "answer_recovery_with_echo_grid_per_draw": [r.get("answer_recovery_with_echo_grid") for r in runs],
        "answer_tokens_per_draw": [r["answer_tokens"] for r in runs]}
    return dict(runs[0], **spread, seconds=time.perf_counter() - t1, **key.summary())


def weight_key_decoded(model: Path, alpha: float, paths, beam: int, show: bool, draws: int = 1) -> dict:
    """The prompts read as text: each prompt's vectors (a fresh draw) read through the key the body gives and decoded
    by a beam search over the noisy channel with the public model as the prior, at the evidence weight the attacker
    picks on its own text (8 x 48 tokens of its prior corpus sent through its own simulation of the client); beside
    it, on the same draw, the decoder at weight 1, each vector read alone, and the public model alone
    (:func:`aloe.attacks.client_held.prompt_reads`). With ``draws`` > 1 the decoding at the picked weight is
    repeated on that many fresh draws in all (``occurrence_recovery_per_draw``, the first being the row's own)."""
    t1 = time.perf_counter()
    target, texts, _, client = victim(model, alpha, paths)
    key = weight_key.recover(target)
    tau = load_secret(paths[1]).tau
    with tqdm(desc=f"decode, alpha {alpha}", disable=not show, leave=False) as bar:
        out = client_held.prompt_reads(target, key, client, tau, texts.prompts, texts.prior, alpha, SHAPE, beam,
                                       draws, progress=bar)
    return dict(out, draw="its own", seconds=time.perf_counter() - t1)


def weight_key_states(model: Path, alpha: float, paths, beam: int, evidence: float, show: bool) -> dict:
    """The states the server computes at the prompt positions (``--states-only``): on a fresh draw of the prompt
    vectors, what the server's own forward pass predicts there read alone, and the decoder at the point's picked
    evidence weight with those predictions joined at each weight, the weights scored on the victim's own prompts (an
    oracle), and at the weight the attacker picks on its own text (the attack:
    :func:`aloe.attacks.client_held.state_reads`)."""
    from transformers import AutoModelForCausalLM

    t1 = time.perf_counter()
    target, texts, _, client = victim(model, alpha, paths)
    key = weight_key.recover(target)
    body = AutoModelForCausalLM.from_pretrained(str(paths[2]), dtype=torch.float32).eval()
    tau = load_secret(paths[1]).tau
    with tqdm(desc=f"states, alpha {alpha}", disable=not show, leave=False) as bar:
        out = client_held.state_reads(target, key, body, client, tau, texts.prompts, alpha, SHAPE, beam, evidence,
                                      progress=bar, own_text=texts.prior)
    return dict(out, seconds=time.perf_counter() - t1)


def more_traffic(model: Path, alpha: float, paths, stream_tokens: int, show: bool) -> dict:
    """The stream-level attacks alone (no decoding) on a fresh draw of the vectors, the prompts sent among
    ``stream_tokens`` tokens of other traffic: how the figures grow with what the server sees."""
    secret = paths[1]
    t1 = time.perf_counter()
    target, texts, toks, client = victim(model, alpha, paths)
    vectors = client.embed(load_secret(secret).tau[toks])
    out = stream_attacks(model, target, texts, toks, vectors, client, secret, alpha, stream_tokens, 0, show)
    out["seconds"] = time.perf_counter() - t1
    return out


def stream_attacks(model: Path, target: Target, texts, toks: np.ndarray, vectors: torch.Tensor,
                   client: ClientVocabulary, secret: Path, alpha: float, stream_tokens: int, decode_tokens: int,
                   show: bool) -> dict:
    """The stream-level attacker over the prompts' ``vectors`` sent among ``stream_tokens`` tokens of other traffic
    (each with its own fresh noise): the linked attack, the key fitted on its reading (each vector alone, and each
    linked cluster pooled), the read through the right key (with the secret, for measurement) and, with
    ``decode_tokens``, the linked clusters decoded with the language prior. Scored on the prompt occurrences."""
    out: dict = {}
    extra = texts.stream[~np.isin(texts.stream, target.fixed_ids)][:stream_tokens]
    sent = torch.cat([vectors, client.embed(load_secret(secret).tau[extra])])
    both = attack_linked(target, sent, alpha, SHAPE)
    m = len(toks)
    out["linked_stream"] = dict(score_occurrences(both["candidates"][:m], toks),
                                **score_links(both["labels"][:m], toks), stream_tokens=int(len(extra)),
                                all_occurrence_recovery=float((both["candidates"][:, 0] ==
                                                               np.concatenate([toks, extra])).mean()))
    # the key fitted on the linked attack's reading of every vector sent, each vector then read alone through
    # it, and with the occurrences of each linked cluster pooled
    for fam, labels in (("keyed_stream", None), ("keyed_linked_stream", both["labels"])):
        kd = attack_keyed(target, sent, both["candidates"][:, 0], SHAPE, labels)
        out[fam] = dict(score_occurrences(kd.pop("candidates")[:m], toks), stream_tokens=int(len(extra)), **kd)
    truth = np.concatenate([toks, extra])
    key = weight_key.recover(target)
    out["weight_key_stream"] = weight_key_read(target, sent, truth, m, alpha, key=key)
    out["weight_key_linked_stream"] = weight_key_read(target, sent, truth, m, alpha, both["labels"], key)
    out["right_key_stream"] = right_key_read(target, client, secret, sent, truth, m)
    out["linked_stream"]["all_distinct_right"] = int(len(np.unique(truth[both["candidates"][:, 0] == truth])))
    if decode_tokens > 0:
        n_dec = len(toks) + min(decode_tokens, len(extra))
        lengths = [int((~np.isin(p, target.fixed_ids)).sum()) for p in texts.prompts]
        chunks = [min(512, n_dec - s) for s in range(len(toks), n_dec, 512)]
        with tqdm(desc="decoding", unit="sweep", disable=not show, leave=False) as bar:
            dec = decode_linked(model, lengths + chunks, both["labels"][:n_dec], both["cluster_candidates"], bar)
        out["decoded_stream"] = dict(score_occurrences(dec.pop("candidates")[:len(toks)], toks),
                                     decoded_tokens=int(n_dec - len(toks)), **dec)
    return out


def fit_label(keyed: dict) -> str:
    """The key regression's fit and its round cap (entries before the cap was recorded ran with 3 for the trimmed
    fit and 12 for the isometry fit)."""
    fit = keyed.get("fit", "trimmed")
    return f"{fit}, <= {keyed.get('max_rounds', 3 if fit == 'trimmed' else 12)} rounds"


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def sampling_label(sampling: dict) -> str:
    label = f"temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}"
    if sampling.get("top_k", -1) > 0:
        label += f", top-k {sampling['top_k']}"
    if sampling.get("min_p", 0.0) > 0:
        label += f", min-p {sampling['min_p']:g}"
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        label += f", repetition penalty {sampling['repetition_penalty']:g}"
    for name in ("presence", "frequency"):
        if sampling.get(f"{name}_penalty", 0.0):
            label += f", {name} penalty {sampling[f'{name}_penalty']:g}"
    return label


def sampler_fit(fit: dict | None) -> str:
    """The server's model of the client's sampler, as the echo picked it: ``T 0.75, p 0.9, k 40, f 0.01``
    (``r``: a repetition penalty, ``pp``/``fp``: presence/frequency penalties, ``min-p``)."""
    if fit is None:
        return "–"
    out = f"T {fit['temperature']:g}"
    if fit.get("frequency_penalty", 0.0):
        out = f"fp {fit['frequency_penalty']:.3g}, " + out
    if fit.get("presence_penalty", 0.0):
        out = f"pp {fit['presence_penalty']:.3g}, " + out
    if fit.get("repetition_penalty", 1.0) != 1.0:
        out = f"r {fit['repetition_penalty']:.3g}, " + out
    if fit.get("floor") is not None:
        out += ((f", p {fit['top_p']:g}" if fit["top_p"] < 1 else "")
                + (f", k {fit['top_k']}" if fit["top_k"] > 0 else "")
                + (f", min-p {fit['min_p']:g}" if fit.get("min_p", 0.0) > 0 else "") + f", f {fit['floor']:g}")
    return out


def spread(entry: dict, field: str = "occurrence_recovery") -> str:
    """`` (lo-hi over n draws)`` where the entry was read on several draws (``--draws``), else nothing."""
    d = entry.get(f"{field}_per_draw") or []
    return f" ({pct(min(d))}-{pct(max(d))} over {len(d)} draws)" if len(d) > 1 else ""


def write_report(state: dict) -> None:
    rows = ["| occurrence noise alpha | ppl ratio | top-1 agree | greedy agree (prompts exact) | IA | states | "
            "IA + states | linked: prompts (pairs linked: recall / precision) | linked: among other traffic | "
            "linked among other traffic, decoded with the language prior (top-10 of the linked attack) | "
            "key regression among other traffic: each vector / linked clusters pooled (fit) | "
            "key from the body's weights: each vector / linked clusters pooled | "
            "key from the body's weights, decoded with the public model as prior (each vector alone / the public "
            "model alone, same draw; a wider beam after the semicolon) | "
            "through the right key, with the secret (not an attack) | goal met |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(state["points"], key=float):
        e = state["points"][key]
        f, a = e["fidelity"], e["attacks"]
        fams = [fam for fam in (*FAMILIES, *STREAM_FAMILIES) if fam in a]
        worst = max(a[fam]["occurrence_recovery"] for fam in fams)
        met = f["ppl_ratio"] <= 1.10 and f["greedy_agreement"] >= 0.80 and worst <= 0.05
        rows.append(f"| {e['alpha']} | {f['ppl_ratio']:.3f} | {f['top1_agreement']:.3f} | "
                    f"{f['greedy_agreement']:.2f} ({f['greedy_exact_prompts']}/{f['greedy_prompts']}) | "
                    + " | ".join(pct(a[fam]["occurrence_recovery"]) for fam in FAMILIES[:3])
                    + (f" | {pct(a['linked']['occurrence_recovery'])} ({pct(a['linked']['link_recall'])} / "
                       f"{pct(a['linked']['link_precision'])})" if "linked" in a else " | –")
                    + (f" | {pct(a['linked_stream']['occurrence_recovery'])} (+{a['linked_stream']['stream_tokens']:,} "
                       f"tokens; {pct(a['linked_stream']['link_recall'])} / "
                       f"{pct(a['linked_stream']['link_precision'])})" if "linked_stream" in a else " | –")
                    + (f" | {pct(a['decoded_stream']['occurrence_recovery'])} "
                       f"(+{a['decoded_stream']['decoded_tokens']:,} tokens; "
                       f"{pct(a['linked_stream']['occurrence_recovery_top10'])})"
                       if "decoded_stream" in a else " | –")
                    + (f" | {pct(a['keyed_stream']['occurrence_recovery'])} / "
                       f"{pct(a['keyed_linked_stream']['occurrence_recovery'])} "
                       f"({fit_label(a['keyed_stream'])})"
                       if "keyed_linked_stream" in a else " | –")
                    + (f" | {pct(a['weight_key_stream']['occurrence_recovery'])}{spread(a['weight_key_stream'])} / "
                       + (pct(a['weight_key_linked_stream']['occurrence_recovery'])
                          if "weight_key_linked_stream" in a else "–") if "weight_key_stream" in a else " | –")
                    + (f" | {pct(a['weight_key_decoded']['occurrence_recovery'])}{spread(a['weight_key_decoded'])} "
                       f"({pct(a['weight_key_decoded']['alone_same_draw'])} / "
                       f"{pct(a['weight_key_decoded']['language_model_alone'])})"
                       + (f"; beam {a['weight_key_decoded_wide']['beam']}: "
                          f"{pct(a['weight_key_decoded_wide']['occurrence_recovery'])}"
                          f"{spread(a['weight_key_decoded_wide'])}" if "weight_key_decoded_wide" in a else "")
                       if "weight_key_decoded" in a else " | –")
                    + (f" | {pct(a['right_key_stream']['occurrence_recovery'])}" if "right_key_stream" in a else " | –")
                    + f" | {'yes' if met else 'no'} |")
    more = ["| occurrence noise alpha | other traffic (tokens) | linked | key regression: each vector / linked "
            "clusters pooled (fit) | key from the body's weights: each vector | through the right key, with the "
            "secret (not an attack) | seconds |",
            "|---|---|---|---|---|---|---|"]
    for key in sorted(state["points"], key=float):
        e = state["points"][key]
        for n, a in sorted(e.get("more_traffic", {}).items(), key=lambda kv: int(kv[0])):
            more.append(f"| {e['alpha']} | {int(n):,} | {pct(a['linked_stream']['occurrence_recovery'])} | "
                        f"{pct(a['keyed_stream']['occurrence_recovery'])} / "
                        f"{pct(a['keyed_linked_stream']['occurrence_recovery'])} "
                        f"({fit_label(a['keyed_stream'])}) | "
                        + (pct(a["weight_key_stream"]["occurrence_recovery"]) if "weight_key_stream" in a else "–")
                        + f" | {pct(a['right_key_stream']['occurrence_recovery'])} | {a['seconds']:.0f} |")
    md = ["# Client-held vocabulary with fresh per-occurrence noise (SmolLM2-135M-Instruct)", "",
          "Produced by " + ", then ".join(f"`python benchmarks/client_vocab_frontier.py {' '.join(c)}`"
                                         for c in state.get("commands", [])) + ".", "",
          "The `balanced` artifact (exact) split with `--client-vocab`; the client adds fresh row-shaped noise of "
          "level alpha to every embedding it sends. Fidelity: Lee corpus (perplexity, top-1), 8 chat prompts x 64 new "
          "tokens (greedy). Attacks: % of the token occurrences of the real prompts (each sent once, read alone; "
          "candidates: all 49,152 ids). Linked stream: the server first clusters the occurrences whose pair ratio "
          "says they share a token (threshold calibrated on its own noisy copies of plain rows) and reads each "
          "cluster's mean (`aloe.attacks.occurrence.attack_linked`); in brackets the share of same-token pairs it "
          "linked and the share of its links that are right. Among other traffic: the same prompts sent among "
          "the first tokens of the Lee background text, each with fresh noise, all linked together (scored on the "
          "prompt occurrences). Decoded: those clusters read as text, the public model as the language prior "
          "(`aloe.attacks.decoding`: each cluster picks among its 10 candidates by the log-probability of the text "
          "around its occurrences, over the prompts and the first tokens of the other traffic); in brackets the "
          "share of prompt occurrences whose token is among the linked attack's 10 candidates, the decoder's "
          "ceiling. Key regression: the writer key fitted by trimmed least squares on the linked attack's reading "
          "of every vector sent (prompts and other traffic), each vector mapped back through it and read by its "
          "likelihood under the noise against every plain token, refitted on that reading (at most 3 rounds; "
          "`aloe.attacks.occurrence.attack_keyed`); alone, and with the occurrences of each linked cluster pooled. "
          "Fit `isometry`: the key fitted as the scaled isometry the exact-norm keys are, on the span of the pairs "
          "it trusts, which grows each round (`aloe.attacks.key_regression.regress_isometry`; it stops once at "
          "most 0.1% of the first choices change); the rows marked `trimmed` ran before it. "
          "Key from the body's weights: an attack that reads nothing first. The exact-norm keys write the residual "
          "stream through one scaled isometry, and the server's own FFN gates and residual writers give it: the "
          "writers span its subspace, and the Gram matrices of the gates over their units (free of the unit "
          "permutation) are the public model's rotated by it (`aloe.attacks.weight_key`); every vector sent is "
          "read through it by its likelihood under the public noise level, alone and with the occurrences of each "
          "linked cluster pooled. On the rows that ran it on its own draw (`--weight-key-only`) the read through "
          "the right key on that same draw is in the JSON (`right_key_same_draw`); with `--draws N`, in brackets "
          "the range of each vector's read alone over N fresh draws of the prompt vectors. "
          "Decoded with the public model as prior (`--decode-only`, its own draw of the prompt vectors): each "
          "prompt read as text by a beam search over the noisy channel, every vector's likelihood through the key "
          "the body gives plus the public model's log-probability of the token after the prefix "
          "(`aloe.attacks.weight_key.decode_vectors`); in brackets, on the same draw, each vector read alone and "
          "the public model alone (no vector read: the prior's guess, not counted as an attack). "
          "Through the right key: a measurement with the secret, not an attack (it is not counted in the goal): "
          "every vector sent read alone through the writer key itself (fitted on the client's noise-free table, "
          "so no vector's noise enters it), what the noise itself leaves once a server has the key; on its own "
          "draw of the vectors (`--right-key-only`). "
          "The other families of a row are measured on one draw of the vectors. Goal: ppl ratio "
          "<= 1.10, greedy >= 0.80, every attack <= 5%.", "", *rows, ""]
    answers = ["| occurrence noise alpha | ppl ratio | answer tokens (distinct) | read from the returned states: "
               "top-1 | top-10 | with the echo, softmax model: top-1 | with the echo: top-1 | the server's model of "
               "the sampler (per draw) | prompt occurrences: worst attack | prompts and answers both <= 5% |",
               "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(state["points"], key=float):
        e = state["points"][key]
        if "answers" not in e:
            continue
        r, a = e["answers"], e["attacks"]
        worst = max(a[fam]["occurrence_recovery"] for fam in (*FAMILIES, *STREAM_FAMILIES) if fam in a)
        every = [*(r.get("answer_recovery_per_draw") or [r["answer_recovery"]]),
                 *(r.get("answer_recovery_with_echo_per_draw") or [r.get("answer_recovery_with_echo", 0.0)])]
        echo = (f"**{pct(r['answer_recovery_with_echo'])}**{spread(r, 'answer_recovery_with_echo')}"
                if "answer_recovery_with_echo" in r else "–")
        if "echo_sampler" in r:   # measured with the model of the client's sampler, the softmax beside it
            softmax = (f"{pct(r['answer_recovery_with_echo_untruncated'])}"
                       f"{spread(r, 'answer_recovery_with_echo_untruncated')}")
            model = "; ".join(sampler_fit(f) for f in (r.get("echo_sampler_per_draw") or [r["echo_sampler"]]))
        else:                     # measured before it: the softmax model is the read
            softmax, model = "–", "; ".join(f"T {t:g}" for t in (r.get("echo_temperature_per_draw")
                                                                 or [r.get("echo_temperature")]) if t is not None)
        answers.append(f"| {e['alpha']} | {e['fidelity']['ppl_ratio']:.3f} | {r['answer_tokens']} "
                       f"({r['distinct_answer_tokens']}) | **{pct(r['answer_recovery'])}**"
                       f"{spread(r, 'answer_recovery')} | {pct(r['answer_recovery_top10'])}"
                       f"{spread(r, 'answer_recovery_top10')} | {softmax} | {echo} | {model or '–'} | {pct(worst)} | "
                       f"{'yes' if max(worst, *every) <= 0.05 else 'no'} |")
    if len(answers) > 2:
        md += ["## The answers", "",
               "The other half of the traffic (`--answers-only`): the client decodes the 8 chat prompts greedily "
               "(up to 64 new tokens each, fresh noise on every vector it sends, its own head), and for every "
               "token it picks the server reads the pick from the final hidden state it returned: the state through "
               "the key its body gives, then the public head (`aloe.attacks.weight_key.read_answers`). Scored on "
               "the answer tokens that tau moves (the end id not counted). The noise the client adds changes the "
               "state, and the client reads the changed state too; what the server lacks is the head's own fresh "
               "key part, which reads the noise outside the residual subspace. With the echo: each pick the client "
               "sends back as its next input (every pick of a reply but the last, where the reply hits the token "
               "cap) is ranked by its log-probability under the server's model of the client's sampler (below: "
               "a softmax at a temperature, cut to a top-k or top-p nucleus with a floor, after a repetition "
               "penalty, the one under which the echoes received are most likely), plus that vector's "
               "log-likelihood through the key; scored on every answer token that tau moves. Beside it the softmax "
               "model alone (T only); rows with a dash there were measured with the softmax model only.", "",
               *answers, ""]
    sampled = ["| occurrence noise alpha | ppl ratio | the client's sampling | answer tokens (distinct) | read from "
               "the returned states: top-1 | top-10 | with the echo, softmax model: top-1 | + truncation | "
               "+ truncation and a penalty | the server's model of the sampler (per draw) |",
               "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(state["points"], key=float):
        e = state["points"][key]
        for label, r in sorted(e.get("answers_sampled", {}).items()):
            if "echo_sampler" in r:   # measured with the model of the client's truncation
                fits = r.get("echo_sampler_per_draw") or [r["echo_sampler"]]
                softmax = (f"{pct(r['answer_recovery_with_echo_untruncated'])}"
                           f"{spread(r, 'answer_recovery_with_echo_untruncated')}")
                if "answer_recovery_with_echo_unpenalised" in r:
                    truncated = (f"{pct(r['answer_recovery_with_echo_unpenalised'])}"
                                 f"{spread(r, 'answer_recovery_with_echo_unpenalised')}")
                    penalised = f"**{pct(r['answer_recovery_with_echo'])}**{spread(r, 'answer_recovery_with_echo')}"
                    if "answer_recovery_with_echo_grid" in r:   # the penalties refined around the grid's
                        penalised += (f"; the grid's penalties alone {pct(r['answer_recovery_with_echo_grid'])}"
                                      f"{spread(r, 'answer_recovery_with_echo_grid')}")
                else:                 # measured before the penalty was modelled
                    truncated = f"**{pct(r['answer_recovery_with_echo'])}**{spread(r, 'answer_recovery_with_echo')}"
                    penalised = "–"
                model = "; ".join(sampler_fit(f) for f in fits)
            else:                     # measured before it: the softmax model only
                temps = r.get("echo_temperature_per_draw") or [r["echo_temperature"]]
                softmax = f"**{pct(r['answer_recovery_with_echo'])}**{spread(r, 'answer_recovery_with_echo')}"
                truncated = penalised = "–"
                model = "; ".join(f"T {t:g}" for t in temps if t is not None)
            sampled.append(f"| {e['alpha']} | {e['fidelity']['ppl_ratio']:,.3f} | {label} | {r['answer_tokens']} "
                           f"({r['distinct_answer_tokens']}) | "
                           f"{pct(r['answer_recovery'])}{spread(r, 'answer_recovery')} | "
                           f"{pct(r['answer_recovery_top10'])}{spread(r, 'answer_recovery_top10')} | "
                           f"{softmax} | {truncated} | {penalised} | {model} |")
    if len(sampled) > 2:
        md += ["## The answers of a sampling client", "",
               "As above, but the client samples each pick (`--answers-only --client-temperature T "
               "[--client-top-p P] [--client-top-k K] [--client-min-p M] [--client-repetition-penalty R] "
               "[--client-presence-penalty P] [--client-frequency-penalty F]`) with its own sampler "
               "(`aloe.obfuscation.client.Sampler`, keyed from the OS CSPRNG; the proxy's default temperature is "
               "1). The server is not told the client's settings: it models the sampler as transformers' chain, "
               "penalties: a repetition penalty r on the pick's context as the server reads it (each prompt "
               "vector alone, the reply's earlier picks as read with their echoes), OpenAI's presence and "
               "frequency penalties pp, fp on those picks alone, or both (r first), then the state's softmax at "
               "temperature T, "
               "truncated to its top-k, its top-p nucleus and its min-p set with a floor f (the share of picks let "
               "fall outside the server's kept set), and takes the (penalty, T, p, k, min-p, f) of a grid under "
               "which the echoes received are most likely (`aloe.attacks.weight_key.echo_posterior`); the softmax "
               "model alone (T only) and the truncated one without a penalty are read beside it. Min-p and the "
               "presence and frequency penalties joined the model after the other rows ran (their fits show none), "
               "and the two kinds of penalty together after the rows of clients that set only one kind. "
               "A sampled pick is often not "
               "the state's first token, so the state alone reads less; the echo is the vector of the pick itself. "
               "Rows with a dash were measured before that part of the model was built.",
               "", *sampled, ""]
    states = ["| occurrence noise alpha | evidence weight | the server's states alone | decoded (same draw, no "
              "states) | with the states at prediction weight 0.25 / 0.5 / 1 | **the attack**: at the weight picked "
              "on the attacker's own text |", "|---|---|---|---|---|---|"]
    for key in sorted(state["points"], key=float):
        r = state["points"][key].get("states_oracle")
        if r is not None:
            by = {float(w): v for w, v in r["decoded_by_prediction_weight"].items()}
            picked = (f"**{pct(r['decoded_at_prediction_weight'])}** (weight {r['prediction_weight']:g})"
                      if "prediction_weight" in r else "–")
            states.append(f"| {key} | {r['evidence_weight']:g} | {pct(r['states_alone'])} | {pct(by[0.0])} | "
                          + " / ".join(pct(v) for w, v in sorted(by.items()) if w > 0) + f" | {picked} |")
    if len(states) > 2:
        md += ["## The states at the prompt positions", "",
               "The server computes a final hidden state at every prompt position, not only the last "
               "(`--states-only`). Through the key its body gives and the public head, the state at i - 1 predicts "
               "prompt token i (`aloe.attacks.weight_key.state_predictions`): read alone, and joined to the "
               "decoder at the point's picked evidence weight, each prediction weight scored on the victim's own "
               "prompts (an oracle's choice, an upper bound of what the states add; not counted as an attack), and "
               "at the weight the attacker picks itself: its own text (8 x 48 tokens of its corpus) sent through "
               "its simulation of the client, run through the body, and decoded at each weight "
               "(`aloe.attacks.weight_key.calibrate_prediction_weight`); that read counts as an attack "
               "(`weight_key_decoded_states`). One fresh draw of the prompt vectors per row; % of the prompt "
               "occurrences. Rows with a dash ran before the attacker's calibration was built.", "", *states, ""]
    if len(more) > 2:
        md += ["## More traffic", "",
               "The stream-level attacks again (`--more-traffic N`), on a fresh draw of the vectors, the prompts sent "
               "among N tokens of other traffic (the Lee background text), no decoding; scored on the prompt "
               "occurrences. The fit is the key regression's, picked by the public profile.", "", *more, ""]
    atomic_write_text(RESULTS / "client_vocab_frontier.md", "\n".join(md))


def write_plot(state: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(state["points"].values(), key=lambda e: e["alpha"])
    fig, ax = plt.subplots(figsize=(9.6, 4.8))
    for fam, marker in zip((*FAMILIES, *STREAM_FAMILIES), "os^Dv*PXhdp8H", strict=True):
        have = [e for e in pts if fam in e["attacks"]]
        ax.plot([100 * e["attacks"][fam]["occurrence_recovery"] for e in have],
                [e["fidelity"]["ppl_ratio"] for e in have], marker=marker,
                color={"weight_key_decoded": "darkgoldenrod", "weight_key_decoded_wide": "olive",
                       "weight_key_decoded_states": "teal"}.get(fam),
                # the default cycle has 10 colours
                label={"linked": "linked (cluster means)", "linked_stream": "linked among other traffic",
                       "decoded_stream": "linked + language prior", "keyed_stream": "key regression",
                       "keyed_linked_stream": "key regression, clusters pooled",
                       "weight_key_stream": "key from the body's weights",
                       "weight_key_linked_stream": "key from the body's weights, clusters pooled",
                       "weight_key_decoded": "key from the body's weights, decoded with the prior",
                       "weight_key_decoded_wide": "the same decoding, a wider beam",
                       "weight_key_decoded_states": "the same decoding with the server's own states"}.get(fam, fam))
    have = [e for e in pts if "right_key_stream" in e["attacks"]]
    if have:
        ax.plot([100 * e["attacks"]["right_key_stream"]["occurrence_recovery"] for e in have],
                [e["fidelity"]["ppl_ratio"] for e in have], ls="--", color="black", marker=".",
                label="through the right key (secret; not an attack)")
    have = [e for e in pts if "answers" in e]
    if have:
        ax.plot([100 * e["answers"]["answer_recovery"] for e in have], [e["fidelity"]["ppl_ratio"] for e in have],
                color="crimson", marker="o", mfc="none", lw=2, label="the answers, read from the returned states")
    for e in pts:
        ax.annotate(f"alpha {e['alpha']}", (100 * e["attacks"]["combined"]["occurrence_recovery"],
                                            e["fidelity"]["ppl_ratio"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(1.10, ls="--", lw=0.8, color="grey")
    ax.axvline(5.0, ls=":", lw=0.8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("% read: prompt-token occurrences (the answers: answer tokens)")
    ax.set_ylabel("perplexity ratio (noisy / plain)")
    ax.set_title("Client-held vocabulary + fresh occurrence noise (goal: below 1.10, left of 5%)", fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_png(fig, RESULTS / "client_vocab_frontier.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
    ap.add_argument("--fidelity-tokens", type=int, default=1020)
    ap.add_argument("--fidelity-prompts", type=int, default=8)
    ap.add_argument("--fidelity-new-tokens", type=int, default=64)
    ap.add_argument("--stream-tokens", type=int, default=4000,
                    help="tokens of other traffic the prompts are linked among (0: the prompts alone)")
    ap.add_argument("--decode-tokens", type=int, default=2000,
                    help="tokens of the other traffic decoded with the prompts by the language-prior decoder "
                         "(0: no decoding)")
    ap.add_argument("--rerun", action="store_true",
                    help="redo the attacks of the listed alphas (their fidelity is kept)")
    ap.add_argument("--more-traffic", type=int, default=0, metavar="N",
                    help="only the stream-level attacks, no decoding, of the listed (measured) alphas, the prompts "
                         "among N tokens of other traffic; stored beside the point's figures")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and plot from the JSON")
    ap.add_argument("--right-key-only", action="store_true",
                    help="redo only the read through the right key of the listed (measured) alphas, on a fresh "
                         "draw of the vectors, for the point and each of its --more-traffic entries")
    ap.add_argument("--weight-key-only", action="store_true",
                    help="run only the attack through the key read off the body's weights on the listed (measured) "
                         "alphas, on a fresh draw of the vectors (each vector alone and the linked clusters pooled; "
                         "alone for each --more-traffic entry)")
    ap.add_argument("--answers-only", action="store_true",
                    help="run only the read of the answers (the client decodes the chat prompts greedily; the server "
                         "reads each pick from the hidden state it returned) on the listed (measured) alphas")
    ap.add_argument("--client-temperature", type=float, default=0.0,
                    help="with --answers-only: the client samples its picks at this temperature (0: greedy); a "
                         "sampling client's figures are stored beside the greedy ones, one entry per setting")
    ap.add_argument("--client-top-p", type=float, default=1.0,
                    help="with --answers-only and --client-temperature: the client's nucleus sampling")
    ap.add_argument("--client-top-k", type=int, default=0,
                    help="with --answers-only and --client-temperature: the client's top-k (0: off)")
    ap.add_argument("--client-min-p", type=float, default=0.0,
                    help="with --answers-only and --client-temperature: the client's min-p (0: off)")
    ap.add_argument("--client-repetition-penalty", type=float, default=1.0,
                    help="with --answers-only and --client-temperature: the client's repetition penalty (1: none)")
    ap.add_argument("--client-presence-penalty", type=float, default=0.0,
                    help="with --answers-only and --client-temperature: the client's OpenAI presence penalty")
    ap.add_argument("--client-frequency-penalty", type=float, default=0.0,
                    help="with --answers-only and --client-temperature: the client's OpenAI frequency penalty")
    ap.add_argument("--decode-only", action="store_true",
                    help="run only the decoding of the prompts read through the key the body gives (a beam search "
                         "with the public model as the prior) on the listed (measured) alphas")
    ap.add_argument("--states-only", action="store_true",
                    help="run only the read of the states the server computes at the prompt positions, alone and "
                         "joined to the decoder at the point's picked weight (weights scored on the victim's "
                         "prompts: an oracle's upper bound) on the listed alphas whose prompts were decoded")
    ap.add_argument("--beam", type=int, default=BEAM,
                    help="with --decode-only or --states-only: prefixes kept by the beam search (with --decode-only, "
                         f"a beam other than {BEAM} is stored as its own family, the wider search)")
    ap.add_argument("--draws", type=int, default=1,
                    help="with --weight-key-only, --decode-only or --answers-only: fresh draws of the prompt vectors "
                         "read alone or decoded, or of the whole answering session (the spread of a point's figure)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if any(not a >= 0 for a in args.alphas):
        ap.error("every alpha must be >= 0")
    if args.draws < 1 or args.beam < 1:
        ap.error("--draws and --beam must be >= 1")
    if not args.client_temperature >= 0 or not 0 < args.client_top_p <= 1:
        ap.error("--client-temperature must be >= 0 and --client-top-p in (0, 1]")
    if args.client_top_k < 0 or not args.client_repetition_penalty > 0:
        ap.error("--client-top-k must be >= 0 and --client-repetition-penalty > 0")
    if not 0 <= args.client_min_p <= 1 or not all(-2 <= v <= 2 for v in (args.client_presence_penalty,
                                                                         args.client_frequency_penalty)):
        ap.error("--client-min-p must lie in [0, 1], --client-presence-penalty and --client-frequency-penalty in "
                 "[-2, 2]")
    sampling = (dict(temperature=args.client_temperature, top_p=args.client_top_p, top_k=args.client_top_k or -1,
                     min_p=args.client_min_p, repetition_penalty=args.client_repetition_penalty,
                     presence_penalty=args.client_presence_penalty, frequency_penalty=args.client_frequency_penalty)
                if args.client_temperature > 0 else None)
    if args.stream_tokens < 0 or args.decode_tokens < 0 or args.more_traffic < 0:
        ap.error("--stream-tokens, --decode-tokens and --more-traffic must be >= 0")
    if args.report_only:
        if not PATH.is_file():
            ap.error(f"no results yet: {PATH}")
        state = json.loads(PATH.read_text())
        write_report(state)
        write_plot(state)
        print(json.dumps(state, indent=1) if args.json else (RESULTS / "client_vocab_frontier.md").read_text())
        return 0
    torch.set_num_threads(max(1, args.threads))
    from aloe.obfuscation.commands import resolve_model

    model = resolve_model("smollm2")
    show = not args.json
    paths = deployment(model, show)
    state = json.loads(PATH.read_text()) if PATH.is_file() else {"points": {}}
    command = sys.argv[1:] if argv is None else list(argv)
    commands = state.setdefault("commands", [state.pop("command")] if state.get("command") else [])
    state.pop("command", None)
    if command not in commands:
        commands.append(command)
    for alpha in tqdm(args.alphas, desc="occurrence noise", disable=not show):
        key = repr(float(alpha))
        e = state["points"].get(key)
        if args.right_key_only:
            if e is None or "right_key_stream" not in e["attacks"]:
                ap.error(f"alpha {alpha} has no stream-level figures yet: run it without --right-key-only first")
            e["attacks"]["right_key_stream"] = right_key_only(model, alpha, paths,
                                                              e["attacks"]["right_key_stream"]["stream_tokens"])
            for n, entry in e.get("more_traffic", {}).items():
                entry["right_key_stream"] = right_key_only(model, alpha, paths, int(n))
            atomic_write_json(PATH, state)
            write_report(state)
            continue
        if args.weight_key_only:
            if e is None or "linked_stream" not in e["attacks"]:
                ap.error(f"alpha {alpha} has no stream-level figures yet: run it without --weight-key-only first")
            e["attacks"].update(weight_key_only(model, alpha, paths, e["attacks"]["linked_stream"]["stream_tokens"],
                                                True, args.draws))
            for n, entry in e.get("more_traffic", {}).items():
                entry.update(weight_key_only(model, alpha, paths, int(n), False))
            atomic_write_json(PATH, state)
            write_report(state)
            write_plot(state)
            continue
        if args.states_only:
            if e is None or "weight_key_decoded" not in e["attacks"]:
                ap.error(f"alpha {alpha} has no decoded prompts yet: run it with --decode-only first")
            e["states_oracle"] = r = weight_key_states(model, alpha, paths, args.beam,
                                                       e["attacks"]["weight_key_decoded"]["evidence_weight"], show)
            e["attacks"]["weight_key_decoded_states"] = dict(
                occurrence_recovery=r["decoded_at_prediction_weight"], prediction_weight=r["prediction_weight"],
                prediction_calibration=r["prediction_calibration"], evidence_weight=r["evidence_weight"],
                beam=r["beam"], seconds=r["seconds"])
            atomic_write_json(PATH, state)
            write_report(state)
            continue
        if args.decode_only or args.answers_only:
            if e is None:
                mode = "--decode-only" if args.decode_only else "--answers-only"
                ap.error(f"alpha {alpha} is not measured yet: run it without {mode} first")
            if args.decode_only:
                fam = "weight_key_decoded" if args.beam == BEAM else "weight_key_decoded_wide"
                e["attacks"][fam] = weight_key_decoded(model, alpha, paths, args.beam, show,
                                                                        args.draws)
            elif sampling is None:
                e["answers"] = weight_key_answers(model, alpha, paths, args.fidelity_prompts,
                                                  args.fidelity_new_tokens, show, args.draws)
            else:
                e.setdefault("answers_sampled", {})[sampling_label(sampling)] = weight_key_answers(
                    model, alpha, paths, args.fidelity_prompts, args.fidelity_new_tokens, show, args.draws, sampling)
            atomic_write_json(PATH, state)
            write_report(state)
            write_plot(state)
            continue
        if args.more_traffic:
            if e is None:
                ap.error(f"alpha {alpha} is not measured yet: run it without --more-traffic first")
            e.setdefault("more_traffic", {})[str(args.more_traffic)] = more_traffic(model, alpha, paths,
                                                                                    args.more_traffic, show)
            atomic_write_json(PATH, state)
            write_report(state)
            continue
        need = "keyed_stream" if args.stream_tokens > 0 else "linked"
        if not args.rerun and e is not None and need in e["attacks"] and (
                need == "linked" or e["attacks"][need]["stream_tokens"] >= args.stream_tokens) and (
                need == "linked" or args.decode_tokens == 0 or "decoded_stream" in e["attacks"]):
            continue
        # a point measured before the stream-level or keyed attacks keeps its fidelity; its attacks are redone
        if e is None:
            e = {"alpha": alpha, "shape": SHAPE, "fidelity": fidelity(model, alpha, paths, args.fidelity_tokens,
                                                                       args.fidelity_prompts,
                                                                       args.fidelity_new_tokens, show)}
        e["attacks"] = attacks(model, alpha, paths, args.stream_tokens, args.decode_tokens, show)
        state["points"][key] = e
        atomic_write_json(PATH, state)
        write_report(state)
        write_plot(state)
    write_report(state)
    write_plot(state)
    print(json.dumps(state, indent=1) if args.json else (RESULTS / "client_vocab_frontier.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
