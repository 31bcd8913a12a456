"""The real model: SmolLM2-135M-Instruct obfuscated with the ``exact`` profile is a stock checkpoint that stock
transformers and the embedded server run with the plain model's outputs (fp32 rounding only)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aloe.obfuscation.client import PrivateClient
from aloe.obfuscation.fidelity import PROMPTS, corpus_token_ids, greedy_fidelity, load_models, logit_fidelity
from aloe.serving.local import server_thread

pytestmark = pytest.mark.real_model


def test_exact_profile_is_faithful_on_the_real_model(smollm2_path, smollm2_exact):
    obf_dir, secret = smollm2_exact
    cfg = json.loads((obf_dir / "config.json").read_text())
    assert cfg["hidden_size"] == 576 + 2 * 126 and cfg["head_dim"] == 64 and not cfg["tie_word_embeddings"]
    tok, plain, obf, sec = load_models(smollm2_path, obf_dir, secret)
    assert type(obf).__name__ == "LlamaForCausalLM"
    ids = corpus_token_ids(tok, "lee", 160)
    fid = logit_fidelity(plain, obf, sec.tau, ids, window=160)
    assert fid["ppl_ratio"] <= 1.002 and fid["top1_agreement"] >= 0.99
    assert fid["max_abs_logit_diff"] < 0.05
    greedy = greedy_fidelity(tok, plain, obf, sec.tau, PROMPTS[:2], max_new_tokens=12)
    assert greedy["greedy_agreement"] >= 0.98


def test_embedded_server_and_client_give_the_plain_greedy_answer(smollm2_path, smollm2_exact):
    obf_dir, secret = smollm2_exact
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    plain = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    question = "What is the capital of France?"
    x = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        want = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)[0, x.shape[1]:]
    with server_thread(obf_dir) as url:
        client = PrivateClient(url, secret, tok)
        client.verify()
        res = client.complete(question, max_tokens=16, temperature=0.0)
    assert res.token_ids == want.tolist()
    assert "Paris" in res.text
    # the server holds other ids than the plain ones (a random permutation of ~49k ids keeps a content token with
    # chance ~1/49k) and reads neither the question nor the answer with the plain tokenizer
    special = set(tok.all_special_ids)
    plain_prompt = x[0].tolist()
    for served, plain_ids in ((res.server_prompt_ids, plain_prompt), (res.server_output_ids, res.token_ids)):
        assert len(served) == len(plain_ids)
        assert sum(s == p and p not in special for s, p in zip(served, plain_ids)) <= 1
    assert "capital of France" not in client.server_view(res.server_prompt_ids)
    assert "is Paris" not in client.server_view(res.server_output_ids)


def test_completion_logprobs_give_each_tokens_place_in_the_text(smollm2_exact):
    """``text_offset`` (vLLM's completion logprobs): where each answer token's text begins in the answer's text, as
    the server's tokenizer decodes it; streamed, the offsets run on across the chunks."""
    from fastapi.testclient import TestClient

    from aloe.serving.server import Limits, create_app

    obf_dir, _ = smollm2_exact
    app = TestClient(create_app(obf_dir, Limits(max_prompt_tokens=64, max_new_tokens=16)))
    body = {"prompt": [1, 504, 3458, 282, 4649, 314], "max_tokens": 8, "temperature": 0, "logprobs": 1}
    whole = app.post("/v1/completions", json=body).json()["choices"][0]
    offsets, text, ids = whole["logprobs"]["text_offset"], whole["text"], whole["token_ids"]
    assert len(offsets) == len(ids) == 8 and offsets[0] == 0 and text
    assert offsets == sorted(offsets) and offsets[-1] < len(text) and len(set(offsets)) > 1
    tok = app.app.state.engine.tokenizer
    assert tok is not None and tok.decode(ids) == text
    assert all(text[:o] == tok.decode(ids[:n]) for n, o in enumerate(offsets))
    with app.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    pieces = [c["choices"][0] for c in chunks if c["choices"][0]["token_ids"]]
    streamed = [p["logprobs"]["text_offset"][0] for p in pieces]
    assert streamed == [sum(len(p["text"]) for p in pieces[:n]) for n in range(len(pieces))]
    assert streamed[0] == 0 and len(set(streamed)) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == text   # the held-back tail comes with the finish
