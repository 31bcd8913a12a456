"""Tiny random Llama/Qwen2 checkpoints for exactness tests (float64)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2


def _rms_norm_native_dtype(self, x):
    # transformers computes the RMS in float32 even for float64 models; exactness tests need float64 throughout.
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def float64_norms(monkeypatch) -> None:
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_native_dtype)
    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", _rms_norm_native_dtype)


CONFIGS = {
    "llama-gqa-tied": lambda: LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=97,
                                          tie_word_embeddings=True, rope_theta=1e4),
    "llama-mha-bias-llama3rope": lambda: LlamaConfig(
        hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, vocab_size=97, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2-gqa3-bias-untied": lambda: Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                  num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                                  vocab_size=97, tie_word_embeddings=False, rope_theta=1e6),
    "qwen2-mqa-tied": lambda: Qwen2Config(hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=1, head_dim=6, vocab_size=97,
                                          tie_word_embeddings=True, rope_theta=1e6),
}


def tiny_model(kind: str, folder: Path, seed: int = 0) -> Path:
    """A random model (fixed, non-secret init seed) with non-trivial norms and biases, saved in float64."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder
