"""The client-held vocabulary mode end to end: ``aloe obfuscate --client-vocab`` writes a server artifact with no
vocabulary rows that stock transformers loads; the client sends input vectors to ``aloe serve``'s embeds API and
applies the head itself; greedy answers equal token-id serving (tiny model here, SmolLM2 in the real-model test);
per-occurrence noise makes repeated tokens send different vectors; bad input gets a clear error."""

import json
import os

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from aloe import AloeError
from aloe.attacks.client_held import CALIBRATION_WEIGHTS
from aloe.attacks.weight_key import ECHO_MIN_PS, ECHO_OUTPUT_PENALTIES, ECHO_PENALTIES, ECHO_TEMPERATURES
from aloe.cli import main as aloe_main
from aloe.obfuscation.client import PrivateClient
from aloe.obfuscation.client_vocab import ClientVocabulary, encode_array, split_vocabulary
from aloe.obfuscation.secret import load_secret
from aloe.serving.local import app_thread
from aloe.serving.proxy import connect, create_proxy_app
from aloe.serving.server import Limits, create_app
from obfuscation_helpers import tiny_model
from test_serving import IdTokenizer


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A tiny model obfuscated with ``exact`` twice from one secret: whole (token-id serving) and client-held."""
    tmp = tmp_path_factory.mktemp("client-vocab")
    plain = tiny_model("llama-gqa-tied", tmp / "plain")
    (plain / "generation_config.json").write_text('{"eos_token_id": 2, "bos_token_id": 1}')
    base = ["obfuscate", str(plain), None, "--secret", str(tmp / "secret.json"), "--profile", "exact", "--h", "8",
            "--json"]
    assert aloe_main([*base[:2], str(tmp / "whole"), *base[3:]]) == 0
    assert aloe_main([*base[:2], str(tmp / "server"), *base[3:], "--client-vocab", str(tmp / "client.st")]) == 0
    return tmp


def test_server_artifact_holds_no_vocabulary_and_loads_in_stock_transformers(split):
    cfg = json.loads((split / "server" / "config.json").read_text())
    manifest = json.loads((split / "server" / "aloe.json").read_text())
    assert cfg["vocab_size"] == 1 and manifest["client_held_vocabulary"] and manifest["vocab_size"] == 97
    assert not (split / "server.full").exists() and not (split / "server" / "tokenizer.json").exists()
    assert os.stat(split / "client.st").st_mode & 0o777 == 0o600
    server = AutoModelForCausalLM.from_pretrained(split / "server", dtype=torch.float64).eval()
    whole = AutoModelForCausalLM.from_pretrained(split / "whole", dtype=torch.float64).eval()
    assert server.model.embed_tokens.weight.shape[0] == 1 and server.model.embed_tokens.weight.abs().max() == 0
    vocab = ClientVocabulary(split / "client.st")
    assert vocab.eos_ids == [2] and vocab.fingerprint == load_secret(split / "secret.json").fingerprint
    ids = torch.tensor([[5, 17, 33, 60, 80]])
    with torch.no_grad():
        hidden = server.model(inputs_embeds=vocab.embed(ids).double()).last_hidden_state
        logits = vocab.logits(hidden)
        assert (logits.double() - whole(ids).logits).abs().max() < 1e-4



@pytest.mark.parametrize("kind", ["gemma", "gemma3"])
def test_a_gemma_bodys_client_held_inputs_are_scaled_as_its_own_lookup(kind, tmp_path):
    """Gemma's engine multiplies the rows it looks up by sqrt(hidden_size) but takes ``inputs_embeds`` as given, so
    the client's table holds the rows scaled: the server body on the client's vectors computes what the whole
    artifact computes on the ids (before, the vectors went in unscaled and the hidden states were off by O(1)); the
    noisy-embedding model measures its noise relative to those rows."""
    from aloe.obfuscation.client_vocab import with_occurrence_noise
    from aloe.obfuscation.model import obfuscate_checkpoint
    from aloe.obfuscation.profiles import PROFILES
    from test_obfuscation_arch import tiny

    plain = tiny(kind, tmp_path / "plain")
    obfuscate_checkpoint(plain, tmp_path / "whole", tmp_path / "s.json",
                         PROFILES["exact"].with_overrides(name="exact-tiny", h=8), dtype="float64", progress=False)
    split_vocabulary(tmp_path / "whole", tmp_path / "server", tmp_path / "client.st")
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole", dtype=torch.float64).eval()
    server = AutoModelForCausalLM.from_pretrained(tmp_path / "server", dtype=torch.float64).eval()
    vocab = ClientVocabulary(tmp_path / "client.st")
    ids = torch.as_tensor(load_secret(tmp_path / "s.json").tau)[torch.arange(3, 12)]
    with torch.no_grad():
        want = whole.model(input_ids=ids[None]).last_hidden_state
        got = server.model(inputs_embeds=vocab.embed(ids).double()[None]).last_hidden_state
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
        rows = whole.model.embed_tokens(ids).float()
        assert torch.allclose(vocab.embed(ids), rows, rtol=1e-6, atol=1e-7)
        noisy = with_occurrence_noise(whole, 0.5).model.embed_tokens
        spread = float((noisy(ids).float() - rows).norm(dim=1).mean() / rows.norm(dim=1).mean())
        assert 0.3 <= spread <= 0.7   # alpha 0.5 of each row as looked up, not of the unscaled stored row

def test_embeds_mode_gives_the_token_id_servings_greedy_answer(split):
    prompts = ["hello there", "a longer prompt, with punctuation!", "x"]
    with app_thread(create_app(split / "whole")) as u1, app_thread(create_app(split / "server")) as u2:
        ids_client = PrivateClient(u1, split / "secret.json", IdTokenizer())
        emb_client = PrivateClient(u2, split / "secret.json", IdTokenizer(), backend="embeds",
                                   client_vocab=split / "client.st")
        ids_client.verify(), emb_client.verify()
        for p in prompts:
            a = ids_client.complete(p, max_tokens=12, logprobs=2)
            stream = emb_client.open_stream(p, max_tokens=12, logprobs=2)
            got = list(stream)
            assert got == a.token_ids and stream.finish_reason == a.finish_reason
            # the model's log-probabilities: the server's over ids, the client's own over the hidden states
            for (own, top), (own_e, top_e) in zip(a.logprobs, stream.logprobs, strict=True):
                assert abs(own - own_e) < 1e-4 and list(top) == list(top_e)
                assert max(abs(top[i] - top_e[i]) for i in top) < 1e-4
            assert stream.server_prompt_ids == [] and stream.server_output_ids == []
            assert stream.server_vectors == len(ids_client.chat_ids(p)) + len(got) - 1
        # sampling on the client: a seed reproduces, two seeds differ somewhere
        runs = [emb_client.complete("sample me", max_tokens=10, temperature=1.5, seed=s).token_ids
                for s in (7, 7, 8)]
        assert runs[0] == runs[1] and runs[0] != runs[2]


def test_embeds_backend_refuses_mismatched_parts(split, tmp_path):
    with app_thread(create_app(split / "whole")) as url:
        client = PrivateClient(url, split / "secret.json", IdTokenizer(), backend="embeds",
                               client_vocab=split / "client.st")
        with pytest.raises(AloeError, match="client-held-vocabulary artifact"):
            client.verify()
    with pytest.raises(AloeError, match="needs the client vocabulary file"):
        PrivateClient("http://127.0.0.1:9", split / "secret.json", IdTokenizer(), backend="embeds")
    (tmp_path / "bad.st").write_bytes(b"not a safetensors file")
    with pytest.raises(AloeError, match="unreadable"):
        ClientVocabulary(tmp_path / "bad.st")
    with pytest.raises(AloeError, match="already holds no vocabulary"):
        split_vocabulary(split / "server", tmp_path / "s2", tmp_path / "c2.st")
    with pytest.raises(AloeError, match="must not be inside"):
        split_vocabulary(split / "whole", tmp_path / "s3", tmp_path / "s3" / "c.st")
    with pytest.raises(AloeError, match="already exists"):
        split_vocabulary(split / "whole", tmp_path / "s4", split / "client.st")
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists() and not (tmp_path / "s4").exists()


def test_occurrence_noise_sends_fresh_vectors_for_repeated_tokens(split, tmp_path):
    split_vocabulary(split / "whole", tmp_path / "server", tmp_path / "noisy.st", occurrence_noise=0.5)
    exact, noisy = ClientVocabulary(split / "client.st"), ClientVocabulary(tmp_path / "noisy.st")
    ids = [11, 11, 11, 40]
    e, n = exact.embed(ids), noisy.embed(ids)
    assert torch.equal(e[0], e[1]) and not torch.equal(n[0], n[1]) and not torch.equal(n[0], e[0])
    rel = ((n - e).norm(dim=1) / e.norm(dim=1)).mean()
    assert 0.2 < float(rel) < 1.0          # row-shaped: about alpha * ||row|| per occurrence
    with pytest.raises(AloeError, match="outside the vocabulary"):
        noisy.embed([97])


def test_embeds_api_rejects_bad_input_with_a_reason(split):
    app = create_app(split / "server", Limits(max_prompt_tokens=8, max_new_tokens=4, max_sessions=2))
    client = TestClient(app)
    d = json.loads((split / "server" / "config.json").read_text())["hidden_size"]
    row = encode_array(torch.zeros(1, d))
    assert client.post("/v1/completions", json={"prompt": [0]}).json()["error"]["message"].startswith(
        "this artifact holds no vocabulary")
    for body, reason in [({"embeds": "@@"}, "base64"), ({"embeds": encode_array(torch.zeros(1, d + 1))}, "rows"),
                         ({"embeds": encode_array(torch.full((1, d), float("nan")))}, "finite"),
                         ({"embeds": row, "extra": 1}, "extra")]:
        r = client.post("/v1/aloe/embeds", json=body)
        assert r.status_code == 422 and reason in r.json()["error"]["message"].lower(), (body, r.text)
    assert client.post("/v1/aloe/embeds", json={"embeds": row, "session": "nope"}).status_code == 404
    first = client.post("/v1/aloe/embeds", json={"embeds": encode_array(torch.zeros(10, d))}).json()
    assert first["length"] == 10
    r = client.post("/v1/aloe/embeds", json={"embeds": encode_array(torch.zeros(3, d)), "session": first["session"]})
    assert r.status_code == 422 and "limit is 12" in r.json()["error"]["message"]
    # only max_sessions KV caches are kept: the least recently used goes first
    s = [client.post("/v1/aloe/embeds", json={"embeds": row}).json()["session"] for _ in range(3)]
    assert client.post("/v1/aloe/embeds", json={"embeds": row, "session": s[0]}).status_code == 404
    assert client.post("/v1/aloe/embeds", json={"embeds": row, "session": s[2]}).json()["length"] == 2
    assert client.delete(f"/v1/aloe/sessions/{s[2]}").status_code == 200
    assert client.delete(f"/v1/aloe/sessions/{s[2]}").status_code == 404


def test_the_text_summary_says_the_body_still_gives_the_key(split, capsys):
    """Keeping the tables does not keep the exact-norm key (``aloe.attacks.weight_key``): the summary says so."""
    assert aloe_main(["obfuscate", str(split / "plain"), str(split / "told"), "--secret", str(split / "told.json"),
                      "--profile", "exact", "--h", "8", "--client-vocab", str(split / "told.st"),
                      "--occurrence-noise", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "client-held vocabulary:" in out and "reads the writer key off the body's weights" in out
    assert "the answers through the hidden states it returns" in out


def test_cli_refuses_occurrence_noise_without_client_vocab(split, capsys):
    assert aloe_main(["obfuscate", str(split / "plain"), str(split / "x"), "--secret", str(split / "secret.json"),
                      "--occurrence-noise", "0.1"]) != 0
    assert "--client-vocab" in capsys.readouterr().err
    assert not (split / "x").exists()


@pytest.mark.real_model
def test_smollm2_client_held_mode_matches_token_id_serving_and_the_server_sees_no_id(smollm2_exact, smollm2_path,
                                                                                    tmp_path):
    from test_proxy import Recorder

    obf, secret = smollm2_exact
    split_vocabulary(obf, tmp_path / "server", tmp_path / "client.st")
    recorder = Recorder(create_app(tmp_path / "server", Limits(max_new_tokens=64)))
    questions = ["What is the capital of France?", "Name three colours of the rainbow."]
    with app_thread(create_app(obf, Limits(max_new_tokens=64))) as u1, app_thread(recorder) as u2:
        ids_client = PrivateClient(u1, secret, smollm2_path)
        emb_client = PrivateClient(u2, secret, ids_client.tokenizer, backend="embeds",
                                   client_vocab=tmp_path / "client.st")
        ids_client.verify(), emb_client.verify()
        answers = []
        for q in questions:
            want = list(ids_client.open_stream(q, max_tokens=24))
            got = list(emb_client.open_stream(q, max_tokens=24))
            assert got == want
            answers.append(emb_client.detokenize(got))
        # the proxy in front of it: the stock openai package, streaming
        import openai

        proxy = connect(u2, secret, ids_client.tokenizer, backend="embeds", client_vocab=tmp_path / "client.st")
        with app_thread(create_proxy_app(proxy), health="/v1/models") as purl:
            api = openai.OpenAI(base_url=purl + "/v1", api_key="unused", max_retries=0, timeout=120.0)
            chunks = api.chat.completions.create(model="m", messages=[{"role": "user", "content": questions[0]}],
                                                 max_tokens=24, temperature=0, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            seen = httpx.get(purl + "/aloe/last-exchange").json()["exchange"]
    assert "Paris" in answers[0] and streamed == answers[0]
    assert seen["server_prompt_ids"] == [] and "input vectors" in seen["server_prompt_text"]
    bodies = [json.loads(b) for b in recorder.bodies if b]
    assert bodies and all(set(b) <= {"embeds", "session", "model"} for b in bodies)
    assert np.all([len(b["embeds"]) % 4 == 0 for b in bodies])


def test_occurrence_noise_inside_a_stock_model_is_fresh_per_lookup_and_off_at_zero(tmp_path):
    from aloe.obfuscation.client_vocab import with_occurrence_noise

    plain = tiny_model("llama-gqa-tied", tmp_path / "plain")
    ids = torch.tensor([[5, 6, 5, 7]])
    base = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    ref = base(ids).logits
    exact = with_occurrence_noise(AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval(), 0.0)
    assert torch.equal(exact(ids).logits, ref)
    noisy = with_occurrence_noise(AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval(), 0.5)
    emb = noisy.get_input_embeddings()
    a, b = emb(ids), emb(ids)
    assert not torch.equal(a, b) and not torch.equal(a[0, 0], a[0, 2])        # every lookup draws afresh
    rows = base.get_input_embeddings().weight[ids[0]]
    rel = ((a[0] - rows).norm(dim=-1) / rows.norm(dim=-1))
    assert bool(((rel > 0.2) & (rel < 1.0)).all())                            # about alpha times the row's norm
    with pytest.raises(AloeError):
        with_occurrence_noise(base, -1.0)


def test_cli_measures_what_the_server_reads_of_a_client_held_deployment(split, capsys):
    """`aloe attack-client-held`: the key the body gives, the prompts read alone and decoded as text, and the answers
    read from the hidden states returned (alone, and with the vector each comes back as). Without occurrence noise
    every prompt occurrence and every answer token is read; with noise of the rows' own size (alpha 1) the answers
    are still read (93.8-99.0% over 20 draws in test_attacks_weight_key). A client that samples (temperature 1) picks
    tokens its state does not rank first (the state alone read 0-5% of them over 16 draws of this tiny random model),
    and the echo still reads each pick that comes back (93-96% of all picks, the last of each reply never coming
    back); with top-k 5 and a repetition penalty 1.3 as well, the echo reads 87.5-96.9% (14 draws). A folder that
    holds its tables, a client file of another secret, a negative temperature or top-k is refused."""
    base = ["attack-client-held", "--model", str(split / "plain"), "--server", str(split / "server"), "--client-vocab",
            str(split / "client.st"), "--secret", str(split / "secret.json"), "--beam", "2", "--answer-prompts", "3",
            "--new-tokens", "8", "--json"]
    for noise, least in (("0", 1.0), ("1.0", 0.8)):
        assert aloe_main([*base, "--occurrence-noise", noise]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["occurrence_noise"] == float(noise) and res["key"]["gram_residual"] < 1e-4
        p, a = res["prompts"], res["answers"]
        assert p["occurrences"] > 0 and set(p["calibration"]) == {str(w) for w in CALIBRATION_WEIGHTS}
        assert a["prompts"] == 3 and a["answer_tokens"] > 0 and a["answer_recovery"] >= least
        assert a["answer_recovery_with_echo"] >= least and 0 < a["echoed_answer_tokens"] <= a["answer_tokens"]
        assert a["echo_temperature"] in ECHO_TEMPERATURES
        if noise == "0":
            assert p["occurrence_recovery"] == 1.0 and p["alone_same_draw"] == 1.0
    assert aloe_main([*base, "--occurrence-noise", "1.0", "--temperature", "1.0", "--answer-prompts", "8",
                      "--new-tokens", "12"]) == 0
    a = json.loads(capsys.readouterr().out)["answers"]
    assert a["client_sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                                    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    assert a["answer_recovery"] < 0.5 and a["answer_recovery_with_echo"] >= 0.8, a
    assert aloe_main([*base, "--temperature", "-1"]) != 0 and "--temperature" in capsys.readouterr().err
    # top-k, min-p and the penalties reach the client's sampler; the server fits its own model of the sampler
    for extra, want in ((["--top-k", "5", "--repetition-penalty", "1.3"], dict(top_k=5, repetition_penalty=1.3)),
                        (["--min-p", "0.05", "--frequency-penalty", "0.5", "--presence-penalty", "0.5"],
                         dict(min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5))):
        assert aloe_main([*base, "--occurrence-noise", "1.0", "--temperature", "1.0", *extra,
                          "--answer-prompts", "4"]) == 0
        a = json.loads(capsys.readouterr().out)["answers"]
        assert a["client_sampling"] == dict(dict(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0,
                                                 repetition_penalty=1.0, presence_penalty=0.0,
                                                 frequency_penalty=0.0), **want)
        fit = a["echo_sampler"]
        assert fit["temperature"] == a["echo_temperature"] in ECHO_TEMPERATURES and fit["min_p"] in ECHO_MIN_PS
        grid = fit.get("grid", fit)   # the grid's own penalties, before the finer search around them
        assert grid["repetition_penalty"] in ECHO_PENALTIES
        assert (grid["presence_penalty"], grid["frequency_penalty"]) in ((0.0, 0.0), *ECHO_OUTPUT_PENALTIES)
        assert fit["repetition_penalty"] >= 1.0 and min(fit["presence_penalty"], fit["frequency_penalty"]) >= 0.0
        assert min(a["answer_recovery_with_echo"], a["answer_recovery_with_echo_unpenalised"],
                   a["answer_recovery_with_echo_untruncated"], a["answer_recovery_with_echo_grid"]) >= 0.8, a
    assert aloe_main([*base, "--temperature", "1", "--top-k", "-1"]) != 0 and "--top-k" in capsys.readouterr().err
    assert aloe_main([*base, "--temperature", "1", "--min-p", "2"]) != 0 and "--min-p" in capsys.readouterr().err
    assert aloe_main([*base[:4], str(split / "whole"), *base[5:]]) != 0
    assert "holds its vocabulary tables: attack it with `aloe attack`" in capsys.readouterr().err
    other = split / "other.st"
    assert aloe_main(["obfuscate", str(split / "plain"), str(split / "other"), "--secret", str(split / "other.json"),
                      "--profile", "exact", "--h", "8", "--client-vocab", str(other), "--json"]) == 0
    capsys.readouterr()
    assert aloe_main([*base[:6], str(other), *base[7:]]) != 0
    assert "does not belong to this secret" in capsys.readouterr().err
    assert aloe_main([*base, "--beam", "0"]) != 0 and "--beam" in capsys.readouterr().err


def test_the_local_decode_loop_picks_with_the_clients_own_sampler(split):
    """`local_decode` (the client-held loop the answer read runs) picks greedily by default, with the client's
    `Sampler` otherwise: temperature 0 is the greedy pick, a request seed repeats a sampled answer, and another seed
    gives another one."""
    from aloe.obfuscation.client import Sampler
    from aloe.obfuscation.client_vocab import local_decode

    body = AutoModelForCausalLM.from_pretrained(split / "server", dtype=torch.float32).eval()
    client = ClientVocabulary(split / "client.st")
    prompt = load_secret(split / "secret.json").tau[[1, 5, 9, 13, 17]]

    def sampler(temperature, seed):
        return Sampler(dict(temperature=temperature, top_p=1.0, top_k=-1, repetition_penalty=1.0, seed=seed))

    greedy, states = local_decode(body, client, prompt, 12)
    assert len(greedy) == states.shape[0] > 0
    assert local_decode(body, client, prompt, 12, sampler=sampler(0.0, 1))[0] == greedy
    one = local_decode(body, client, prompt, 12, sampler=sampler(1.0, 7))[0]
    assert one == local_decode(body, client, prompt, 12, sampler=sampler(1.0, 7))[0]
    assert one != greedy and one != local_decode(body, client, prompt, 12, sampler=sampler(1.0, 8))[0]
