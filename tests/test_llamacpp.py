"""llama.cpp's own llama-server, unmodified, serving the GGUF export of the obfuscated real model: the client gets
the plain model's greedy tokens. Builds llama-server from the pinned vendored source on first use (cached)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aloe import AloeError
from aloe.obfuscation.client import PrivateClient
from aloe.serving.commands import cached_gguf, llama_server_command
from aloe.serving.llamacpp import export_gguf, llama_server_binary
from aloe.serving.local import free_port, server_process

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
    with server_process(llama_server_command(gguf, "127.0.0.1", port, 2, 1024), port, timeout=300,
                        log=tmp_path / "llama-server.log") as (url, _):
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


def test_export_refuses_bad_input(tmp_path):
    with pytest.raises(AloeError, match="not a Hugging Face model folder"):
        export_gguf(tmp_path / "nothing", tmp_path / "x.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(AloeError, match="already exists"):
        export_gguf(tmp_path / "m", tmp_path / "exists.gguf")
