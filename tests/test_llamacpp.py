"""llama.cpp's own llama-server, unmodified, serving the GGUF export of the obfuscated real model: the client gets
the plain model's greedy tokens, and a recording relay in front of llama-server shows that it received only
tau-mapped token ids. Builds llama-server from the pinned vendored source on first use (cached)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aloe import AloeError
from aloe.obfuscation.client import PrivateClient
from aloe.serving.commands import cached_gguf, llama_server_command
from aloe.serving.llamacpp import export_gguf, llama_server_binary
from aloe.serving.local import app_thread, free_port, server_process
from aloe.serving.proxy import connect, create_proxy_app
from server_recording import Recorder, assert_server_saw_only_obfuscated_ids, forwarder

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is the capital of France?", "Give me three tips for a job interview."]


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
                want = plain.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                                      do_sample=False)[0, x.shape[1]:].tolist()
            res = client.complete(q, max_tokens=16, temperature=0.0)
            assert res.token_ids == want, (q, res.text, tok.decode(want))
            assert res.server_output_ids != res.token_ids
        # the privacy proxy in front of the same llama-server: the stock openai package, streaming and not
        import openai

        with app_thread(create_proxy_app(connect(url, secret, tok, backend="llama.cpp", timeout=120.0)),
                        health="/v1/models") as purl:
            api = openai.OpenAI(base_url=purl + "/v1", api_key="unused", max_retries=0, timeout=120.0)
            msg = [{"role": "user", "content": QUESTIONS[0]}]
            whole = api.chat.completions.create(model="m", messages=msg, max_tokens=16, temperature=0)
            chunks = api.chat.completions.create(model="m", messages=msg, max_tokens=16, temperature=0, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in whole.choices[0].message.content and streamed == whole.choices[0].message.content
    # what the untrusted server received: token-id prompts mapped with tau, never a plain word or the plain ids
    received = assert_server_saw_only_obfuscated_ids(relay.bodies, client, QUESTIONS,
                                                     [client.chat_ids(q) for q in QUESTIONS])
    assert len(received) == len(QUESTIONS) + 2
    assert [r["prompt"] for r in received[-2:]] == [client.map.to_server(client.chat_ids(QUESTIONS[0]))] * 2


def test_export_refuses_bad_input(tmp_path):
    with pytest.raises(AloeError, match="not a Hugging Face model folder"):
        export_gguf(tmp_path / "nothing", tmp_path / "x.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(AloeError, match="already exists"):
        export_gguf(tmp_path / "m", tmp_path / "exists.gguf")
