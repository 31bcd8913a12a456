"""More architectures on tiny random float64 models: Qwen3 (QK-norm), MoE (Qwen3-MoE, Qwen2-MoE with a shared
expert, Mixtral), Gemma 3 (sandwich norms, (1 + w) norms, GeGLU, scaled embedding, sliding layers), Gemma 2 (the
same without QK-norm, with attention and final logit soft-capping), Mistral and Ministral (sliding windows), Granite
(embedding, residual, attention and logit multipliers), SmolLM3 (layers without RoPE) and Phi-3 (q, k, v in one
fused tensor, gate and up in another).

Each obfuscated checkpoint is loaded by stock transformers (``AutoModelForCausalLM``, no aloe code) and its
de-permuted logits must equal the plain model's to 1e-9 through prefill and KV-cache decode; the float32 conversion
(the default output, its own code path) must equal them to float32 rounding.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GraniteConfig,
    MinistralConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
)
from transformers.models.gemma import modeling_gemma
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.granite import modeling_granite
from transformers.models.ministral import modeling_ministral
from transformers.models.mistral import modeling_mistral
from transformers.models.mixtral import modeling_mixtral
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2_moe import modeling_qwen2_moe
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_moe import modeling_qwen3_moe
from transformers.models.smollm3 import modeling_smollm3

from aloe import AloeError
from aloe.obfuscation import model as conversion
from aloe.obfuscation.attention import group_transform, qk_norm_weight
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.norm import SandwichKeys, rms_norm
from aloe.obfuscation.profiles import PROFILES
from aloe.obfuscation.rng import SecureRandom, new_seed
from aloe.obfuscation.secret import load_secret
from obfuscation_helpers import _rms_norm_native_dtype

EXACT = PROFILES["exact"].with_overrides(name="exact-tiny", h=8)

CONFIGS = {
    "qwen3": lambda: Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, vocab_size=97, tie_word_embeddings=False,
                                 rope_theta=1e6),
    "qwen3-bias-mqa-tied": lambda: Qwen3Config(hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=1, head_dim=6,
                                               vocab_size=97, tie_word_embeddings=True, attention_bias=True),
    "qwen3-moe": lambda: Qwen3MoeConfig(hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                                        num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                                        decoder_sparse_step=1, mlp_only_layers=[1], num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=97),
    "qwen2-moe-shared": lambda: Qwen2MoeConfig(hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
                                               shared_expert_intermediate_size=20, num_experts=6,
                                               num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=97),
    "mixtral": lambda: MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     vocab_size=97, tie_word_embeddings=False),
    "gemma3": lambda: Gemma3TextConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=97, sliding_window=4, query_pre_attn_scalar=8, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "gemma2": lambda: Gemma2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=97, sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0),
    "gemma": lambda: GemmaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, vocab_size=97, hidden_act="gelu"),
    "mistral": lambda: MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, vocab_size=97, sliding_window=4,
                                     tie_word_embeddings=False),
    "ministral": lambda: MinistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=97,
                                         sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "granite": lambda: GraniteConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=97, embedding_multiplier=12.0,
                                     residual_multiplier=0.22, attention_multiplier=0.0156, logits_scaling=8.0,
                                     tie_word_embeddings=True),
    "smollm3": lambda: SmolLM3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=97, no_rope_layer_interval=2,
                                     tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi3": lambda: Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=97, sliding_window=4, tie_word_embeddings=False,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
# long-context Phi-3 (longrope): transformers checks its factors against hidden_size / heads, so a widened config
# would not load; the conversion refuses it before any work
PHI3_LONGROPE = lambda: Phi3Config(  # noqa: E731
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=97, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    max_position_embeddings=64, original_max_position_embeddings=8,
    rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 1.1, 1.3, 1.7],
                     "long_factor": [1.0, 2.0, 4.0, 9.0], "original_max_position_embeddings": 8})
EAGER = {"experts_implementation": "eager"}   # the grouped-matmul experts take no float64 on CPU
ROUTERS = {"qwen3-moe": "mlp.gate", "qwen2-moe-shared": "mlp.gate", "mixtral": "mlp.gate"}


def _gemma_norm_native_dtype(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def _router_native_dtype(self, hidden_states):
    # the stock routers take the softmax in float32; exactness tests need float64 throughout
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    top, idx = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top, idx


@pytest.fixture
def float64_everywhere(monkeypatch):
    for cls in (modeling_qwen3.Qwen3RMSNorm, modeling_qwen3_moe.Qwen3MoeRMSNorm, modeling_qwen2_moe.Qwen2MoeRMSNorm,
                modeling_mixtral.MixtralRMSNorm, modeling_mistral.MistralRMSNorm, modeling_ministral.MinistralRMSNorm,
                modeling_granite.GraniteRMSNorm, modeling_smollm3.SmolLM3RMSNorm, modeling_phi3.Phi3RMSNorm):
        monkeypatch.setattr(cls, "forward", _rms_norm_native_dtype)
    for cls in (modeling_gemma3.Gemma3RMSNorm, modeling_gemma2.Gemma2RMSNorm, modeling_gemma.GemmaRMSNorm):
        monkeypatch.setattr(cls, "forward", _gemma_norm_native_dtype)
    for cls in (modeling_qwen3_moe.Qwen3MoeTopKRouter, modeling_qwen2_moe.Qwen2MoeTopKRouter,
                modeling_mixtral.MixtralTopKRouter):
        monkeypatch.setattr(cls, "forward", _router_native_dtype)


def tiny(kind, folder):
    """A random model (fixed, non-secret init seed) with non-trivial norms, biases and routers, saved in float64."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.float64, **EAGER).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if kind.startswith("gemma") else 1.0) + 0.3 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.copy_(torch.randn_like(p))       # routers that really choose between experts
    model.save_pretrained(folder)
    return folder


def convert(tmp_path, kind, profile=EXACT):
    plain_dir = tiny(kind, tmp_path / "plain")
    obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "secret.json", profile, dtype="float64",
                         progress=False)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float64, **EAGER).eval()
    obf = AutoModelForCausalLM.from_pretrained(tmp_path / "obf", dtype=torch.float64, **EAGER).eval()
    return plain, obf, torch.as_tensor(load_secret(tmp_path / "secret.json").tau)


def max_diff_prefill_and_decode(plain, obf, tau, steps=4):
    """max |plain logits - de-permuted obfuscated logits| over a prefill of 2 x 9 tokens and ``steps`` decode steps
    from the KV cache (greedy on the plain model)."""
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    worst = 0.0
    with torch.no_grad():
        out_p, out_o = plain(ids, use_cache=True), obf(tau[ids], use_cache=True)
        worst = max(worst, (out_p.logits - out_o.logits[..., tau]).abs().max().item())
        cache_p, cache_o = out_p.past_key_values, out_o.past_key_values
        nxt = out_p.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            step_p = plain(nxt, cache=cache_p, use_cache=True)
            step_o = obf(tau[nxt], cache=cache_o, use_cache=True)
            worst = max(worst, (step_p.logits - step_o.logits[..., tau]).abs().max().item())
            cache_p, cache_o = step_p.past_key_values, step_o.past_key_values
            nxt = step_p.logits[:, -1:].argmax(-1)
        own_order = (out_p.logits - out_o.logits).abs().max().item()
    return worst, own_order


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_exact_profile_is_exact_through_prefill_and_kv_cache_decode(tmp_path, float64_everywhere, kind):
    plain, obf, tau = convert(tmp_path, kind)
    assert type(obf) is type(plain) and obf.config.model_type == plain.config.model_type
    assert obf.config.hidden_size == plain.config.hidden_size + 2 * 8
    worst, own_order = max_diff_prefill_and_decode(plain, obf, tau)
    assert worst <= 1e-9
    assert own_order > 1e-3   # the obfuscated model in its own id order is a different model


# the float32 path against the plain model: the largest logit difference over the largest plain logit (measured on
# these configs: <= 4.4e-7, Gemma 3), and each float32 tensor against the float64 artifact of the same secret,
# relative to that tensor's largest entry (measured: <= 3.5e-7), as tests/test_obfuscation_streaming.py bounds Qwen2
F32_LOGIT_TOL = 2e-6
F32_TENSOR_TOL = 5e-6
F32_KINDS = ("qwen3", "qwen3-bias-mqa-tied", "qwen3-moe", "qwen2-moe-shared", "mixtral", "gemma3", "gemma2", "gemma",
             "granite", "smollm3", "phi3")


@pytest.mark.parametrize("kind", F32_KINDS)
def test_float32_conversion_is_exact_to_float32_rounding(tmp_path, float64_everywhere, monkeypatch, kind):
    """The default output dtype (float32) takes the factored float32 transforms (QK-norm attention, experts one at a
    time, sandwich norms): its de-permuted logits, computed in float64 from the float32 weights, match the plain
    model through prefill and KV-cache decode, and every tensor matches the float64 conversion."""
    calls = {"attention": [], "moe": 0, "float64": 0}
    attention_f32, moe_f32 = conversion.obfuscate_attention_f32, conversion.obfuscate_moe_f32

    def spy_attention(*args, **kwargs):
        calls["attention"].append(kwargs.get("qk_norm") is not None)
        return attention_f32(*args, **kwargs)

    def spy_moe(*args, **kwargs):
        calls["moe"] += 1
        return moe_f32(*args, **kwargs)

    def float64_transform(original):
        def spy(*args, **kwargs):
            calls["float64"] += 1
            return original(*args, **kwargs)
        return spy

    monkeypatch.setattr(conversion, "obfuscate_attention_f32", spy_attention)
    monkeypatch.setattr(conversion, "obfuscate_moe_f32", spy_moe)
    for name in ("obfuscate_attention", "obfuscate_moe", "obfuscate_ffn", "obfuscate_embedding", "obfuscate_head"):
        monkeypatch.setattr(conversion, name, float64_transform(getattr(conversion, name)))

    plain_dir = tiny(kind, tmp_path / "plain")
    summary = obfuscate_checkpoint(plain_dir, tmp_path / "f32", tmp_path / "secret.json", EXACT, progress=False)
    n_layers = CONFIGS[kind]().num_hidden_layers
    assert summary["dtype"] == "float32" and calls["float64"] == 0
    qk_norm = kind.startswith("qwen3") or kind == "gemma3"
    assert calls["attention"] == [qk_norm] * n_layers            # every layer, QK-norm where the model has it
    assert calls["moe"] == (2 if kind == "qwen3-moe" else n_layers if kind in ROUTERS else 0)

    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float64, **EAGER).eval()
    obf = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float64, **EAGER).eval()
    tau = torch.as_tensor(load_secret(tmp_path / "secret.json").tau)
    with torch.no_grad():
        scale = plain(torch.arange(97)[None, :]).logits.abs().max().item()
    worst, own_order = max_diff_prefill_and_decode(plain, obf, tau)
    assert worst <= F32_LOGIT_TOL * scale, (worst, scale)
    assert own_order > 1e-3

    monkeypatch.undo()
    obfuscate_checkpoint(plain_dir, tmp_path / "f64", tmp_path / "secret.json", EXACT, dtype="float64",
                         progress=False)
    with safe_open(str(tmp_path / "f64" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "f32" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            ref, got = a.get_tensor(k), b.get_tensor(k)
            assert got.dtype == torch.float32 and got.shape == ref.shape, k
            assert (got.double() - ref).abs().max() <= F32_TENSOR_TOL * max(ref.abs().max().item(), 1e-30), k


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_experts_are_reordered_and_every_token_reaches_the_same_experts(tmp_path, float64_everywhere, kind):
    plain, obf, tau = convert(tmp_path, kind)
    seen = {}

    def keep(key):
        def hook(_m, _i, out):
            seen[key] = out[0]
        return hook

    moe_layers = [i for i, block in enumerate(plain.model.layers) if hasattr(block.mlp, "gate")]
    assert moe_layers
    if kind == "qwen3-moe":   # mlp_only_layers: a dense layer between sparse ones
        assert len(moe_layers) < len(plain.model.layers)
    for i in moe_layers:
        plain.model.layers[i].mlp.gate.register_forward_hook(keep(("plain", i)))
        obf.model.layers[i].mlp.gate.register_forward_hook(keep(("obf", i)))
    ids = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        plain(ids)
        obf(tau[ids])
    slots = []
    for i in moe_layers:
        lp, lo = seen[("plain", i)], seen[("obf", i)]
        slot = [int(torch.argmin((lo - lp[:, [e]]).abs().amax(0))) for e in range(lp.shape[1])]
        assert (lo[:, slot] - lp).abs().max().item() <= 1e-10     # router logits: the plain ones, permuted
        assert sorted(slot) == list(range(lp.shape[1]))
        assert len(set(torch.topk(lp, 2, dim=-1).indices.flatten().tolist())) > 2   # really routed to several
        slots.append(slot)
    assert any(slot != list(range(len(slot))) for slot in slots)   # the experts were reordered


def test_qk_norm_transform_commutes_with_rms_norm_and_rope():
    rng = SecureRandom(new_seed())
    hd, half = 8, 4
    inv_freq = 1.0 / (1e4 ** (np.arange(half) / half))
    t = group_transform(rng, inv_freq, beta=1, gamma=1e3, qk_scale=(0.5, 2.0), vo_spread=2.0, quarter_turns=True)
    w_q, w_k = 1 + 0.3 * rng.normal((hd,)), 1 + 0.3 * rng.normal((hd,))
    wq_t, wk_t = qk_norm_weight(t, w_q, t.H), qk_norm_weight(t, w_k, 1 / t.H)
    q, k = rng.normal((5, hd)), rng.normal((5, hd))

    def rope(x, pos):
        ang = pos[:, None] * inv_freq[None, :]
        c, s = np.concatenate([np.cos(ang)] * 2, 1), np.concatenate([np.sin(ang)] * 2, 1)
        return x * c + np.concatenate([-x[:, half:], x[:, :half]], 1) * s

    pos = np.array([0.0, 3, 7, 11, 40])
    A = t.R @ t.Zb
    plain = rope(rms_norm(q, w_q, 1e-6), pos) @ rope(rms_norm(k, w_k, 1e-6), pos).T
    obf = rope(rms_norm(q @ A, wq_t, 1e-6), pos) @ rope(rms_norm(k @ A, wk_t, 1e-6), pos).T
    np.testing.assert_allclose(obf, plain, atol=1e-12)
    assert not np.allclose(wq_t, w_q)
    general = group_transform(rng, inv_freq, beta=1, gamma=1e3, qk_scale=(0.5, 2.0), vo_spread=2.0)
    with pytest.raises(ValueError, match="quarter turns"):
        qk_norm_weight(general, w_q, general.H)


def test_sandwich_keys_commute_with_pre_and_post_norms():
    rng = SecureRandom(new_seed())
    d, h = 12, 4
    keys = SandwichKeys(rng, d, h)
    P, Q = keys.keymat_gen(), keys.inv_keymat_gen(rng.child("r"))
    np.testing.assert_allclose(P @ Q, np.eye(d), atol=1e-12)
    np.testing.assert_allclose(P @ P.T, keys.scale ** 2 * np.eye(d), atol=1e-12)
    x, g = rng.normal((6, d)), 1 + 0.5 * rng.normal((d,))
    kappa = keys.scale * np.sqrt(d / keys.d_out)
    eps_out = 1e-6 * kappa ** 2
    np.testing.assert_allclose(rms_norm(x @ P, keys.post_norm_multiplier(g, kappa), eps_out),
                               rms_norm(x, g, 1e-6) @ P, atol=1e-12)
    assert (np.abs(P) > 0).sum(0).max() == 1 and (np.abs(P) > 0).sum() == keys.d_out
    assert not np.allclose(Q, P.T / keys.scale ** 2)      # readers carry a fresh part in the null space of P


def test_stock_configs_and_refusals(tmp_path):
    plain_dir = tiny("gemma3", tmp_path / "plain")
    obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", EXACT, progress=False)
    cfg = json.loads((tmp_path / "obf" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["hidden_size"] == 48 and cfg["tie_word_embeddings"] is False and cfg["head_dim"] == 8
    assert json.loads((tmp_path / "obf" / "aloe.json").read_text())["residual_key"] == "sandwich"
    with pytest.raises(AloeError, match="post-sublayer norms"):
        obfuscate_checkpoint(plain_dir, tmp_path / "o2", tmp_path / "s2.json",
                             PROFILES["paper"].with_overrides(h=8), calibration_ids=np.arange(64), progress=False)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "s2.json").exists()

    olmo = tmp_path / "olmo"
    olmo.mkdir()
    (olmo / "config.json").write_text(json.dumps({"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]}))
    with pytest.raises(AloeError, match="unsupported architecture.*MistralForCausalLM.*Qwen2ForCausalLM, "
                                        "Phi3ForCausalLM, Qwen3ForCausalLM, "
                                        "Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM, "
                                        "GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM"):
        obfuscate_checkpoint(olmo, tmp_path / "o3", tmp_path / "s3.json", EXACT, progress=False)

    relu = tmp_path / "relu"
    tiny("qwen3", relu)
    cfg = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps(dict(cfg, hidden_act="relu")))
    with pytest.raises(AloeError, match="hidden_act 'relu' is not supported for Qwen3ForCausalLM"):
        obfuscate_checkpoint(relu, tmp_path / "o4", tmp_path / "s4.json", EXACT, progress=False)

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(PHI3_LONGROPE(), dtype=torch.float64).save_pretrained(tmp_path / "longrope")
    with pytest.raises(AloeError, match="transformers would not load the obfuscated config .* short_factor"):
        obfuscate_checkpoint(tmp_path / "longrope", tmp_path / "o5", tmp_path / "s5.json", EXACT, progress=False)
    assert not (tmp_path / "o5").exists() and not (tmp_path / "s5.json").exists()


def test_paper_keys_with_calibrated_kappa_on_a_moe_model_with_qk_norm(tmp_path, float64_everywhere):
    """The paper's keys: kappa calibrated on hidden states rebuilt through the whole MoE block, and q/k scaled by
    kappa so their norms keep the config's epsilon exact; the model tracks the plain one without equalling it."""
    prof = PROFILES["paper"].with_overrides(name="paper-keys-only", h=8, alpha_e=0.0, alpha_h=0.0, beta=1)
    plain_dir = tiny("qwen3-moe", tmp_path / "plain")
    obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "s.json", prof, dtype="float64",
                         calibration_ids=np.random.default_rng(1).integers(0, 97, 256), progress=False)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float64, **EAGER).eval()
    obf = AutoModelForCausalLM.from_pretrained(tmp_path / "obf", dtype=torch.float64, **EAGER).eval()
    manifest = json.loads((tmp_path / "obf" / "aloe.json").read_text())
    assert manifest["kappa"]["min"] != manifest["kappa"]["max"]
    tau = torch.as_tensor(load_secret(tmp_path / "s.json").tau)
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        lp, lo = plain(ids).logits, obf(tau[ids]).logits[..., tau]
    rel = ((lp - lo).norm() / lp.norm()).item()
    assert 1e-6 < rel < 0.3


def test_rope_frequencies_without_the_modeling_module_equal_the_rotary_class(tmp_path, smollm2_path, gemma3_path):
    """The conversion reads single-parameter RoPE configs without importing the model's modeling module; its
    frequencies must be the rotary class's, bit for bit, on every architecture and RoPE scaling the tests convert."""
    from transformers import AutoConfig, LlamaConfig

    from aloe.obfuscation.architectures import layer_types, rope_inv_freq, rotary_class_inv_freq
    from obfuscation_helpers import CONFIGS as LLAMA_QWEN2_CONFIGS

    configs = {**{f"helpers-{k}": v for k, v in LLAMA_QWEN2_CONFIGS.items()}, **CONFIGS}
    configs["llama-yarn"] = lambda: LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, head_dim=8, vocab_size=97,
                                                rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                 "factor": 4.0,
                                                                 "original_max_position_embeddings": 64})
    folders = {"smollm2": smollm2_path, "gemma3": gemma3_path}
    for kind, make in configs.items():
        make().save_pretrained(tmp_path / kind)
        folders[kind] = tmp_path / kind
    for kind, folder in folders.items():
        cfg = AutoConfig.from_pretrained(str(folder))
        for lt in set(layer_types(cfg.to_dict(), cfg.num_hidden_layers)):
            got = rope_inv_freq(folder, cfg.model_type, lt)
            want = rotary_class_inv_freq(cfg, cfg.model_type, lt)
            assert got.dtype == want.dtype and np.array_equal(got, want), (kind, lt)
    assert not np.array_equal(rope_inv_freq(folders["llama-yarn"], "llama"),
                              rope_inv_freq(folders["helpers-llama-gqa-tied"], "llama"))


def test_fused_projections_are_checked_and_written_fused(tmp_path):
    """Phi-3 stores q, k, v in one tensor and gate, up in another: the artifact keeps that layout (a stock Phi-3
    checkpoint), a fused tensor whose rows are not its parts' sum is refused, and so is a bias on one."""
    from safetensors.torch import load_file, save_file

    plain = tiny("phi3", tmp_path / "plain")
    obfuscate_checkpoint(plain, tmp_path / "obf", tmp_path / "s.json", EXACT, progress=False)
    with safe_open(str(tmp_path / "obf" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert tuple(f.get_slice("model.layers.0.self_attn.qkv_proj.weight").get_shape()) == (4 * 8 + 2 * 2 * 8, 48)
        assert tuple(f.get_slice("model.layers.1.mlp.gate_up_proj.weight").get_shape()) == (2 * 48, 48)
    assert not any(n.endswith((".q_proj.weight", ".k_proj.weight", ".gate_proj.weight", ".up_proj.weight"))
                   for n in names)
    weights = load_file(str(plain / "model.safetensors"))
    for name, edit, reason in (
            ("model.layers.1.self_attn.qkv_proj.weight", lambda w: w[:-1], "has 63 rows, expected 64"),
            ("model.layers.0.mlp.gate_up_proj.bias", lambda w: torch.zeros(96, dtype=torch.float64),
             "biases on fused projections are not supported")):
        broken = tmp_path / f"broken-{name.rsplit('.', 1)[-1]}"
        broken.mkdir()
        for f in plain.iterdir():
            if f.name != "model.safetensors":
                (broken / f.name).write_bytes(f.read_bytes())
        edited = dict(weights)
        edited[name] = edit(weights.get(name, weights["model.layers.0.mlp.gate_up_proj.weight"]))
        save_file(edited, str(broken / "model.safetensors"))
        with pytest.raises(AloeError, match=reason):
            obfuscate_checkpoint(broken, tmp_path / "o-bad", tmp_path / "s-bad.json", EXACT, progress=False)
        assert not (tmp_path / "o-bad").exists() and not (tmp_path / "s-bad.json").exists()
