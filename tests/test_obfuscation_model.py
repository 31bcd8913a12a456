"""Whole-checkpoint conversion on tiny random Llama/Qwen2 models: exactness, stock loading, bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from aloe import AloeError
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
from aloe.obfuscation.secret import check_artifact_secret, load_secret
from obfuscation_helpers import CONFIGS, float64_norms, tiny_model

EXACT = PROFILES["exact"].with_overrides(name="exact-tiny", h=8)


def convert(tmp_path, kind, profile=EXACT, **kw):
    plain_dir = tiny_model(kind, tmp_path / "plain")
    obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "secret.json", profile, dtype="float64",
                         progress=False, **kw)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float64).eval()
    obf = AutoModelForCausalLM.from_pretrained(tmp_path / "obf", dtype=torch.float64).eval()
    return plain, obf, load_secret(tmp_path / "secret.json")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_exact_profile_logits_equal_plain_through_prefill_and_kv_cache_decode(tmp_path, monkeypatch, kind):
    float64_norms(monkeypatch)
    plain, obf, secret = convert(tmp_path, kind)
    tau = torch.as_tensor(secret.tau)
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    with torch.no_grad():
        out_p = plain(ids, use_cache=True)
        out_o = obf(tau[ids], use_cache=True)
        assert (out_p.logits - out_o.logits[..., tau]).abs().max().item() <= 1e-9
        cache_p, cache_o = out_p.past_key_values, out_o.past_key_values
        nxt = torch.randint(0, plain.config.vocab_size, (2, 1))
        for _ in range(4):  # decode step by step from the KV cache
            step_p = plain(nxt, cache=cache_p, use_cache=True)
            step_o = obf(tau[nxt], cache=cache_o, use_cache=True)
            assert (step_p.logits - step_o.logits[..., tau]).abs().max().item() <= 1e-9
            cache_p, cache_o = step_p.past_key_values, step_o.past_key_values
            nxt = step_p.logits[:, -1:].argmax(-1)
    # the obfuscated model really is different: its own logits in its own id order disagree with the plain ones
    assert (out_p.logits - out_o.logits).abs().max().item() > 1e-3


def test_output_is_a_stock_checkpoint_without_secrets(tmp_path):
    plain, obf, secret = convert(tmp_path, "qwen2-gqa3-bias-untied")
    cfg = json.loads((tmp_path / "obf" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["hidden_size"] == 32 + 2 * 8 and cfg["head_dim"] == 8 and cfg["tie_word_embeddings"] is False
    assert type(obf).__name__ == "Qwen2ForCausalLM"
    assert os.stat(tmp_path / "secret.json").st_mode & 0o777 == 0o600
    manifest = json.loads((tmp_path / "obf" / "aloe.json").read_text())
    assert manifest["secret_fingerprint"] == secret.fingerprint
    blob = b"".join(p.read_bytes() for p in (tmp_path / "obf").iterdir())
    assert secret.seed.hex().encode() not in blob and secret.seed not in blob
    assert json.loads((tmp_path / "secret.json").read_text())["seed"] == secret.seed.hex()


def test_noise_and_block_permutation_change_logits_a_little(tmp_path, monkeypatch):
    float64_norms(monkeypatch)
    prof = PROFILES["balanced"].with_overrides(name="noisy", h=8, alpha_e=0.1, alpha_h=0.05, beta=4, gamma=10.0)
    plain, obf, secret = convert(tmp_path, "llama-gqa-tied", prof)
    tau = torch.as_tensor(secret.tau)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        diff = (plain(ids).logits - obf(tau[ids]).logits[..., tau]).abs().max().item()
    assert 1e-6 < diff < 5.0


def test_paper_keys_with_calibrated_kappa_track_the_plain_model(tmp_path, monkeypatch):
    float64_norms(monkeypatch)
    prof = PROFILES["paper"].with_overrides(name="paper-keys-only", h=8, alpha_e=0.0, alpha_h=0.0, beta=1)
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    calib = np.random.default_rng(1).integers(0, 97, 256)
    obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", prof, dtype="float64",
                         calibration_ids=calib, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float64).eval()
    obf = AutoModelForCausalLM.from_pretrained(tmp_path / "obf", dtype=torch.float64).eval()
    tau = torch.as_tensor(load_secret(tmp_path / "s.json").tau)
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        lp, lo = plain(ids).logits, obf(tau[ids]).logits[..., tau]
    rel = ((lp - lo).norm() / lp.norm()).item()
    assert 1e-6 < rel < 0.3   # approximate norm: close, not exact
    with pytest.raises(AloeError, match="calibration"):
        obfuscate_checkpoint(plain_dir, tmp_path / "obf2", tmp_path / "s2.json", prof, progress=False)


def test_rerun_reuses_and_foreign_output_is_refused(tmp_path):
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    first = obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", EXACT, progress=False)
    again = obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", EXACT, progress=False)
    assert again["reused"] and again["secret_fingerprint"] == first["secret_fingerprint"]
    with pytest.raises(AloeError, match="already exists"):
        obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "other.json", EXACT, progress=False)
    assert not (tmp_path / "other.json").exists()
    with pytest.raises(AloeError, match="seed-from-os"):
        obfuscate_checkpoint(plain_dir, tmp_path / "obf3", tmp_path / "s.json", EXACT, seed_from_os=True,
                             progress=False)
    # same secret, same inputs -> byte-identical weights (all randomness derives from the secret's seed)
    obfuscate_checkpoint(plain_dir, tmp_path / "obf4", tmp_path / "s.json", EXACT, progress=False)
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("obf", "obf4")]
    assert weights[0] == weights[1]


def test_wrong_secret_is_detected(tmp_path):
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    obfuscate_checkpoint(plain_dir, tmp_path / "a", tmp_path / "a.json", EXACT, progress=False)
    obfuscate_checkpoint(plain_dir, tmp_path / "b", tmp_path / "b.json", EXACT, progress=False)
    check_artifact_secret(tmp_path / "a", load_secret(tmp_path / "a.json"))
    with pytest.raises(AloeError, match="fingerprint mismatch"):
        check_artifact_secret(tmp_path / "a", load_secret(tmp_path / "b.json"))
    os.chmod(tmp_path / "b.json", 0o644)
    with pytest.raises(AloeError, match="readable by others"):
        load_secret(tmp_path / "b.json")
    (tmp_path / "c.json").write_text('{"format": "aloe-secret-v1", "seed": "00"}')
    os.chmod(tmp_path / "c.json", 0o600)
    with pytest.raises(AloeError, match="corrupt"):
        load_secret(tmp_path / "c.json")


def test_bad_inputs_leave_nothing_behind(tmp_path):
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    cfg = json.loads((plain_dir / "config.json").read_text())

    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(AloeError, match="unsupported architecture.*LlamaForCausalLM, .*Qwen2ForCausalLM"):
        obfuscate_checkpoint(gpt, tmp_path / "o1", tmp_path / "s1.json", EXACT, progress=False)

    from safetensors.torch import load_file

    tensors = load_file(plain_dir / "model.safetensors")
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}, missing / "model.safetensors")
    with pytest.raises(AloeError, match="tensor model.layers.1.mlp.down_proj.weight is missing"):
        obfuscate_checkpoint(missing, tmp_path / "o2", tmp_path / "s2.json", EXACT, progress=False)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(cfg))
    (corrupt / "model.safetensors").write_bytes((plain_dir / "model.safetensors").read_bytes()[:3000])
    with pytest.raises(AloeError, match="corrupt"):
        obfuscate_checkpoint(corrupt, tmp_path / "o3", tmp_path / "s3.json", EXACT, progress=False)

    for i in (1, 2, 3):
        assert not (tmp_path / f"o{i}").exists() and not (tmp_path / f"s{i}.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    with pytest.raises(AloeError, match="inside the output folder"):
        obfuscate_checkpoint(plain_dir, tmp_path / "o4", tmp_path / "o4" / "s.json", EXACT, progress=False)


def test_sharded_output_loads(tmp_path, monkeypatch):
    float64_norms(monkeypatch)
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", EXACT, dtype="float64",
                         max_shard_bytes=40_000, progress=False)
    index = json.loads((tmp_path / "obf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    obf = AutoModelForCausalLM.from_pretrained(tmp_path / "obf", dtype=torch.float64).eval()
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float64).eval()
    tau = torch.as_tensor(load_secret(tmp_path / "s.json").tau)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert (plain(ids).logits - obf(tau[ids]).logits[..., tau]).abs().max().item() <= 1e-9


def _special_ids_through_transformers(model_dir, vocab_size):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return ({int(i) for i in tok.all_special_ids} | {int(i) for i in tok.added_tokens_decoder}
            | set(range(len(tok), vocab_size)))


@pytest.mark.real_model
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_special_ids_read_with_tokenizers_match_transformers(request, tmp_path, model):
    from aloe.obfuscation.model import _fast_tokenizer_special_ids

    src = Path(request.getfixturevalue(f"{model}_path"))
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    fast = _fast_tokenizer_special_ids(src, vocab + 7)
    assert fast == _special_ids_through_transformers(src, vocab + 7)
    assert set(range(vocab, vocab + 7)) <= fast and 0 < len(fast) < vocab
    if model != "smollm2":
        return
    # a tokenizer_config that names an ordinary token special and adds tokens past the vocabulary (in a config that
    # lists its added tokens, as SmolLM2's does: transformers then takes that list as the whole of them)
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["additional_special_tokens"] = ["hello"]
    n = len(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    extra = {str(n + k): {"content": f"<extra_{k}>", "special": True, "lstrip": False, "rstrip": False,
                               "normalized": False, "single_word": False} for k in range(2)}
    cfg["added_tokens_decoder"] = {**cfg.get("added_tokens_decoder", {}), **extra}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    want = _special_ids_through_transformers(folder, n + 50)
    got = _fast_tokenizer_special_ids(folder, n + 50)
    assert got == want
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(src / "tokenizer.json")).token_to_id("hello") in got
