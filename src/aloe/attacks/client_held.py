"""The client-held vocabulary deployment measured through the key its body gives (:mod:`aloe.attacks.weight_key`).

The server holds the body only, receives the client's noisy input vectors and returns a final hidden state per decode
step. Three reads, scored against what the client sent or picked:

- each prompt vector alone, by its likelihood through the key at the public noise level;
- each prompt decoded as text: a beam search over the noisy channel with the public model as the prior, at the
  evidence weight the attacker picks on its own simulated text (nothing of the victim's);
- the answers: for every token a greedy client picks, the hidden state it picked from, read through the key and the
  public head, alone and joined to the echo (the vector the pick comes back as in the next request).

``aloe attack-client-held`` runs them on the real prompts; ``benchmarks/client_vocab_frontier.py`` over noise levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aloe import AloeError
from aloe.attacks import weight_key
from aloe.attacks.common import Target

CALIBRATION_DOCS, CALIBRATION_TOKENS = 8, 48       # the attacker's own text for the evidence weight
CALIBRATION_WEIGHTS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def chat_prompt_ids(tokenizer, prompts: list[str]) -> list[np.ndarray]:
    """The plain ids of each prompt as one user turn of the chat template, ready for the answer."""
    return [np.asarray(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     return_dict=True)["input_ids"], dtype=np.int64) for p in prompts]


def _share(got: np.ndarray, truth: np.ndarray, keep: np.ndarray) -> float:
    return float((got == truth)[keep].mean()) if keep.any() else 0.0


@torch.no_grad()
def prompt_reads(t: Target, key: weight_key.WeightKey, client, tau: np.ndarray, prompts: list[np.ndarray],
                 own_text: np.ndarray, alpha: float, shape: str = "row", beam: int = 4, draws: int = 1,
                 progress=None) -> dict:
    """The ``prompts`` (plain ids) sent by ``client`` (a :class:`~aloe.obfuscation.client_vocab.ClientVocabulary`
    with occurrence noise ``alpha``), read by the server: decoded as text at the evidence weight it calibrates on
    ``own_text`` (its own corpus, 8 x 48 tokens), and on the same draw the decoder at weight 1, each vector alone and
    the public model alone (no vector read: the prior's guess, the floor). With ``draws`` > 1 the decoding is
    repeated on fresh draws (``occurrence_recovery_per_draw``, the first being the main figure). Scored on the
    occurrences that tau moves."""
    docs = [client.embed(tau[p]) for p in prompts]
    truth = np.concatenate(prompts)
    keep = ~np.isin(truth, t.fixed_ids)
    own = [own_text[k * CALIBRATION_TOKENS:(k + 1) * CALIBRATION_TOKENS] for k in range(CALIBRATION_DOCS)]
    own = [d for d in own if len(d)]

    def decode(vectors, evidence):
        return np.concatenate(weight_key.decode_vectors(t, key, vectors, alpha, shape, beam, evidence,
                                                        progress=progress))

    weight, calibration = weight_key.calibrate_evidence(t, key, own, alpha, shape, beam, CALIBRATION_WEIGHTS,
                                                        progress=progress)
    per_draw = [_share(decode(docs, weight), truth, keep)]
    at_one, prior = decode(docs, 1.0), decode(docs, 0.0)
    alone = weight_key.read_vectors(t, key, torch.cat(docs), alpha, shape)[:, 0]
    for _ in range(draws - 1):     # fresh draws of the prompt vectors, decoded at the weight picked once
        per_draw.append(_share(decode([client.embed(tau[p]) for p in prompts], weight), truth, keep))
    spread = {"occurrence_recovery_per_draw": per_draw} if draws > 1 else {}
    return dict(occurrence_recovery=per_draw[0], **spread, evidence_weight=weight, calibration=calibration,
                evidence_weight_1=_share(at_one, truth, keep), alone_same_draw=_share(alone, truth, keep),
                language_model_alone=_share(prior, truth, keep), occurrences=int(keep.sum()), beam=beam)


@torch.no_grad()
def state_reads(t: Target, key: weight_key.WeightKey, body, client, tau: np.ndarray, prompts: list[np.ndarray],
                alpha: float, shape: str = "row", beam: int = 4, evidence: float = 1.0,
                weights=(0.25, 0.5, 1.0), progress=None, own_text: np.ndarray | None = None) -> dict:
    """What the states the server computes at the prompt positions add (``body``: the stock causal LM loaded from the
    server folder). On one draw of the ``prompts`` sent by ``client``: the server's own forward pass over each
    prompt's vectors predicts the next prompt token through the key and the public head
    (:func:`weight_key.state_predictions`); read alone (the argmax at i - 1 for token i), and joined to the decoder at
    ``evidence`` with each prediction weight of ``weights`` beside the decoder without them (weight 0). Those weights
    are scored on the victim's own prompts, an oracle's choice no attacker has: an upper bound of what the states
    add to this decoder. With ``own_text`` (the attacker's corpus, 8 x 48 tokens of it) the attacker also picks the
    weight itself, on its own text sent through its simulation of the client
    (:func:`weight_key.calibrate_prediction_weight`), and ``decoded_at_prediction_weight`` is the victim's prompts
    read at that weight: the attack. Scored on the occurrences that tau moves."""
    docs = [client.embed(tau[p]) for p in prompts]
    preds = [weight_key.state_predictions(t, key, body, v) for v in docs]
    truth = np.concatenate(prompts)
    keep = ~np.isin(truth, t.fixed_ids)
    alone = np.concatenate([np.r_[-1, p[:-1].argmax(1).numpy()] for p in preds])
    reads = {}
    for w in (0.0, *weights):
        got = weight_key.decode_vectors(t, key, docs, alpha, shape, beam, evidence, progress=progress,
                                        predictions=preds, prediction_weight=float(w))
        reads[float(w)] = _share(np.concatenate(got), truth, keep)
    picked = {}
    if own_text is not None:
        own = [own_text[k * CALIBRATION_TOKENS:(k + 1) * CALIBRATION_TOKENS] for k in range(CALIBRATION_DOCS)]
        w, calibration = weight_key.calibrate_prediction_weight(t, key, body, [d for d in own if len(d)], alpha,
                                                                shape, beam, evidence, (0.0, *weights), progress)
        picked = dict(prediction_weight=w, prediction_calibration=calibration,
                      decoded_at_prediction_weight=reads[w])
    return dict(states_alone=_share(alone, truth, keep), decoded_by_prediction_weight=reads, evidence_weight=evidence,
                occurrences=int(keep.sum()), beam=beam, **picked)


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


REFINE = 2   # rounds of the finer search around the grid's penalties (weight_key.echo_posterior's ``refine``)


@torch.no_grad()
def answer_reads(t: Target, key: weight_key.WeightKey, server_dir: Path, client, tau: np.ndarray,
                 obf_prompts: list[np.ndarray], new_tokens: int, progress=None,
                 sampling: dict | None = None) -> dict:
    """The client decodes each of ``obf_prompts`` (server ids) with the server's body loaded here from ``server_dir``
    (fresh noise on every vector, its own head: :func:`~aloe.obfuscation.client_vocab.local_decode`): greedily, or
    with ``sampling`` (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
    ``presence_penalty``, ``frequency_penalty``: the client's own :class:`~aloe.obfuscation.client.Sampler`, keyed
    from the OS CSPRNG), and the server reads every pick from the hidden state it returned
    (:func:`weight_key.read_answers`): from the state alone, and with the echo, the vector the pick comes back as in
    the next request, under the model of the client's sampler (a penalty, temperature, top-k, top-p, min-p) under
    which the echoes are most likely (:func:`weight_key.echo_posterior`). A repetition penalty acts on the pick's
    context as the server reads it: each prompt vector alone, and the reply's earlier picks as the model without a
    penalty reads them; the presence and frequency penalties on those picks alone; the penalties found on the grid
    are then searched more finely around it (``REFINE`` rounds). Beside it, the plain softmax's read
    (``answer_recovery_with_echo_untruncated``), the truncated model's without a penalty
    (``answer_recovery_with_echo_unpenalised``) and the grid's penalties' before the finer search
    (``answer_recovery_with_echo_grid``). The server is told nothing of the client's sampling. Scored on the
    answer tokens that tau moves (the end id is not one)."""
    from transformers import AutoModelForCausalLM

    from aloe.obfuscation.client import Sampler, check_sampling
    from aloe.obfuscation.client_vocab import local_decode

    if sampling is not None:
        sampling = dict(dict(top_p=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                             frequency_penalty=0.0), **sampling)
        if not sampling.get("temperature", 0) > 0:
            raise AloeError("sampling needs a temperature > 0")
        check_sampling(sampling)

    body = AutoModelForCausalLM.from_pretrained(str(server_dir), dtype=torch.float32).eval()
    inv = np.argsort(tau)
    picked, states, echoes, echoed, prompts = [], [], [], [], []
    for x in obf_prompts:
        sent: list = []
        ids, hidden = local_decode(body, client, x, new_tokens, sent, None if sampling is None else Sampler(sampling))
        picked.append(inv[np.asarray(ids, dtype=np.int64)])
        states.append(hidden)
        prompts.append(sent[0])
        # every pick comes back as the next request's one vector, but the last of a reply cut at the token cap
        back = [v[0] for v in sent[1:]]
        echoes.append(torch.stack(back) if back else torch.empty(0, hidden.shape[1]))
        echoed.append(np.arange(len(ids)) < len(back))
        if progress is not None:
            progress.update(1)
    alpha, shape = client.occurrence_noise, client.noise_shape
    reply = np.concatenate([np.full(len(p), r) for r, p in enumerate(picked)])
    truth, hidden, echoed = np.concatenate(picked), torch.cat(states), np.concatenate(echoed)
    keep = ~np.isin(truth, t.fixed_ids)
    wanted = truth[keep]
    cand = weight_key.read_answers(t, key, hidden)   # every pick from its state alone
    sent_back = np.flatnonzero(echoed)               # the picks with an echo, in the order of their echoes
    back = torch.cat(echoes)

    def ranked(scores):
        """The picks with an echo ranked by a posterior, the others by the state alone (read_answers' own rule)."""
        read = cand.copy()
        if scores is not None:
            read[sent_back] = torch.topk(scores, cand.shape[1], dim=1).indices.numpy()
        return read

    fit = plain = None
    untruncated = unpenalised = with_echo = grid_read = cand
    if len(back):
        returned = hidden[torch.as_tensor(sent_back)]   # the states of the picks with an echo
        scores, fit, soft = weight_key.echo_posterior(t, key, returned, back, alpha, shape, plain_scores=True)
        plain = fit.pop("untruncated")
        untruncated, unpenalised = ranked(soft), ranked(scores)
        del soft
        # a repetition penalty acts on the pick's context: the prompt and the reply so far, as the server reads
        # them (each prompt vector alone, special ids included; the picks before it with their echoes, as the
        # model without a penalty reads them); the presence and frequency penalties on the reply's picks alone,
        # repeats counted; the penalised fit is kept where the echoes are likelier under it
        context = [weight_key.read_vectors(t, key, v, alpha, shape, every_id=True)[:, 0] for v in prompts]
        start = np.r_[0, np.cumsum([len(p) for p in picked])]
        replied = [unpenalised[start[reply[j]]:j, 0] for j in sent_back]
        seen = [np.unique(np.r_[context[reply[j]], r]) for j, r in zip(sent_back, replied)]
        penalised, pfit, on_grid = weight_key.echo_posterior(
            t, key, returned, back, alpha, shape, seen=seen,
            penalties=[r for r in weight_key.ECHO_PENALTIES if r != 1.0], replied=replied,
            output_penalties=weight_key.ECHO_OUTPUT_PENALTIES, combined=True, refine=REFINE, grid_scores=True)
        pfit.pop("untruncated")
        # beside it, the read the grid's own penalties give (before the finer search), by the same rule
        grid_read = ranked(on_grid if pfit["grid"]["log_marginal"] > fit["log_marginal"] else scores)
        if pfit["log_marginal"] > fit["log_marginal"]:
            scores, fit = penalised, pfit
        with_echo = ranked(scores)
        del scores, penalised, on_grid

    def share(read):
        return float((read[keep, 0] == wanted).mean()) if keep.any() else 0.0

    return dict(answer_tokens=int(keep.sum()), distinct_answer_tokens=int(len(np.unique(wanted))),
                answer_recovery=share(cand),
                answer_recovery_top10=float((cand[keep, :10] == wanted[:, None]).any(1).mean()) if keep.any() else 0.0,
                answer_recovery_with_echo=share(with_echo), echoed_answer_tokens=int((keep & echoed).sum()),
                answer_recovery_with_echo_unpenalised=share(unpenalised),
                answer_recovery_with_echo_grid=share(grid_read),
                answer_recovery_with_echo_untruncated=share(untruncated),
                echo_temperature=None if fit is None else fit["temperature"], echo_sampler=fit,
                echo_temperature_untruncated=None if plain is None else plain["temperature"],
                prompts=len(obf_prompts), new_tokens=new_tokens,
                client_sampling=None if sampling is None else {k: sampling[k] for k in SAMPLING_KEYS})
