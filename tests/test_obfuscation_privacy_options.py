"""The privacy options of the conversion on tiny random models: shaped noise, the non-isometric embedding key, and
adaptation by distillation (what each keeps exact, what it changes, resumability, stock output)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from aloe import AloeError
from aloe.obfuscation import adapt as adapt_mod
from aloe.obfuscation.embedding import add_noise, noise_std
from aloe.obfuscation.keys import init_keys
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
from aloe.obfuscation.rng import SecureRandom
from aloe.obfuscation.secret import load_secret
from obfuscation_helpers import float64_norms, tiny_model

EXACT = PROFILES["exact"].with_overrides(name="exact-tiny", h=8)
SEED = bytes(range(32))  # test-only key material


def test_row_noise_gives_every_row_the_same_signal_to_noise_ratio():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(400, 64)) * rng.uniform(0.1, 3.0, size=(400, 1))  # rows of very different norms
    entry, row = noise_std(w, 0.5, "entry"), noise_std(w, 0.5, "row")
    assert np.allclose(entry, 0.5 * w.std())
    assert np.allclose(row * np.sqrt(64) / np.linalg.norm(w, axis=1), 0.5)
    noised = add_noise(w, 0.5, SecureRandom(SEED, "t"), "row")
    snr = np.linalg.norm(w, axis=1) / np.linalg.norm(noised - w, axis=1)
    assert abs(np.median(snr) - 2.0) < 0.1 and snr.std() < 0.3
    # entry mode is the paper's formula: the same draws as W + alpha * sigma * N(0, 1)
    a = add_noise(w, 0.5, SecureRandom(SEED, "t"), "entry")
    b = w + SecureRandom(SEED, "t").normal(w.shape, std=0.5 * float(w.std()))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        noise_std(w, 0.5, "column")


def test_sheared_embedding_key_inverts_exactly_but_is_not_an_isometry():
    keys = init_keys(SecureRandom(SEED, "k"), 48, 12, design="exact-norm")
    P = keys.keymat_gen(SecureRandom(SEED, "p"))
    Pe = keys.sheared_writer(SecureRandom(SEED, "e"), 1.0)
    c2 = keys.scale ** 2
    assert np.abs(P @ P.T - c2 * np.eye(48)).max() < 1e-10           # the shared key is a scaled isometry
    for i in range(3):
        Q = keys.inv_keymat_gen(SecureRandom(SEED, f"q{i}"))
        assert np.abs(Pe @ Q - np.eye(48)).max() < 1e-10              # every reader still inverts the sheared key
    gram = Pe @ Pe.T
    assert np.abs(gram - c2 * np.eye(48)).max() > 0.1                 # ... which is not an isometry
    x = SecureRandom(SEED, "x").normal((200, 48))
    ratio = np.linalg.norm(x @ Pe, axis=1) / np.linalg.norm(x @ P, axis=1)
    assert ratio.std() > 0.05                                          # so RMSNorm sees other norms per row
    unsheared = keys.sheared_writer(SecureRandom(SEED, "e"), 0.0)
    assert np.array_equal(unsheared, keys.keymat_gen(SecureRandom(SEED, "e").child("base")))


def _logit_gap(plain, obf, tau, ids):
    with torch.no_grad():
        return (plain(ids).logits - obf(tau[ids]).logits[..., tau]).abs().max().item()


def test_embedding_shear_keeps_the_model_close_and_breaks_the_isometry_of_the_table(tmp_path, monkeypatch):
    float64_norms(monkeypatch)
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float64).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    gaps, grams = {}, {}
    for shear in (0.0, 0.3):
        d = tmp_path / f"s{shear}"
        prof = EXACT.with_overrides(name=f"shear{shear}", embed_shear=shear)
        obfuscate_checkpoint(plain_dir, d / "obf", d / "secret.json", prof, dtype="float64", progress=False)
        obf = AutoModelForCausalLM.from_pretrained(d / "obf", dtype=torch.float64).eval()
        tau = torch.as_tensor(load_secret(d / "secret.json").tau)
        gaps[shear] = _logit_gap(plain, obf, tau, ids)
        e_plain = plain.model.embed_tokens.weight.detach()
        e_obf = obf.model.embed_tokens.weight.detach()[tau]
        grams[shear] = (e_obf @ e_obf.T) / (e_plain @ e_plain.T).abs().mean()
        grams[f"plain{shear}"] = (e_plain @ e_plain.T) / (e_plain @ e_plain.T).abs().mean()
        assert json.loads((d / "obf" / "aloe.json").read_text())["profile"]["embed_shear"] == shear
    assert gaps[0.0] < 1e-9                         # no shear: exact
    assert 1e-6 < gaps[0.3] < 0.5 * plain(ids).logits.abs().max().item()  # approximate, not destroyed
    # the table's Gram is a scaled copy of the plain one without shear, and is not one with it
    c2 = (grams[0.0] / grams["plain0.0"]).median()
    assert torch.allclose(grams[0.0], c2 * grams["plain0.0"], atol=1e-8)
    assert (grams[0.3] - c2 * grams["plain0.3"]).abs().max() > 0.05


def _adapt_profile(steps):
    return EXACT.with_overrides(name="adapt-tiny", alpha_e=0.5, alpha_h=0.3, noise_shape="row", adapt_steps=steps,
                                adapt_lr=2e-2, adapt_rank=4)


def _kl(plain, obf, tau, ids):
    with torch.no_grad():
        return adapt_mod.distillation_loss(plain(ids).logits, obf(tau[ids]).logits, tau).item()


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_adaptation_recovers_fidelity_keeps_the_noisy_tables_and_writes_a_stock_checkpoint(tmp_path):
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    train = np.random.default_rng(0).integers(0, 97, size=4096)
    common = dict(dtype="float32", progress=False, adapt_token_ids=train,
                  adapt_options=dict(seq_len=16, batch=8, save_every=10))
    obfuscate_checkpoint(plain_dir, tmp_path / "noisy", tmp_path / "s.json", _adapt_profile(0), dtype="float32",
                         progress=False)
    obfuscate_checkpoint(plain_dir, tmp_path / "adapted", tmp_path / "s.json", _adapt_profile(60), **common)
    assert not (tmp_path / "adapted.partial").exists()
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    noisy = AutoModelForCausalLM.from_pretrained(tmp_path / "noisy", dtype=torch.float32).eval()
    adapted = AutoModelForCausalLM.from_pretrained(tmp_path / "adapted", dtype=torch.float32).eval()
    assert type(adapted).__name__ == "LlamaForCausalLM"
    tau = torch.as_tensor(load_secret(tmp_path / "s.json").tau)
    held_out = torch.as_tensor(np.random.default_rng(1).integers(0, 97, size=(8, 16)))
    kl_noisy, kl_adapted = _kl(plain, noisy, tau, held_out), _kl(plain, adapted, tau, held_out)
    assert kl_adapted < 0.7 * kl_noisy, (kl_noisy, kl_adapted)
    a, n = _tensors(tmp_path / "adapted"), _tensors(tmp_path / "noisy")
    assert set(a) == set(n)                                  # same stock tensors, LoRA merged away
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(a[name], n[name])                 # the noisy tables stay as the profile made them
    assert not torch.equal(a["model.layers.0.mlp.gate_proj.weight"], n["model.layers.0.mlp.gate_proj.weight"])
    # the adapted body leaves the writer key's subspace a little, and the key read off it is still the isometry
    from aloe.attacks import weight_key
    from aloe.attacks.common import Budget, Target

    key = weight_key.recover(Target(plain_dir, tmp_path / "adapted", Budget(topk=5, seed=1)))
    assert key.design == "isometry" and key.subspace_gap > 1e-4, key.summary()
    manifest = json.loads((tmp_path / "adapted" / "aloe.json").read_text())
    assert manifest["adaptation"]["steps"] == 60 and manifest["adaptation"]["kl_last"] < manifest["adaptation"][
        "kl_first"]


def _interrupted_at(call: int, real):
    """``real`` that raises KeyboardInterrupt on its ``call``-th call (a run stopped mid-training)."""
    calls = {"n": 0}

    def failing(*a):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a)

    return failing


def test_interrupted_adaptation_resumes_to_the_same_weights(tmp_path, monkeypatch):
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    train = np.random.default_rng(0).integers(0, 97, size=2048)
    common = dict(dtype="float32", progress=False, adapt_token_ids=train,
                  adapt_options=dict(seq_len=16, batch=4, save_every=3))
    monkeypatch.setattr(adapt_mod.secrets, "randbits", lambda _bits: 12345)  # same window order in both runs
    torch.manual_seed(0)  # LoRA's initial A (not a secret) alike in both runs
    obfuscate_checkpoint(plain_dir, tmp_path / "whole", tmp_path / "s.json", _adapt_profile(8), **common)

    real = adapt_mod.distillation_loss
    monkeypatch.setattr(adapt_mod, "distillation_loss", _interrupted_at(5, real))
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        obfuscate_checkpoint(plain_dir, tmp_path / "broken", tmp_path / "s.json", _adapt_profile(8), **common)
    assert not (tmp_path / "broken").exists() and (tmp_path / "broken.partial" / "adapt-state.pt").is_file()
    monkeypatch.setattr(adapt_mod, "distillation_loss", real)
    torch.manual_seed(99)  # a resumed run takes its adapters from the saved state, not from a fresh init
    summary = obfuscate_checkpoint(plain_dir, tmp_path / "broken", tmp_path / "s.json", _adapt_profile(8),
                                   seed_from_os=True, **common)
    assert summary["adaptation"]["resumed_from"] == 3
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "broken")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_adaptation_refuses_bad_settings_and_a_state_of_another_configuration(tmp_path, monkeypatch):
    with pytest.raises(AloeError):
        adapt_mod.AdaptConfig(steps=0)
    with pytest.raises(AloeError):
        adapt_mod.AdaptConfig(steps=5, lr=-1.0)
    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    train = np.random.default_rng(0).integers(0, 97, size=512)
    real = adapt_mod.distillation_loss
    monkeypatch.setattr(adapt_mod, "distillation_loss", _interrupted_at(3, real))
    kw = dict(progress=False, adapt_token_ids=train)
    with pytest.raises(KeyboardInterrupt):
        obfuscate_checkpoint(plain_dir, tmp_path / "out", tmp_path / "s.json", _adapt_profile(4),
                             adapt_options=dict(seq_len=16, batch=2, save_every=1), **kw)
    monkeypatch.setattr(adapt_mod, "distillation_loss", real)
    with pytest.raises(AloeError, match="another artifact or configuration"):
        obfuscate_checkpoint(plain_dir, tmp_path / "out", tmp_path / "s.json", _adapt_profile(4),
                             adapt_options=dict(seq_len=16, batch=3, save_every=1), **kw)
    assert not (tmp_path / "out").exists()


def test_obfuscate_prints_what_the_profile_protects_against(tmp_path, capsys):
    from aloe.cli import main

    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    assert main(["obfuscate", str(plain_dir), str(tmp_path / "obf"), "--secret", str(tmp_path / "s.json"),
                 "--profile", "balanced", "--h", "8", "--noise-shape", "row", "--alpha-e", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "protects against: not stated for these custom parameters" in out
    assert json.loads((tmp_path / "obf" / "aloe.json").read_text())["profile"]["noise_shape"] == "row"
    for name in PROFILES:
        assert PROFILES[name].protects, name   # every named profile says it in one sentence
    assert main(["obfuscate", str(plain_dir), str(tmp_path / "o2"), "--secret", str(tmp_path / "s2.json"),
                 "--adapt-steps", "-1"]) == 2
    assert "--adapt-steps must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("override,reason", [
    (["--h", "-4"], "h must be a finite number >= 0, got -4"),
    (["--alpha-e", "nan"], "alpha_e must be a finite number >= 0.0, got nan"),
    (["--alpha-h", "-0.1"], "alpha_h must be a finite number >= 0.0"),
    (["--beta", "0"], "beta must be a finite number >= 1, got 0"),
    (["--lam", "-1"], "lam must be a finite number >= 0.0"),
    (["--embed-shear", "inf"], "embed_shear must be a finite number >= 0.0, got inf"),
])
def test_obfuscate_refuses_a_meaningless_working_point_before_any_work(tmp_path, capsys, override, reason):
    """Negative or non-finite noise, a negative expansion, no permutation window: one line, exit 2, and neither the
    artifact nor the secret is written (before this, each gave a silently degenerate artifact). A zero shard size is
    refused by the parser (tests/test_cli_arguments.py)."""
    from aloe.cli import main

    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    capsys.readouterr()
    assert main(["obfuscate", str(plain_dir), str(tmp_path / "obf"), "--secret", str(tmp_path / "s.json"),
                 "--profile", "exact", *override]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and "\n" not in err
    assert not (tmp_path / "obf").exists() and not (tmp_path / "s.json").exists()


def test_profiles_check_every_parameter():
    from aloe.obfuscation.profiles import Profile

    for name in PROFILES:            # the named ones and the sweep's hold
        assert PROFILES[name].with_overrides(name=name) is not None
    for bad, reason in ((dict(keys="rsa"), "keys must be"), (dict(noise_shape="column"), "noise_shape must be"),
                        (dict(h=2.5), "h must be an integer"), (dict(sv_floor=0.0), "sv_floor must be"),
                        (dict(sv_floor=1.5), "sv_floor must be"), (dict(gamma=0.0), "gamma must be"),
                        (dict(adapt_lr=-1e-3), "adapt_lr must be"), (dict(adapt_rank=0), "adapt_rank must be"),
                        (dict(vo_spread=0.5), "vo_spread must be"), (dict(qk_scale=(1.1, 0.9)), "qk_scale must be"),
                        (dict(ffn_scale=(0.0, 1.0)), "ffn_scale must be"), (dict(adapt_steps=True), "adapt_steps")):
        with pytest.raises(AloeError, match=reason):
            Profile(name="x", **bad)

def test_an_artifact_is_reused_when_only_the_wording_of_its_profile_changed(tmp_path):
    from dataclasses import replace

    plain_dir = tiny_model("llama-gqa-tied", tmp_path / "plain")
    first = obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", EXACT, progress=False)
    reworded = replace(EXACT, description="other words", protects="another sentence")
    again = obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", reworded, progress=False)
    assert not first["reused"] and again["reused"]
    with pytest.raises(AloeError, match="already exists"):  # a changed parameter is another artifact
        obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", replace(EXACT, alpha_e=0.1),
                             progress=False)


def test_adaptation_trains_phi3s_fused_projections(tmp_path):
    """Phi-3's q/k/v and gate/up are fused modules: the LoRA adapters go on them too, and the merged artifact is
    still a stock Phi-3 checkpoint, its fused tensors moved by the training."""
    from test_obfuscation_arch import tiny

    plain_dir = tiny("phi3", tmp_path / "plain")
    train = np.random.default_rng(0).integers(0, 97, size=1024)
    obfuscate_checkpoint(plain_dir, tmp_path / "noisy", tmp_path / "s.json", _adapt_profile(0), dtype="float32",
                         progress=False)
    summary = obfuscate_checkpoint(plain_dir, tmp_path / "adapted", tmp_path / "s.json", _adapt_profile(6),
                                   dtype="float32", progress=False, adapt_token_ids=train,
                                   adapt_options=dict(seq_len=16, batch=4, save_every=3))
    trained = summary["adaptation"]["trained"]
    assert "qkv_proj" in trained and "gate_up_proj" in trained, trained
    a, n = _tensors(tmp_path / "adapted"), _tensors(tmp_path / "noisy")
    assert set(a) == set(n) and "model.layers.0.self_attn.qkv_proj.weight" in a
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"):
        assert not torch.equal(a[name], n[name])
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "adapted")).__name__ == "Phi3ForCausalLM"
