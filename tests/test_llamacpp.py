"""llama.cpp's own llama-server, unmodified, serving the GGUF export of the obfuscated real model: the client gets
the plain model's greedy tokens, and a recording relay in front of llama-server shows that it received only
tau-mapped token ids. Builds llama-server from the pinned vendored source on first use (cached)."""

import shutil

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aloe import AloeError
from aloe.obfuscation.client import PrivateClient, ServerError
from aloe.serving.commands import cached_gguf, llama_server_command
from aloe.serving.llamacpp import export_gguf, llama_server_binary
from aloe.serving.local import app_thread, free_port, server_process
from aloe.serving.proxy import connect, create_proxy_app
from server_recording import Recorder, assert_server_saw_only_obfuscated_ids, forwarder

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is the capital of France?", "Give me three tips for better sleep."]
# llama-server's f32 log-probabilities on the obfuscated export differ from the plain model's by at most 0.023 (top 5
# over 16 greedy steps, 7 secrets with 2-4 questions each, median 0.002). Two log-probabilities that close can swap
# two tokens whose plain logits are nearer than twice that: "Give me three tips for a job interview." has 0.011 between
# " yourself" and " prepared" at its 5th step, and llama-server picked either, depending on the secret. The questions
# are chosen so that every plain top-2 gap over their 16 greedy steps is at least 2 x LOGPROB_TOL, which the test
# checks first; the greedy tokens are then held to exact equality and the log-probabilities to LOGPROB_TOL.
LOGPROB_TOL = 0.04


@pytest.fixture(scope="module")
def llama_server():
    return llama_server_binary(progress=False)


def test_llama_server_on_obfuscated_gguf_gives_the_plain_greedy_tokens(llama_server, smollm2_path, smollm2_exact,
                                                                       tmp_path):
    obf_dir, secret = smollm2_exact
    gguf = cached_gguf(obf_dir, "f32")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    plain = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    port = free_port()
    relay = Recorder(forwarder(f"http://127.0.0.1:{port}"))  # every request body llama-server receives
    with server_process(llama_server_command(gguf, "127.0.0.1", port, 2, 1024), port, timeout=300,
                        log=tmp_path / "llama-server.log"), app_thread(relay) as url:
        client = PrivateClient(url, secret, tok, backend="llama.cpp")
        client.verify()
        for q in QUESTIONS:
            x = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                out = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
            want = out.sequences[0, x.shape[1]:].tolist()
            gaps = [float(-lg[0].topk(2).values.diff()) for lg in out.logits]
            assert min(gaps) >= 2 * LOGPROB_TOL, (q, gaps)   # no near-tie that engine rounding may decide
            res = client.complete(q, max_tokens=16, temperature=0.0)
            assert res.token_ids == want, (q, res.text, tok.decode(want))
            assert res.server_output_ids != res.token_ids
            # the server's own log-probabilities (asked of llama-server directly, beside the relay), mapped back
            probs = httpx.post(f"http://127.0.0.1:{port}/completion", timeout=120.0, json={
                "prompt": client.map.to_server(x[0].tolist()), "n_predict": 16, "temperature": 0, "n_probs": 5,
                "cache_prompt": False}).json()["completion_probabilities"]
            with torch.no_grad():
                logp = torch.log_softmax(torch.cat(out.logits).float(), -1)
            assert len(probs) == len(want)
            for step, row in zip(probs, logp):
                top = step["top_logprobs"]
                plain_ids = client.map.from_server([t["id"] for t in top])
                err = max(abs(t["logprob"] - float(row[i])) for t, i in zip(top, plain_ids))
                assert err <= LOGPROB_TOL, (q, err)
            # the same through the client's logprobs (the whole answer, and streamed), plain ids
            direct = PrivateClient(f"http://127.0.0.1:{port}", secret, tok, backend="llama.cpp")
            stream = direct.open_stream(q, max_tokens=16, temperature=0.0, logprobs=3)
            assert list(stream) == want
            for got in (direct.complete(q, max_tokens=16, temperature=0.0, logprobs=3).logprobs, stream.logprobs):
                assert len(got) == len(want)
                for (own, top), row, i in zip(got, logp, want, strict=True):
                    assert abs(own - float(row[i])) <= LOGPROB_TOL and set(top) == set(row.topk(3).indices.tolist())
                    assert max(abs(v - float(row[j])) for j, v in top.items()) <= LOGPROB_TOL
        # the privacy proxy in front of the same llama-server: the stock openai package, streaming and not
        import openai

        with app_thread(create_proxy_app(connect(url, secret, tok, backend="llama.cpp", timeout=120.0)),
                        health="/v1/models") as purl:
            api = openai.OpenAI(base_url=purl + "/v1", api_key="unused", max_retries=0, timeout=120.0)
            msg = [{"role": "user", "content": QUESTIONS[0]}]
            whole = api.chat.completions.create(model="m", messages=msg, max_tokens=16, temperature=0)
            chunks = api.chat.completions.create(model="m", messages=msg, max_tokens=16, temperature=0, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            # min-p 1 leaves llama-server only the likeliest token: sampling with it is greedy
            sampled = api.chat.completions.create(model="m", messages=msg, max_tokens=16, temperature=1.0, seed=7,
                                                  presence_penalty=0.0, extra_body={"min_p": 1.0})
        assert "Paris" in whole.choices[0].message.content and streamed == whole.choices[0].message.content
        assert sampled.choices[0].message.content == whole.choices[0].message.content
    # what the untrusted server received: token-id prompts mapped with tau, never a plain word or the plain ids
    received = assert_server_saw_only_obfuscated_ids(relay.bodies, client, QUESTIONS,
                                                     [client.chat_ids(q) for q in QUESTIONS])
    assert len(received) == len(QUESTIONS) + 3
    assert [r["prompt"] for r in received[-3:]] == [client.map.to_server(client.chat_ids(QUESTIONS[0]))] * 3
    assert [r["min_p"] for r in received] == [0.0] * (len(QUESTIONS) + 2) + [1.0]   # llama-server's 0.05 never acts
    assert all(r["presence_penalty"] == r["frequency_penalty"] == 0.0 for r in received)


def test_a_token_llama_server_would_hold_back_is_still_streamed(llama_server, smollm2_path, smollm2_exact, tmp_path):
    """llama-server holds back from its stream a token whose own text leaves an incomplete UTF-8 sequence (server id
    142 is byte 0xC3 in SmolLM2's vocabulary) and never sends that token's id; the export marks such tokens CONTROL,
    whose text is empty to llama-server. A plain token forced onto that server id by a logit bias streams every time,
    as the whole answer gives it."""
    from gguf import GGUFReader, TokenType

    obf_dir, secret = smollm2_exact
    gguf = cached_gguf(obf_dir, "f32")
    types = GGUFReader(gguf).fields["tokenizer.ggml.token_type"]
    assert int(types.parts[types.data[142]][0]) == TokenType.CONTROL
    assert sum(int(types.parts[i][0]) == TokenType.CONTROL for i in types.data) > 300   # 313 partial + specials
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    port = free_port()
    with server_process(llama_server_command(gguf, "127.0.0.1", port, 2, 512), port, timeout=300,
                        log=tmp_path / "llama-server.log"):
        client = PrivateClient(f"http://127.0.0.1:{port}", secret, tok, backend="llama.cpp")
        plain = int(np.flatnonzero(client.map.tau == 142)[0])
        params = dict(max_tokens=4, temperature=0.0, logit_bias={plain: 100.0})
        whole = client.complete("Say something.", **params)
        streamed = list(client.open_stream("Say something.", **params))
    assert whole.server_output_ids == [142] * 4 and whole.token_ids == [plain] * 4
    assert streamed == whole.token_ids
    # the same GGUF with token 142 left as the converter wrote it: llama-server drops its ids from the stream, and the
    # client refuses the streamed answer (its chunks count the generated tokens) instead of losing them silently
    unmarked = tmp_path / "unmarked.gguf"
    shutil.copyfile(gguf, unmarked)
    try:
        reader = GGUFReader(unmarked, "r+")
        fields = reader.fields["tokenizer.ggml.token_type"]
        fields.parts[fields.data[142]][0] = TokenType.NORMAL
        reader.data.flush()
        del reader, fields
        port = free_port()
        with server_process(llama_server_command(unmarked, "127.0.0.1", port, 2, 512), port, timeout=300,
                            log=tmp_path / "llama-server-unmarked.log"):
            client = PrivateClient(f"http://127.0.0.1:{port}", secret, tok, backend="llama.cpp")
            assert client.complete("Say something.", **params).server_output_ids == [142] * 4
            with pytest.raises(ServerError, match="generated 4 tokens but streamed the ids of 0") as err:
                list(client.open_stream("Say something.", **params))
            assert err.value.kind == "incomplete"
    finally:
        unmarked.unlink()


def tiny_vocab_gguf(path, model, tokens, types):
    from gguf import GGUFWriter

    w = GGUFWriter(path, "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def token_types(path):
    from gguf import GGUFReader

    f = GGUFReader(path).fields["tokenizer.ggml.token_type"]
    return [int(f.parts[i][0]) for i in f.data]


def test_only_tokens_whose_text_is_not_utf8_alone_are_marked(tmp_path):
    """Byte-level BPE: 'Ã' (0xC3, a lead byte) and '¡' (0xA1, a continuation byte) are marked, 'Ã©' (é) and the
    others are not, nor is a special token touched; a second pass marks nothing. SentencePiece: the byte token
    <0xC3> is marked, <0x41> ('A') is not. A tokenizer model not handled is left alone."""
    from aloe.serving.llamacpp import mark_partial_utf8_tokens

    bpe = tiny_vocab_gguf(tmp_path / "bpe.gguf", "gpt2", ["a", "\u00c3", "\u00a1", "\u0120b", "<|x|>", "\u00c3\u00a9"],
                          [1, 1, 1, 1, 3, 1])
    assert mark_partial_utf8_tokens(bpe) == 2 and token_types(bpe) == [1, 3, 3, 1, 3, 1]
    assert mark_partial_utf8_tokens(bpe) == 0
    spm = tiny_vocab_gguf(tmp_path / "spm.gguf", "llama", ["<0xC3>", "<0x41>", "\u2581hi"], [6, 6, 1])
    assert mark_partial_utf8_tokens(spm) == 1 and token_types(spm) == [3, 6, 1]
    other = tiny_vocab_gguf(tmp_path / "other.gguf", "bert", ["\u00c3", "a"], [1, 1])
    assert mark_partial_utf8_tokens(other) == 0 and token_types(other) == [1, 1]


def test_export_refuses_bad_input(tmp_path):
    with pytest.raises(AloeError, match="not a Hugging Face model folder"):
        export_gguf(tmp_path / "nothing", tmp_path / "x.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(AloeError, match="already exists"):
        export_gguf(tmp_path / "m", tmp_path / "exists.gguf")
    (tmp_path / "m" / "config.json").write_text("{")
    with pytest.raises(AloeError, match="config.json is unreadable"):
        export_gguf(tmp_path / "m", tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()


def test_the_gguf_cache_keeps_the_recently_used_exports_within_its_budget(tmp_path, monkeypatch):
    """Each obfuscation gets its own cached export; the least recently used ones go once the cache passes its
    budget, never the export just made nor another process's export in progress. A cache hit counts as a use."""
    import os

    import aloe.serving.llamacpp as llamacpp
    from aloe.serving.commands import evict_gguf_cache

    folder = tmp_path / "gguf"
    folder.mkdir()
    old = []
    for k in range(4):
        p = folder / f"m{k}.gguf"
        p.write_bytes(b"x" * 100)
        os.utime(p, (1000 + k, 1000 + k))
        old.append(p)
    busy = folder / ".m9.gguf.tmp-1.gguf"
    busy.write_bytes(b"x" * 100)
    os.utime(busy, (1, 1))
    new = folder / "new.gguf"
    new.write_bytes(b"x" * 100)
    os.utime(new, (1, 1))  # the oldest time, still kept
    assert evict_gguf_cache(folder, keep=new, budget_bytes=250) == old[:3]
    assert sorted(p.name for p in folder.iterdir()) == [busy.name, "m3.gguf", "new.gguf"]
    assert evict_gguf_cache(folder, keep=new, budget_bytes=250) == []

    monkeypatch.setenv("ALOE_CACHE", str(tmp_path / "cache"))
    made = []

    def export(src, out, outtype):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"g")
        made.append(out)

    monkeypatch.setattr(llamacpp, "export_gguf", export)
    models = []
    for k in range(3):
        (tmp_path / f"model{k}").mkdir()
        (tmp_path / f"model{k}" / "config.json").write_text(str(k))
        models.append(tmp_path / f"model{k}")
    monkeypatch.setenv("ALOE_GGUF_CACHE_GB", str(2.5 / 2**30))  # room for two one-byte exports
    first = cached_gguf(models[0])
    os.utime(first, (1, 1))
    second = cached_gguf(models[1])
    os.utime(second, (2, 2))
    assert cached_gguf(models[0]) == first and len(made) == 2  # a hit: not exported again, and now the newest
    third = cached_gguf(models[2])
    assert first.is_file() and third.is_file() and not second.exists()
    monkeypatch.setenv("ALOE_GGUF_CACHE_GB", "lots")
    with pytest.raises(AloeError, match="ALOE_GGUF_CACHE_GB must be a number"):
        cached_gguf(tmp_path / "model1")
    assert len(made) == 3  # refused before exporting
