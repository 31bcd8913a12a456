"""Gemma 3 270M served privately: obfuscated with the ``exact`` profile, served by ``aloe serve`` (transformers) and
by llama.cpp's own ``llama-server`` on the ``aloe export gguf`` file. Through ``PrivateClient`` both give the plain
model's greedy tokens (plain ``generate`` on the plain folder). The GGUF is also read back: llama.cpp must see the
widened hidden size with the explicit head_dim, the sliding-window layout and local RoPE base, the (1 + w) norms and
the embedding table whose scale is ``sqrt(embedding_length)``.

The model is the pretrained one: it answers only with an example turn first and never ends its turn, so the answers
are short and cut by ``max_tokens``."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from aloe.obfuscation.client import PrivateClient
from aloe.serving.commands import llama_server_command
from aloe.serving.llamacpp import llama_server_binary
from aloe.serving.local import aloe_serve_command, free_port, server_process
from gguf_tables import gguf_f32, read_gguf

pytestmark = pytest.mark.real_model

FEW_SHOT = [{"role": "user", "content": "What is the capital of Germany?"},
            {"role": "assistant", "content": "Berlin."},
            {"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [FEW_SHOT, [{"role": "user", "content": "Give me three tips for a job interview."}]]
# Greedy tokens compared per prompt. On the second prompt the plain model's 12th token is a near-tie that
# llama.cpp's float32 kernels resolve differently on the plain GGUF; the first 10 are clear.
N_TOKENS = 10


@pytest.fixture(scope="module")
def plain_answers(gemma3_path):
    """The plain model's greedy answers: plain transformers ``generate`` on the plain folder."""
    tok = AutoTokenizer.from_pretrained(gemma3_path)
    model = AutoModelForCausalLM.from_pretrained(gemma3_path, dtype=torch.float32).eval()
    answers = []
    for msgs in PROMPTS:
        x = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_TOKENS, do_sample=False)
        answers.append(out[0, x.shape[1]:].tolist())
    assert tok.decode(answers[0]).startswith("Paris")
    return tok, answers


def check_private_answers(client: PrivateClient, tok, answers) -> None:
    for msgs, want in zip(PROMPTS, answers, strict=True):
        res = client.complete(msgs, max_tokens=N_TOKENS, temperature=0.0)
        assert res.token_ids == want, (msgs[-1]["content"], res.text, tok.decode(want))
        assert res.server_prompt_ids != client.chat_ids(msgs) and res.server_output_ids != res.token_ids
    assert client.complete(FEW_SHOT, max_tokens=3, temperature=0.0).text.startswith("Paris")


def test_aloe_serve_gives_the_plain_greedy_tokens(gemma3_exact, plain_answers, tmp_path):
    obf_dir, secret = gemma3_exact
    tok, answers = plain_answers
    port = free_port()
    with server_process(aloe_serve_command(obf_dir, port, "--threads", "2"), port, timeout=300,
                        log=tmp_path / "serve.log") as (url, _):
        client = PrivateClient(url, secret, tok)
        info = client.verify()
        assert info["data"][0]["aloe"]["hidden_size"] == 896
        check_private_answers(client, tok, answers)
    assert "capital of France" not in (tmp_path / "serve.log").read_text()


# -- the GGUF export, read back -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def obfuscated_gguf(gemma3_exact, tmp_path_factory):
    obf_dir, _ = gemma3_exact
    out = tmp_path_factory.mktemp("gemma3-gguf") / "obf.gguf"
    res = subprocess.run([sys.executable, "-m", "aloe.cli", "export", "gguf", str(obf_dir), str(out), "--json"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    yield out
    out.unlink(missing_ok=True)


def test_gguf_export_is_read_as_the_obfuscated_gemma3(gemma3_path, gemma3_exact, obfuscated_gguf):
    obf_dir, secret = gemma3_exact
    cfg = json.loads((obf_dir / "config.json").read_text())
    meta, tensors, buf = read_gguf(obfuscated_gguf)
    a = "gemma3"
    assert meta["general.architecture"] == a
    # widened hidden size, explicit head_dim (not hidden_size / heads = 224)
    assert meta[f"{a}.embedding_length"] == cfg["hidden_size"] == 896
    assert meta[f"{a}.attention.key_length"] == meta[f"{a}.attention.value_length"] == cfg["head_dim"] == 256
    assert (meta[f"{a}.attention.head_count"], meta[f"{a}.attention.head_count_kv"]) == (4, 1)
    assert tensors["blk.0.attn_q.weight"][0] == (896, 4 * 256) and tensors["blk.0.attn_output.weight"][0] == (1024, 896)
    # sliding window: llama.cpp reads no per-layer array here and applies Gemma 3's pattern of 6 (every 6th layer
    # global), which is the config's layer_types; global and local RoPE bases
    assert meta[f"{a}.attention.sliding_window"] == cfg["sliding_window"] == 512
    assert f"{a}.attention.sliding_window_pattern" not in meta
    assert [i % 6 == 5 for i in range(cfg["num_hidden_layers"])] == [
        t == "full_attention" for t in cfg["layer_types"]]
    assert meta[f"{a}.rope.freq_base"] == cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert meta[f"{a}.rope.freq_base_swa"] == cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert meta[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    # the untied head is exported (llama.cpp would otherwise reuse the embedding table)
    assert tensors["output.weight"][0] == (896, 262144)

    # (1 + w) norms: llama.cpp multiplies by the stored weight, the converter stores 1 + w for every norm
    index = json.loads((obf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    pairs = {"output_norm.weight": "model.norm.weight",
             "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
             "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
             "blk.5.post_ffw_norm.weight": "model.layers.5.post_feedforward_layernorm.weight",
             "blk.5.attn_q_norm.weight": "model.layers.5.self_attn.q_norm.weight",
             "blk.5.attn_k_norm.weight": "model.layers.5.self_attn.k_norm.weight"}
    for g, h in pairs.items():
        with safe_open(obf_dir / index[h], "np") as f:
            w = f.get_tensor(h)
        assert np.array_equal(gguf_f32(buf, tensors[g]), (w + 1).astype(np.float32)), g

    # embedding scale: llama.cpp scales the table by sqrtf(embedding_length) = sqrt(896), as transformers does for
    # the obfuscated folder; the table is the obfuscated one, compensated for the plain sqrt(640)
    from aloe.obfuscation.secret import load_secret

    tau = np.asarray(load_secret(secret).tau)
    plain_ids = [2, 50429, 236761, 1003, 5442, 100000, 262000]
    name = "model.embed_tokens.weight"
    with safe_open(obf_dir / index[name], "np") as f:
        obf_rows = np.stack([f.get_slice(name)[int(t):int(t) + 1][0] for t in tau[plain_ids]])
    with safe_open(Path(gemma3_path) / "model.safetensors", "np") as f:
        plain_rows = np.stack([f.get_slice(name)[t:t + 1][0] for t in plain_ids])
    gguf_rows = gguf_f32(buf, tensors["token_embd.weight"], [int(t) for t in tau[plain_ids]])
    assert np.array_equal(gguf_rows, obf_rows)
    s_engine = np.float32(math.sqrt(meta[f"{a}.embedding_length"]))
    s_plain = np.float32(math.sqrt(640))
    # the engine's input rows have the plain input rows' RMS (the exact key is P P^T = (d'/d) I, kappa = 1), as
    # the exact norms need; a scale of sqrt(640) in the engine would make them sqrt(640/896) of it
    rms = lambda m: np.sqrt(np.mean(m.astype(np.float64) ** 2, axis=1))  # noqa: E731
    assert np.allclose(rms(gguf_rows * s_engine) / rms(plain_rows * s_plain), 1.0, rtol=1e-5)
    # transformers' scaled embedding of the obfuscated folder multiplies by the same float32 value
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    hf = Gemma3TextScaledWordEmbedding(2, cfg["hidden_size"], 0, embed_scale=cfg["hidden_size"] ** 0.5)
    assert hf.embed_scale.dtype == torch.float32 and float(hf.embed_scale) == float(s_engine)
    buf.close()


def test_llama_server_gives_the_plain_greedy_tokens(gemma3_exact, obfuscated_gguf, plain_answers, tmp_path):
    _, secret = gemma3_exact
    tok, answers = plain_answers
    llama_server_binary(progress=False)
    port = free_port()
    with server_process(llama_server_command(obfuscated_gguf, "127.0.0.1", port, 2, 1024), port, timeout=300,
                        log=tmp_path / "llama-server.log") as (url, _):
        client = PrivateClient(url, secret, tok, backend="llama.cpp")
        client.verify()
        check_private_answers(client, tok, answers)
    assert "capital of France" not in (tmp_path / "llama-server.log").read_text()
