"""What differs between the supported architectures: tensor names, norm conventions, QK-norm, MoE layout, RoPE.

The conversion in :mod:`aloe.obfuscation.model` is the same for all of them; an :class:`ArchSpec` tells it where
each tensor lives and which variant of a transform applies (docs/aloepri.md explains why each variant is exact).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aloe import AloeError


@dataclass(frozen=True)
class MoeNames:
    """Tensor names of a sparse MoE block, relative to ``model.layers.{i}.``."""

    router: str
    expert: str                           # format string with {e}
    proj: tuple[str, str, str]            # gate, up, down
    shared: str | None = None             # shared expert (Qwen2-MoE), same proj names as a dense MLP
    shared_gate: str | None = None        # sigmoid gate of the shared expert (1 x d)

    def expert_weight(self, e: int, which: int) -> str:
        return f"{self.expert.format(e=e)}.{self.proj[which]}.weight"


QWEN_MOE = MoeNames(router="mlp.gate.weight", expert="mlp.experts.{e}", proj=("gate_proj", "up_proj", "down_proj"))
QWEN2_MOE = MoeNames(router="mlp.gate.weight", expert="mlp.experts.{e}", proj=("gate_proj", "up_proj", "down_proj"),
                     shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate.weight")
MIXTRAL_MOE = MoeNames(router="block_sparse_moe.gate.weight", expert="block_sparse_moe.experts.{e}",
                       proj=("w1", "w3", "w2"))


@dataclass(frozen=True)
class ArchSpec:
    """One supported architecture.

    ``norm_offset``: the stock RMSNorm multiplies by ``offset + w`` (Gemma: 1). ``post_attn_norm`` /
    ``post_ffn_norm``: sandwich norms on the sublayer outputs before they join the residual (Gemma 3); they force the
    sandwich residual key (:class:`aloe.obfuscation.norm.SandwichKeys`). ``embed_scale``: the engine multiplies the
    embedding by sqrt(hidden_size). ``qk_norm``: an RMSNorm over head_dim on q and k before RoPE.
    """

    model_type: str
    architecture: str
    module: str                             # transformers.models.<module>.modeling_<module>
    rotary: str                             # the rotary embedding class in that module
    activations: tuple[str, ...] = ("silu",)
    act_field: str = "hidden_act"
    qk_norm: bool = False
    norm_offset: float = 0.0
    pre_ffn_norm: str = "post_attention_layernorm"
    post_attn_norm: str | None = None
    post_ffn_norm: str | None = None
    embed_scale: bool = False
    moe: MoeNames | None = None
    n_experts_fields: tuple[str, ...] = ("num_experts", "num_local_experts")   # the first one present counts
    moe_ffn_field: str = "moe_intermediate_size"
    fused_qkv: str | None = None            # one tensor holding q, k and v stacked by rows (Phi-3)
    fused_gate_up: str | None = None        # one tensor holding gate and up stacked by rows (Phi-3)

    @property
    def sandwich(self) -> bool:
        return self.post_attn_norm is not None

    def fused_parts(self, n_layers: int, q: int, kv: int, ffn: int) -> dict[str, list[tuple[str, int]]]:
        """Per fused tensor of every layer, its parts in row order: ``{fused: [(part, rows), ...]}`` (names
        without ``.weight``, relative to the model). Empty where the architecture stores each projection apart."""
        out: dict[str, list[tuple[str, int]]] = {}
        for layer in range(n_layers):
            p = f"model.layers.{layer}."
            if self.fused_qkv:
                out[p + self.fused_qkv] = [(p + f"self_attn.{n}_proj", r) for n, r in (("q", q), ("k", kv), ("v", kv))]
            if self.fused_gate_up:
                out[p + self.fused_gate_up] = [(p + "mlp.gate_proj", ffn), (p + "mlp.up_proj", ffn)]
        return out

    def norm_multiplier(self, stored: np.ndarray) -> np.ndarray:
        """What the engine multiplies a normalised vector by, given the stored weight."""
        return stored + self.norm_offset

    def norm_stored(self, multiplier: np.ndarray | float, n: int) -> np.ndarray:
        """The weight to store so that the engine multiplies by ``multiplier``."""
        return np.broadcast_to(np.asarray(multiplier, dtype=np.float64) - self.norm_offset, (n,)).copy()


SPECS: dict[str, ArchSpec] = {s.model_type: s for s in (
    ArchSpec("llama", "LlamaForCausalLM", "llama", "LlamaRotaryEmbedding"),
    ArchSpec("mistral", "MistralForCausalLM", "mistral", "MistralRotaryEmbedding"),
    ArchSpec("ministral", "MinistralForCausalLM", "ministral", "MinistralRotaryEmbedding"),
    ArchSpec("granite", "GraniteForCausalLM", "granite", "GraniteRotaryEmbedding"),
    ArchSpec("smollm3", "SmolLM3ForCausalLM", "smollm3", "SmolLM3RotaryEmbedding"),
    ArchSpec("qwen2", "Qwen2ForCausalLM", "qwen2", "Qwen2RotaryEmbedding"),
    ArchSpec("phi3", "Phi3ForCausalLM", "phi3", "Phi3RotaryEmbedding", fused_qkv="self_attn.qkv_proj",
             fused_gate_up="mlp.gate_up_proj"),
    ArchSpec("qwen3", "Qwen3ForCausalLM", "qwen3", "Qwen3RotaryEmbedding", qk_norm=True),
    ArchSpec("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "Qwen3MoeRotaryEmbedding", qk_norm=True,
             moe=QWEN_MOE),
    ArchSpec("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "Qwen2MoeRotaryEmbedding", moe=QWEN2_MOE),
    ArchSpec("mixtral", "MixtralForCausalLM", "mixtral", "MixtralRotaryEmbedding", moe=MIXTRAL_MOE,
             moe_ffn_field="intermediate_size"),
    # Gemma 1: Llama's layout with Gemma's (1 + w) norms, the embedding scaled by sqrt(hidden_size) and a GeGLU FFN
    # (its configs' legacy "gelu" is read as the tanh approximation by transformers); no sandwich norms
    ArchSpec("gemma", "GemmaForCausalLM", "gemma", "GemmaRotaryEmbedding",
             activations=("gelu_pytorch_tanh", "gelu"), norm_offset=1.0, embed_scale=True),
    ArchSpec("gemma2", "Gemma2ForCausalLM", "gemma2", "Gemma2RotaryEmbedding",
             activations=("gelu_pytorch_tanh",), act_field="hidden_activation", norm_offset=1.0,
             pre_ffn_norm="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
             post_ffn_norm="post_feedforward_layernorm", embed_scale=True),
    ArchSpec("gemma3_text", "Gemma3ForCausalLM", "gemma3", "Gemma3RotaryEmbedding",
             activations=("gelu_pytorch_tanh",), act_field="hidden_activation", qk_norm=True, norm_offset=1.0,
             pre_ffn_norm="pre_feedforward_layernorm", post_attn_norm="post_attention_layernorm",
             post_ffn_norm="post_feedforward_layernorm", embed_scale=True),
)}

SUPPORTED_ARCHITECTURES = {s.model_type: s.architecture for s in SPECS.values()}


def spec_for(model_type: str) -> ArchSpec:
    try:
        return SPECS[model_type]
    except KeyError:
        raise AloeError(f"unsupported model_type {model_type!r}; aloe obfuscates "
                        f"{', '.join(SUPPORTED_ARCHITECTURES.values())}") from None


def layer_types(config: dict, n_layers: int) -> list[str | None]:
    """The attention type of every layer (sliding/full), or None where the config does not say."""
    types = config.get("layer_types")
    return list(types) if types and len(types) == n_layers else [None] * n_layers


def rope_inv_freq(model_dir: Path, model_type: str, layer_type: str | None = None) -> np.ndarray:
    """The real RoPE inverse frequencies of the model (rope scalings included; per layer type where the model has
    several, as Gemma 3's local and global layers).

    A model whose config holds one set of RoPE parameters gets them without importing its modeling module (about 2
    s, a quarter of a SmolLM2 conversion): a scaled RoPE type through transformers' own ``ROPE_INIT_FUNCTIONS``, the
    default type by the formula every supported model's rotary class uses, in the same float32 arithmetic (equal
    to the class's frequencies for every supported architecture: tests). Per-layer-type parameters, a partial
    rotary factor and the types whose frequencies change with the sequence length (longrope, dynamic) go through
    the model's rotary class."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir))
    params = getattr(cfg, "rope_parameters", None)
    if (isinstance(params, dict) and "rope_theta" in params and params.get("rope_type") not in ("longrope", "dynamic")
            and float(params.get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", None) or 1.0)
            == 1.0):
        return _single_rope_inv_freq(cfg, params)
    return rotary_class_inv_freq(cfg, model_type, layer_type)


def rotary_class_inv_freq(cfg, model_type: str, layer_type: str | None = None) -> np.ndarray:
    """The inverse frequencies of the model's own rotary embedding class, built from its config."""
    spec = spec_for(model_type)
    module = importlib.import_module(f"transformers.models.{spec.module}.modeling_{spec.module}")
    rotary = getattr(module, spec.rotary)(cfg)
    if layer_type is not None and hasattr(rotary, f"{layer_type}_inv_freq"):
        return getattr(rotary, f"{layer_type}_inv_freq").double().numpy()
    return rotary.inv_freq.double().numpy()


def _single_rope_inv_freq(cfg, params: dict) -> np.ndarray:
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise AloeError(f"unknown RoPE type {rope_type!r} in the model's config")
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg)
        return inv_freq.double().numpy()
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = params["rope_theta"]
    return (1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).double().numpy()
