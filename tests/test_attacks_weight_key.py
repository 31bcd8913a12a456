"""Weight-side key recovery: the exact-norm writer key read off the transformer body, then every row through it."""

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.attacks import weight_key as wk
from aloe.attacks.common import Budget, Target
from aloe.attacks.suite import run, synthetic_texts
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
from aloe.obfuscation.secret import load_secret
from obfuscation_helpers import tiny_model

CALIBRATION = np.arange(3, 97).repeat(3)


def build(tmp, kind, name, prof):
    plain = tiny_model(kind, tmp / f"{kind}-plain")
    out = tmp / f"{kind}-{name}"
    obfuscate_checkpoint(plain, out, tmp / f"{kind}-{name}.json", prof, progress=False, calibration_ids=CALIBRATION)
    return plain, out, load_secret(tmp / f"{kind}-{name}.json").tau


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "qwen2-gqa3-bias-untied"])
def test_the_body_gives_the_exact_norm_key_and_every_row_through_it(kind, tmp_path, monkeypatch):
    """Exact-norm keys without noise: the key the body gives maps the obfuscated embedding and head rows back onto
    the plain ones up to rounding. With row noise of the rows' own size the table attack that reads invariants (NN)
    finds nothing, and the rows read through that key are every id."""
    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    plain, obf, tau = build(tmp_path, kind, "exact", PROFILES["exact"].with_overrides(name="e", h=8))
    t = Target(plain, obf, Budget(topk=5, seed=1))
    key = wk.recover(t)
    s = key.summary()
    assert s["subspace_gap"] < 1e-4 and s["gram_residual"] < 1e-4 and s["sign_agreement"] > 0.99
    ti = torch.as_tensor(tau)
    for got, want in ((key.embed_side(t.obf_embed[ti]), t.plain_embed), (key.head_side(t.obf_head[ti]), t.plain_head)):
        assert float((got - want).norm() / want.norm()) < 1e-4
    noisy = PROFILES["balanced"].with_overrides(name="b", h=8, alpha_e=1.0, alpha_h=1.0, noise_shape="row")
    plain, obf, tau = build(tmp_path, kind, "noisy", noisy)
    t = Target(plain, obf, Budget(topk=5, seed=1))
    r = run(t, ["nn", "weight-key"], tau, synthetic_texts(t.arch.vocab, t.fixed_ids, t.budget), progress=False)
    assert r["nn"]["token_recovery"] <= 0.2           # 0-7.4% over 40 draws
    w = r["weight-key"]
    assert w["token_recovery"] >= 0.95 and w["prompt_token_recovery"] >= 0.95
    assert w["sides"] == 2 and w["gram_residual"] < 1e-4


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "qwen2-gqa3-bias-untied"])
def test_the_body_gives_the_paper_keys_too(kind, tmp_path, monkeypatch):
    """The paper's design writes through a fresh key per writer and a non-isometric base: the writers span d + h/2
    directions and no rotation explains the gates, but every reader maps that span to the plain space through one
    linear map, which the gates' Gram matrices give up to a sign per direction and their mean rows fix. The tables
    map back to rounding without noise; with the paper's own noise on both tables (alpha 1, as large as the
    entries), where IA and NN read little, every id is read."""
    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    prof = PROFILES["paper"].with_overrides(name="p", h=8, alpha_e=0.0, alpha_h=0.0, beta=4, gamma=10.0)
    plain, obf, tau = build(tmp_path, kind, "paper", prof)
    t = Target(plain, obf, Budget(topk=5, seed=1))
    key = wk.recover(t)
    s = key.summary()
    assert s["key_design"] == "linear" and s["subspace_rank"] == t.arch.d + 4
    assert s["subspace_gap"] < 1e-4 and s["gram_residual"] < 1e-4 and s["sign_agreement"] > 0.99
    ti = torch.as_tensor(tau)
    for got, want in ((key.embed_side(t.obf_embed[ti]), t.plain_embed), (key.head_side(t.obf_head[ti]), t.plain_head)):
        assert float((got - want).norm() / want.norm()) < 1e-4
    x = t.plain_embed[:7].double()
    assert torch.allclose(key.embed_side(key.write(x)), x, atol=1e-8)
    plain, obf, tau = build(tmp_path, kind, "paper-noisy", prof.with_overrides(alpha_e=1.0, alpha_h=1.0))
    t = Target(plain, obf, Budget(topk=5, seed=1))
    r = run(t, ["ia", "nn", "weight-key"], tau, synthetic_texts(t.arch.vocab, t.fixed_ids, t.budget), progress=False)
    assert r["ia"]["token_recovery"] <= 0.35 and r["nn"]["token_recovery"] <= 0.35
    w = r["weight-key"]
    assert w["token_recovery"] >= 0.95 and w["prompt_token_recovery"] >= 0.95 and w["key_design"] == "linear"


def _client_held_stream(tmp_path, prof, noise=2.5, n=600):
    """A tiny Llama obfuscated with ``prof`` and split for the client-held deployment with occurrence noise
    ``noise``: the server's target, ``n`` vectors a client sent, their plain ids, and their read through the writer
    key itself (fitted with the secret on the client's table, for measurement)."""
    from aloe.attacks import key_regression as kr
    from aloe.obfuscation.client_vocab import ClientVocabulary, split_vocabulary

    plain, obf, tau = build(tmp_path, "llama-gqa-tied", prof.name, prof)
    split_vocabulary(obf, tmp_path / "server", tmp_path / "client.st", occurrence_noise=noise)
    t = Target(plain, tmp_path / "server", Budget(topk=5, seed=1))
    client = ClientVocabulary(tmp_path / "client.st")
    truth = np.random.default_rng(0).choice(t.movable_ids, n)
    sent = client.embed(tau[truth])
    ids = torch.as_tensor(t.movable_ids)
    K = torch.linalg.lstsq(t.plain_embed[ids].double(), client.embed_table[torch.as_tensor(tau)][ids].double()).solution
    right = kr.read([(kr.back_project(sent, K), t.plain_embed, noise ** 2 / sent.shape[1])], t.movable_ids, 5, True)
    return t, sent, truth, right


def test_client_held_vectors_are_read_through_the_key_the_body_gives(tmp_path, monkeypatch):
    """The client-held deployment with fresh noise on every vector: no row to fit a key on, yet the key the body
    gives reads the vectors as the writer key itself does (fitted here with the secret on the client's table), and
    pooling the occurrences of a token adds their evidence. At alpha 2.5, over 20 draws: alone 57.5-64%, the same
    first choice as the writer key for 99.8-100% of the vectors, pooled 98.7-100%."""
    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    t, sent, truth, right = _client_held_stream(tmp_path, PROFILES["balanced"].with_overrides(name="b", h=8))
    key = wk.recover(t)
    got = wk.read_vectors(t, key, sent, 2.5)
    assert got.shape == (600, 5) and 0.5 <= (got[:, 0] == truth).mean() <= 0.75
    assert (got[:, 0] == right[:, 0]).mean() >= 0.99
    pooled = wk.read_vectors(t, key, sent, 2.5, groups=np.unique(truth, return_inverse=True)[1])
    assert (pooled[:, 0] == truth).mean() >= 0.97
    assert (wk.attack(t, t.movable_ids).candidates == -1).all()          # no table rows held: no claim
    with pytest.raises(AloeError, match="noise shape"):
        wk.read_vectors(t, key, sent, 2.5, shape="column")


@pytest.mark.parametrize("design", ["exact", "paper"])
@pytest.mark.parametrize("kind", ["qwen3-moe", "qwen2-moe-shared", "mixtral", "mistral", "granite", "smollm3", "phi3",
                                  "gemma"])
def test_moe_and_newer_dense_bodies_give_the_key_through_their_gates(kind, design, tmp_path, monkeypatch):
    """Sparse MoE blocks (every expert obfuscated as an FFN with its own unit permutation, the experts moved to
    secret slots, a dense layer among them in the Qwen3-MoE model, a shared expert in the Qwen2-MoE one): the gates
    summed over every expert are free of both permutations, and the key they give maps both tables back onto the
    plain ones up to rounding. The dense architectures added since (Mistral, Granite with its multipliers, SmolLM3
    with layers without RoPE) give it the same way, with the exact-norm keys and with the paper's."""
    from test_obfuscation_arch import ROUTERS, tiny

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    plain = tiny(kind, tmp_path / "plain")
    prof = PROFILES[design].with_overrides(name="e", h=8, alpha_e=0.0, alpha_h=0.0)
    obfuscate_checkpoint(plain, tmp_path / "obf", tmp_path / "s.json", prof, progress=False,
                         calibration_ids=CALIBRATION)
    tau = torch.as_tensor(load_secret(tmp_path / "s.json").tau)
    t = Target(plain, tmp_path / "obf", Budget(topk=5, seed=1))
    layers = [wk.ffn_parts(t, layer)[0] for layer in range(t.arch.n_layers)]
    assert any(len(g) >= t.arch.n_experts > 1 for g in layers) == (kind in ROUTERS)
    key = wk.recover(t)
    s = key.summary()
    assert s["subspace_gap"] < 1e-4 and s["gram_residual"] < 1e-4 and s["sign_agreement"] > 0.99
    assert s["key_design"] == {"exact": "isometry", "paper": "linear"}[design]
    for got, want in ((key.embed_side(t.obf_embed[tau]), t.plain_embed),
                      (key.head_side(t.obf_head[tau]), t.plain_head)):
        assert float((got - want).norm() / want.norm()) < 1e-4
    r = run(t, ["weight-key"], tau.numpy(), synthetic_texts(t.arch.vocab, t.fixed_ids, t.budget), progress=False)
    assert r["weight-key"]["token_recovery"] == 1.0


def test_a_body_without_a_gated_ffn_or_with_sandwich_norms_is_refused(tmp_path, monkeypatch):
    from test_obfuscation_arch import tiny

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    plain, obf, _ = build(tmp_path, "llama-gqa-tied", "e", PROFILES["exact"].with_overrides(name="e", h=8))
    t = Target(plain, obf, Budget(topk=5, seed=1))
    assert t.has_weight(f"model.layers.0.{wk.GATE}.weight") and not t.has_weight("model.layers.0.mlp.experts")
    monkeypatch.setattr(t, "has_weight", lambda name: wk.GATE not in name)   # a body whose FFNs have no gate
    with pytest.raises(AloeError, match="gated FFNs, dense or sparse MoE; layer 0 has neither"):
        wk.recover(t)
    g3 = tiny("gemma3", tmp_path / "g3")
    obfuscate_checkpoint(g3, tmp_path / "g3-obf", tmp_path / "g3.json", PROFILES["exact"].with_overrides(name="e", h=8),
                         progress=False)
    with pytest.raises(AloeError, match="sandwich norms force another key, which the post-norm attack reads"):
        wk.recover(Target(g3, tmp_path / "g3-obf", Budget(topk=5, seed=1)))


def test_the_answers_are_read_from_the_hidden_states_the_server_returns(tmp_path, monkeypatch):
    """Client-held vocabulary: the client decodes greedily with its own head from the final hidden state the server
    returns. The server maps that state through the key its body gives and applies the public head: without
    occurrence noise it reads every pick (the decode loop is the artifact's own greedy decoding); with fresh noise on
    every vector sent (alpha 1) it still reads most picks, since the client reads the noisy state too. Over 20
    draws at alpha 1: 93.8-99.0%. Joined to the echo, the noisy vector each pick comes back as with the next
    request, it reads them all (15 of 15 draws: 100%, against 92-98% from the state alone)."""
    from transformers import AutoModelForCausalLM

    from aloe.obfuscation.client_vocab import ClientVocabulary, local_decode, split_vocabulary

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    plain, obf, tau = build(tmp_path, "llama-gqa-tied", "bal", PROFILES["balanced"].with_overrides(name="b", h=8))
    inv = np.argsort(tau)
    prompts = [tau[np.random.default_rng(k).choice(np.arange(3, 97), 8)] for k in range(6)]
    full = AutoModelForCausalLM.from_pretrained(obf, dtype=torch.float32).eval()
    for alpha, least in ((0.0, 1.0), (1.0, 0.8)):
        server = tmp_path / f"server-{alpha}"
        split_vocabulary(obf, server, tmp_path / f"client-{alpha}.st", occurrence_noise=alpha)
        t = Target(plain, server, Budget(topk=5, seed=1))
        client = ClientVocabulary(tmp_path / f"client-{alpha}.st")
        body = AutoModelForCausalLM.from_pretrained(server, dtype=torch.float32).eval()
        key = wk.recover(t)
        picked, states, echoes = [], [], []
        for p in prompts:
            sent: list = []
            ids, hidden = local_decode(body, client, p, 16, sent)
            assert hidden.shape == (len(ids), body.config.hidden_size)
            assert len(sent) in (len(ids), len(ids) + 1) and sent[0].shape == (len(p), body.config.hidden_size)
            echoes.append(torch.stack([v[0] for v in sent[1:]]) if len(sent) > 1 else torch.empty(0, 0))
            if alpha == 0.0:   # the artifact's own greedy decoding, up to the end id where it stops
                want = full.generate(torch.as_tensor(p)[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
                assert ids == want[:len(ids)]
            picked.append(inv[np.asarray(ids)])
            states.append(hidden)
        truth = np.concatenate(picked)
        got = wk.read_answers(t, key, torch.cat(states))
        assert got.shape == (len(truth), 5) and (got[:, 0] == truth).mean() >= least, alpha
        # with the echo, the vector each pick comes back as (a reply cut at the token cap does not send its last)
        both = [(h[: len(e)], e, pk[: len(e)]) for h, e, pk in zip(states, echoes, picked) if len(e)]
        h, e, want = (torch.cat([b[0] for b in both]), torch.cat([b[1] for b in both]),
                      np.concatenate([b[2] for b in both]))
        with_echo = wk.read_answers(t, key, h, echoes=e, alpha=alpha)[:, 0]
        alone = wk.read_answers(t, key, h)[:, 0]
        assert (with_echo == want).mean() >= max((alone == want).mean(), 0.97 if alpha else 1.0), alpha
        with pytest.raises(AloeError, match="echoes"):
            wk.read_answers(t, key, h[:1], echoes=e[:2], alpha=alpha)


def test_the_stream_decoded_with_the_public_model_as_prior(tmp_path, monkeypatch):
    """Client-held vectors read as text: without evidence the beam search is the public model's own greedy
    continuation of its start id; without noise it is the text sent; and on text the public model predicts (its own
    greedy continuations), at a noise level where each vector alone reads about half, the prior lifts the read. Over
    6 draws at alpha 2.5: alone 55-66%, decoded 89-99%."""
    from transformers import AutoModelForCausalLM

    from aloe.obfuscation.client_vocab import ClientVocabulary, split_vocabulary

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    plain = tiny_model("llama-gqa-tied", tmp_path / "plain")
    lm = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        lm.model.norm.weight.mul_(6.0)   # a confident language model, as a trained one is on its own continuations
    lm.save_pretrained(plain)
    obfuscate_checkpoint(plain, tmp_path / "obf", tmp_path / "s.json", PROFILES["balanced"].with_overrides(
        name="b", h=8), progress=False, calibration_ids=CALIBRATION)
    obf, tau = tmp_path / "obf", load_secret(tmp_path / "s.json").tau
    bos = lm.config.bos_token_id
    with torch.no_grad():
        texts = [lm.generate(torch.tensor([[bos, int(s)]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                             max_new_tokens=11, do_sample=False, eos_token_id=None)[0, 1:].numpy()
                 for s in np.random.default_rng(0).choice(np.arange(3, 97), 8, replace=False)]
    for alpha in (0.0, 2.5):
        split_vocabulary(obf, tmp_path / f"s{alpha}", tmp_path / f"c{alpha}.st", occurrence_noise=alpha)
        t = Target(plain, tmp_path / f"s{alpha}", Budget(topk=5, seed=1))
        client = ClientVocabulary(tmp_path / f"c{alpha}.st")
        key = wk.recover(t)
        docs = [client.embed(tau[x]) for x in texts]
        decoded = wk.decode_vectors(t, key, docs, alpha, beam=4)
        assert [len(d) for d in decoded] == [len(x) for x in texts]
        truth, got = np.concatenate(texts), np.concatenate(decoded)
        if alpha == 0.0:
            assert (got == truth).all()
            alone = wk.decode_vectors(t, key, docs[:1], alpha, beam=1, evidence=0.0)[0]
            with torch.no_grad():
                want = lm.generate(torch.tensor([[bos]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                                   max_new_tokens=len(alone), do_sample=False, eos_token_id=None)[0, 1:].numpy()
            assert (alone == want).all()
        else:
            each = wk.read_vectors(t, key, torch.cat(docs), alpha)[:, 0]
            assert (each == truth).mean() <= 0.8 and (got == truth).mean() >= (each == truth).mean() + 0.15
    # the attacker's own simulation of the client: through the key the body gives, its rows are the plain ones
    ids = np.asarray(t.movable_ids[:20])
    assert float((key.embed_side(wk.simulate_vectors(t, key, ids, 0.0)) - t.plain_embed[ids]).abs().max()) < 1e-4
    weight, reads = wk.calibrate_evidence(t, key, texts[:4], alpha, beam=2, weights=(0.5, 1.0))
    assert set(reads) == {0.5, 1.0} and reads[weight] == max(reads.values())
    with pytest.raises(AloeError, match="beam"):
        wk.decode_vectors(t, key, docs, alpha, beam=0)


def test_the_states_at_the_prompt_positions_are_the_models_own_next_token_predictions(tmp_path, monkeypatch):
    """The server computes a final hidden state at every prompt position. Through the key its body gives and the
    public head, without occurrence noise, those states are the plain model's own next-token log-probabilities on
    the plain prompt; the decoder joins them at a weight, and weight 0 is the decoder without them. The attacker
    picks that weight on its own text, the one that reads most of it."""
    from transformers import AutoModelForCausalLM

    from aloe.attacks import client_held
    from aloe.obfuscation.client_vocab import ClientVocabulary, split_vocabulary

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    plain, obf, tau = build(tmp_path, "llama-gqa-tied", "bal", PROFILES["balanced"].with_overrides(name="b", h=8))
    split_vocabulary(obf, tmp_path / "server", tmp_path / "client.st", occurrence_noise=0.0)
    t = Target(plain, tmp_path / "server", Budget(topk=5, seed=1))
    client = ClientVocabulary(tmp_path / "client.st")
    body = AutoModelForCausalLM.from_pretrained(tmp_path / "server", dtype=torch.float32).eval()
    lm = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    key = wk.recover(t)
    prompts = [np.random.default_rng(k).choice(np.arange(3, 97), 10) for k in range(3)]
    for p in prompts:
        got = wk.state_predictions(t, key, body, client.embed(tau[p]))
        with torch.no_grad():
            want = torch.log_softmax(lm(input_ids=torch.as_tensor(p)[None]).logits[0].double(), -1)[:, : t.arch.vocab]
        assert got.shape == (len(p), t.arch.vocab)
        assert float((got.double() - want).abs().max()) < 1e-3
    docs = [client.embed(tau[p]) for p in prompts]
    with pytest.raises(AloeError, match="prediction tables"):
        wk.decode_vectors(t, key, docs, 0.0, predictions=[], prediction_weight=1.0)
    out = client_held.state_reads(t, key, body, client, tau, prompts, 0.0, beam=2, weights=(1.0,))
    plain_decode = np.concatenate(wk.decode_vectors(t, key, docs, 0.0, beam=2))
    truth = np.concatenate(prompts)
    assert set(out["decoded_by_prediction_weight"]) == {0.0, 1.0}
    assert out["decoded_by_prediction_weight"][0.0] == (plain_decode == truth).mean() == 1.0
    alone = np.concatenate([np.r_[-1, wk.state_predictions(t, key, body, d)[:-1].argmax(1).numpy()] for d in docs])
    assert out["states_alone"] == pytest.approx((alone == truth).mean())
    # the attacker picks the weight on its own text: without noise every weight reads all of it, and the smallest
    # wins the tie; the victim's prompts are then read at that weight
    own = np.random.default_rng(7).choice(np.arange(3, 97), 8 * 48)
    out = client_held.state_reads(t, key, body, client, tau, prompts, 0.0, beam=2, weights=(1.0,), own_text=own)
    assert out["prediction_calibration"] == {0.0: 1.0, 1.0: 1.0} and out["prediction_weight"] == 0.0
    assert out["decoded_at_prediction_weight"] == out["decoded_by_prediction_weight"][0.0]
    # and where one weight reads more of its own text, that one
    real = wk.decode_vectors

    def decode(*a, prediction_weight=0.0, **kw):
        got = real(*a, prediction_weight=prediction_weight, **kw)
        return got if prediction_weight == 0.5 else [np.zeros_like(g) for g in got]

    monkeypatch.setattr(wk, "decode_vectors", decode)
    w, reads = wk.calibrate_prediction_weight(t, key, body, [own[:48], own[48:96]], 0.0, beam=2)
    assert w == 0.5 and reads[0.5] == 1.0 and max(v for k, v in reads.items() if k != 0.5) < 0.1, reads


def test_the_kept_set_of_a_clients_top_k_and_top_p_is_transformers_own():
    """`_kept_counts` (the truncation the echo read models) keeps as many tokens as transformers' own temperature,
    top-k, top-p and min-p warpers leave finite, the sampler the client runs."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    for T, p, k, mp in ((1.0, 0.9, 0, 0.0), (0.7, 0.95, 40, 0.0), (1.0, 1.0, 50, 0.0), (1.5, 0.8, 0, 0.0),
                        (0.5, 0.9, 20, 0.0), (1.0, 1.0, 0, 0.1), (0.8, 0.95, 40, 0.05), (1.5, 1.0, 0, 0.05),
                        (1.0, 0.8, 0, 0.3)):
        procs = ([TemperatureLogitsWarper(T)] + ([TopKLogitsWarper(k)] if k else [])
                 + ([TopPLogitsWarper(p)] if p < 1 else []) + ([MinPLogitsWarper(mp)] if mp else []))
        want = torch.isfinite(LogitsProcessorList(procs)(torch.zeros(64, 1, dtype=torch.long), logits)).sum(1)
        ranked = torch.sort(logits, 1, descending=True).values
        logq = torch.log_softmax(ranked / T, -1)
        cum = torch.cumsum(logq.exp(), 1)
        within = wk._min_p_counts(-logq, mp) if mp else None
        assert torch.equal(wk._kept_counts(cum, p, k, within), want), (T, p, k, mp)


def _echo_stub(monkeypatch, V=300, d=24, m=600, s2=4.0):
    """States whose head is the client's own (the key the identity), a public head and table, and a sampler that
    draws each pick from the client's processed logits and sends back its row plus noise of variance s2."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    H, E = torch.randn(V, d, generator=g, dtype=torch.float64), torch.randn(V, d, generator=g)
    h = torch.randn(m, d, generator=g, dtype=torch.float64) * 0.8
    t = SimpleNamespace(arch=SimpleNamespace(vocab=V), plain_head=H, plain_embed=E, profile={})
    key = SimpleNamespace(embed_side=lambda x: x.double())
    monkeypatch.setattr(wk, "_vector_sigma2", lambda *a: s2)

    def sample(procs, context):
        scores = procs(context, (h @ H.T).float())
        pick = torch.multinomial(torch.softmax(scores, -1), 1, generator=g)[:, 0]
        return pick, E[pick] + torch.randn(m, d, generator=g) * s2 ** 0.5

    return t, key, h, H, g, sample


def _frequency_penalty_client(h, H, g, frequency):
    """Each state's reply so far (8 earlier picks among its 20 likeliest tokens, some twice) and a client that puts
    OpenAI's frequency penalty on them (its own `OutputPenalty`)."""
    from aloe.obfuscation.client import OutputPenalty

    top = torch.topk(h @ H.T, 20, 1).indices
    replied = [top[i, torch.randint(0, 20, (8,), generator=g)].numpy() for i in range(len(h))]

    def client(context, scores):
        out = scores.clone()
        for i, ids in enumerate(replied):
            pen = OutputPenalty(0.0, frequency)
            pen.start = 0   # every id here is an earlier pick of the reply
            out[i] = pen(torch.as_tensor(ids)[None], scores[i:i + 1])[0]
        return out

    return replied, client


def test_the_echo_read_fits_the_clients_truncation(monkeypatch):
    """The echo posterior models the client's sampler as the state's softmax truncated to its top-k and top-p
    nucleus, fitted by the marginal likelihood of the echoes: on states whose head is the client's own, a client
    sampling from the 0.8 nucleus is fitted as one (T 1, top-p 0.8), a client that does not truncate as the plain
    softmax, and the truncated model reads at least what the softmax model reads."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    t, key, h, _, _, sample = _echo_stub(monkeypatch)
    for p in (1.0, 0.8):
        procs = LogitsProcessorList([TemperatureLogitsWarper(1.0)] + ([TopPLogitsWarper(p)] if p < 1 else []))
        pick, echo = sample(procs, torch.zeros(len(h), 1, dtype=torch.long))
        got, fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry")
        plain, plain_fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry", top_ps=(1.0,), top_ks=(0,),
                                             min_ps=(0.0,))
        assert fit["temperature"] == 1.0 and fit["log_marginal"] >= plain_fit["log_marginal"], fit
        assert plain_fit["floor"] is None and plain_fit["log_marginal"] == fit["untruncated"]["log_marginal"]
        if p == 1.0:
            assert fit["floor"] is None and (fit["top_p"], fit["top_k"]) == (1.0, 0), fit
        else:
            assert fit["floor"] is not None and (fit["top_p"], fit["top_k"], fit["min_p"]) == (0.8, 0, 0.0), fit
        read, read_plain = ((s.argmax(1) == pick).double().mean() for s in (got, plain))
        assert read >= read_plain and read > 0.7, (read, read_plain)


def test_the_echo_read_fits_the_clients_repetition_penalty(monkeypatch):
    """With each pick's context as the server reads it, the echo posterior also fits the client's repetition
    penalty (transformers' processor, here 1.3 on 10 of each state's 30 most likely tokens): the fit finds 1.3, and
    reads more than the model without a penalty (80.3% against 78.3%). Contexts that do not match the echoes, or an
    empty one, are refused."""
    from transformers import RepetitionPenaltyLogitsProcessor

    t, key, h, H, g, sample = _echo_stub(monkeypatch)
    top = torch.topk(h @ H.T, 30, 1).indices
    seen = [top[i, torch.randperm(30, generator=g)[:10]].numpy() for i in range(len(h))]
    pick, echo = sample(RepetitionPenaltyLogitsProcessor(1.3), torch.as_tensor(np.stack(seen)))
    got, fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry", seen=seen, penalties=wk.ECHO_PENALTIES)
    plain, plain_fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry")
    assert fit["repetition_penalty"] == 1.3 and plain_fit["repetition_penalty"] == 1.0, fit
    assert fit["log_marginal"] > plain_fit["log_marginal"]
    read, read_plain = ((s.argmax(1) == pick).double().mean() for s in (got, plain))
    assert read > read_plain, (read, read_plain)
    with pytest.raises(AloeError, match="contexts"):
        wk.echo_posterior(t, key, h, echo, 0.0, "entry", seen=seen[:-1], penalties=wk.ECHO_PENALTIES)
    with pytest.raises(AloeError, match="context needs"):
        wk.echo_posterior(t, key, h, echo, 0.0, "entry", seen=[np.zeros(0, dtype=np.int64), *seen[1:]],
                          penalties=wk.ECHO_PENALTIES)


def test_the_echo_read_fits_a_min_p_client(monkeypatch):
    """A client that samples at temperature 1 from the min-p 0.1 set is fitted as one, and the fitted model reads
    more than the softmax alone."""
    from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper

    t, key, h, _, _, sample = _echo_stub(monkeypatch)
    pick, echo = sample(LogitsProcessorList([TemperatureLogitsWarper(1.0), MinPLogitsWarper(0.1)]),
                        torch.zeros(len(h), 1, dtype=torch.long))
    got, fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry")
    plain, plain_fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry", top_ps=(1.0,), top_ks=(0,), min_ps=(0.0,))
    # (a top-p of 0.9 may come with it: on these states it cuts few rows' min-p sets any further)
    assert (fit["min_p"], fit["top_k"], fit["temperature"]) == (0.1, 0, 1.0) and fit["top_p"] >= 0.9, fit
    assert fit["log_marginal"] > plain_fit["log_marginal"]
    read, read_plain = ((s.argmax(1) == pick).double().mean() for s in (got, plain))
    assert read > read_plain, (read, read_plain)


def test_the_echo_read_fits_the_clients_presence_and_frequency_penalties(monkeypatch):
    """With the reply's earlier picks as the server reads them, the echo posterior fits OpenAI's presence and
    frequency penalties (the client's `OutputPenalty`, here frequency 1 on earlier picks drawn among each state's
    20 most likely tokens, some twice): the fit finds (0, 1) and reads more than the model without a penalty.
    Replies that do not match the echoes are refused."""
    t, key, h, H, g, sample = _echo_stub(monkeypatch)
    replied, client = _frequency_penalty_client(h, H, g, 1.0)

    pick, echo = sample(client, torch.zeros(len(h), 1, dtype=torch.long))
    got, fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry", replied=replied,
                                 output_penalties=((0.0, 0.0), *wk.ECHO_OUTPUT_PENALTIES))
    plain, plain_fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry")
    assert (fit["presence_penalty"], fit["frequency_penalty"], fit["repetition_penalty"]) == (0.0, 1.0, 1.0), fit
    assert fit["log_marginal"] > plain_fit["log_marginal"]
    read, read_plain = ((s.argmax(1) == pick).double().mean() for s in (got, plain))
    assert read > read_plain, (read, read_plain)
    with pytest.raises(AloeError, match="replies"):
        wk.echo_posterior(t, key, h, echo, 0.0, "entry", replied=replied[:-1], output_penalties=((0.0, 1.0),))


def test_the_echo_read_fits_a_client_that_sets_both_kinds_of_penalty(monkeypatch):
    """A client with a repetition penalty (1.3 on 10 of each state's 30 likeliest tokens, its context) and OpenAI's
    frequency penalty (1 on earlier picks of its reply, applied after, as transformers' order and the client's
    sampler do) is fitted as one with both when the grid combines them, and reads at least what the best single
    penalty reads."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from aloe.obfuscation.client import OutputPenalty

    t, key, h, H, g, sample = _echo_stub(monkeypatch)
    top = torch.topk(h @ H.T, 30, 1).indices
    seen = [top[i, torch.randperm(30, generator=g)[:10]].numpy() for i in range(len(h))]
    replied = [top[i, torch.randint(0, 30, (8,), generator=g)].numpy() for i in range(len(h))]

    def client(context, scores):
        out = RepetitionPenaltyLogitsProcessor(1.3)(context, scores.clone())
        for i, ids in enumerate(replied):
            pen = OutputPenalty(0.0, 1.0)
            pen.start = 0   # every id here is an earlier pick of the reply
            out[i] = pen(torch.as_tensor(ids)[None], out[i:i + 1])[0]
        return out

    pick, echo = sample(client, torch.as_tensor(np.stack(seen)))
    grid = dict(seen=seen, penalties=wk.ECHO_PENALTIES, replied=replied, output_penalties=wk.ECHO_OUTPUT_PENALTIES)
    got, fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry", combined=True, **grid)
    single, single_fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry", **grid)
    assert (fit["repetition_penalty"], fit["presence_penalty"], fit["frequency_penalty"]) == (1.3, 0.0, 1.0), fit
    assert single_fit["repetition_penalty"] == 1.0 or single_fit["frequency_penalty"] == 0.0   # one kind only
    assert fit["log_marginal"] > single_fit["log_marginal"]
    read, read_single = ((s.argmax(1) == pick).double().mean() for s in (got, single))
    assert read >= read_single, (read, read_single)


def test_the_echo_read_refines_a_penalty_off_its_grid(monkeypatch):
    """A client with a frequency penalty of 0.3, which the grid does not hold (0.5 and 1 are its values): the grid
    fits one of its own (as a presence or a frequency penalty: on ids picked once they act alike), and the finer
    search around it comes closer to 0.3, at a likelihood no lower. The grid's own fit and scores are given beside
    the refined ones."""
    t, key, h, H, g, sample = _echo_stub(monkeypatch, m=800)
    replied, client = _frequency_penalty_client(h, H, g, 0.3)

    pick, echo = sample(client, torch.zeros(len(h), 1, dtype=torch.long))
    kw = dict(replied=replied, output_penalties=wk.ECHO_OUTPUT_PENALTIES)
    got, fit, grid_scores = wk.echo_posterior(t, key, h, echo, 0.0, "entry", refine=2, grid_scores=True, **kw)
    grid = fit["grid"]

    def once(f):   # what a penalty takes off an id picked once (most of these picks): presence + frequency
        return f["presence_penalty"] + f["frequency_penalty"]

    assert once(grid) in (0.5, 1.0) and abs(once(fit) - 0.3) < abs(once(grid) - 0.3), fit
    assert fit["log_marginal"] >= grid["log_marginal"]
    only_grid, grid_fit = wk.echo_posterior(t, key, h, echo, 0.0, "entry", **kw)
    assert torch.equal(grid_scores, only_grid) and grid_fit["log_marginal"] == grid["log_marginal"]
    # without the finer search the grid's scores are the read itself
    same, same_fit, same_grid = wk.echo_posterior(t, key, h, echo, 0.0, "entry", grid_scores=True, **kw)
    assert torch.equal(same, same_grid) and torch.equal(same, only_grid)
    assert same_fit["grid"]["log_marginal"] == same_fit["log_marginal"]
    with pytest.raises(ValueError, match="not both"):
        wk.echo_posterior(t, key, h, echo, 0.0, "entry", grid_scores=True, plain_scores=True, **kw)


@pytest.mark.parametrize("alpha_e,shape,floor,pooled_floor", [(0.0, "entry", 0.45, 0.95), (0.5, "row", 0.35, 0.9)])
def test_a_paper_keyed_client_held_stream_is_read_through_the_linear_key(tmp_path, monkeypatch, alpha_e, shape,
                                                                         floor, pooled_floor):
    """The client-held deployment on the paper's keys (no profile serves one), occurrence noise 2.5: the linear key
    the body gives reads the sent vectors, whitened (the fresh noise is isotropic in the subspace's coordinates, not
    once mapped to the plain ones), better than the same key read as if the noise were isotropic in the plain space,
    and at least as well as the writer key fitted with the secret and read that way; pooled by token, almost all.
    Over 12 draws without table noise: whitened 52.2-59.5%, isotropic 40.2-48.8%, the writer key 44.0-54.5%, pooled
    98.5-100%; over 13 with row noise 0.5 on the table: 40.0-45.2%, 27.0-33.0%, 25.8-31.3%, pooled 93.3-99.0%."""
    from aloe.attacks import key_regression as kr

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path))
    prof = PROFILES["paper"].with_overrides(name="p", h=8, alpha_e=alpha_e, alpha_h=0.0, beta=4, gamma=10.0,
                                            noise_shape=shape)
    t, sent, truth, right = _client_held_stream(tmp_path, prof)
    key = wk.recover(t)
    assert key.design == "linear"
    alone = (wk.read_vectors(t, key, sent, 2.5)[:, 0] == truth).mean()
    isotropic = kr.read([(key.embed_side(sent), t.plain_embed, wk._vector_sigma2(t, 2.5, "row", sent.shape[1]))],
                        t.movable_ids, 5, True)
    writer = (right[:, 0] == truth).mean()
    assert alone >= floor and alone >= (isotropic[:, 0] == truth).mean() + 0.04 and alone >= writer - 0.02, \
        (alone, (isotropic[:, 0] == truth).mean(), writer)
    pooled = wk.read_vectors(t, key, sent, 2.5, groups=np.unique(truth, return_inverse=True)[1])
    assert (pooled[:, 0] == truth).mean() >= pooled_floor
