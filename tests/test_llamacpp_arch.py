"""llama.cpp's own ``llama-server`` on the obfuscated Qwen3 (QK-norm), mixture-of-experts, Mistral and SmolLM3 (layers
without RoPE) architectures. An obfuscated Gemma 2, Granite or Phi-3 is refused at export: llama.cpp ties Gemma 2's
output layer to the token embedding, its Granite converter drops head_dim, and its Phi-3 converter derives the head
size from the hidden size.

Tiny random models of each architecture get SmolLM2's tokenizer and vocabulary (49152), because llama.cpp's
``convert_hf_to_gguf.py`` only exports a tokenizer whose pre-tokenizer it knows. Each is obfuscated with the ``exact``
key design (no noise; ``h`` = 16 since exact-norm keys need ``h <= d`` and d is 64 here), exported with
``aloe export gguf`` (F32) and served by ``llama-server``: through ``PrivateClient`` the greedy tokens, mapped back
with the secret, must equal the plain model's greedy tokens in float32 transformers for the same prompt ids.

The random weights are fixed, with a seed per architecture whose plain greedy runs are decisive, which the test
checks: the top-1 logit (about 35) leads the runner-up by at least 0.04 at every step, far above float32 rounding,
and float64 picks the same tokens.

Qwen2-MoE is refused by llama.cpp's loader (a strict xfail): its ``qwen2moe`` model code creates ``attn_q`` and
``attn_output`` as ``n_embd x n_embd``, ignoring ``attention.key_length``, so it loads only models whose heads span
the hidden size. The obfuscated model widens the hidden size (d + 2h) and keeps the heads, which Qwen3, Qwen3-MoE
and Mixtral's loaders (``n_embd_head_k * n_head``) accept. The plain tiny Qwen2-MoE's GGUF, whose heads do span
its hidden size, loads and gives the plain greedy tokens (checked by hand).
"""

import shutil
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
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

from aloe import AloeError
from aloe.obfuscation.client import PrivateClient
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
from aloe.serving.commands import llama_server_command
from aloe.serving.llamacpp import llama_server_binary
from aloe.serving.local import free_port, server_process
from gguf_tables import read_gguf

pytestmark = pytest.mark.real_model   # SmolLM2's tokenizer comes from the real SmolLM2 folder

H = 16
EXACT = PROFILES["exact"].with_overrides(name="exact-tiny", h=H)
VOCAB = 49152   # SmolLM2's
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
CONFIGS = {
    "qwen3": lambda: Qwen3Config(intermediate_size=96, head_dim=16, **COMMON),
    "qwen3-moe": lambda: Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, **COMMON),
    "mixtral": lambda: MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                     **COMMON),
    "qwen2-moe": lambda: Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                        **COMMON),
    "mistral": lambda: MistralConfig(intermediate_size=96, head_dim=16, **COMMON),
    "granite": lambda: GraniteConfig(intermediate_size=96, embedding_multiplier=4.0, residual_multiplier=0.5,
                                     attention_multiplier=0.1, logits_scaling=1.0, **COMMON),
    "smollm3": lambda: SmolLM3Config(intermediate_size=96, no_rope_layer_interval=2, **COMMON),
    "ministral": lambda: MinistralConfig(intermediate_size=96, head_dim=16, **COMMON),
    "gemma2": lambda: Gemma2Config(intermediate_size=96, head_dim=16, query_pre_attn_scalar=16, **COMMON),
    "gemma": lambda: GemmaConfig(intermediate_size=96, head_dim=16, **COMMON),
    "phi3": lambda: Phi3Config(intermediate_size=96, **COMMON),
}
GGUF_ARCH = {"qwen3": "qwen3", "qwen3-moe": "qwen3moe", "mixtral": "llama", "qwen2-moe": "qwen2moe",
             "mistral": "llama", "granite": "granite", "smollm3": "smollm3"}
MOE = ("qwen3-moe", "mixtral", "qwen2-moe")
EAGER = {"experts_implementation": "eager"}   # the grouped-matmul experts take no float64 on CPU
PROMPTS = ["The capital of France is", "Give me three tips for a job interview."]
N_TOKENS = 12
SEEDS = {"qwen3": 3, "qwen3-moe": 3, "mixtral": 0, "qwen2-moe": 0,   # init seeds with decisive greedy runs
         "mistral": 0, "smollm3": 0}
MIN_MARGIN = 0.04    # top-1 minus top-2 logit at every plain greedy step (the top logits are about 35, the std 8)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# llama.cpp's refusals, verified in its source (src/models/qwen2moe.cpp: attn_q {n_embd, n_embd}, attn_output
# {n_embd, n_embd}): the model is fine in stock transformers and its GGUF carries key_length = 16
REFUSED = {"qwen2-moe": "check_tensor_dims: tensor 'blk.0.attn_q.weight' has wrong shape; expected     96,     96, "
                        "got     96,     64"}


class LlamaCppRefused(Exception):
    """llama-server refused to load the GGUF, for the reason recorded in ``REFUSED``."""


def tiny_model_with_smollm2_vocab(kind: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random ``kind`` model (fixed, non-secret seed) with SmolLM2's vocabulary and tokenizer files, saved in
    float32: non-trivial norms, routers that really choose between experts, and an lm_head scaled up (x50) so the
    logits have a std of about 8 rather than 0.2."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.copy_(torch.randn_like(p))
        model.lm_head.weight.mul_(50)
    model.save_pretrained(folder)
    for f in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / f, folder / f)
    return folder


def plain_greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    """The plain model's greedy tokens in float32 transformers, checked decisive (margins, float64 agreement)."""
    f32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    f64 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, **EAGER).eval()
    answers = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = f32.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
            out64 = f64.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_TOKENS,
                                 min_new_tokens=N_TOKENS, do_sample=False)
        want = out.sequences[0, x.shape[1]:].tolist()
        top2 = torch.stack([step[0].topk(2).values for step in out.logits])
        assert len(want) == N_TOKENS and (top2[:, 0] - top2[:, 1]).min().item() >= MIN_MARGIN
        assert out64[0, x.shape[1]:].tolist() == want
        answers.append(want)
    return answers


@contextmanager
def llama_server(gguf: Path, log: Path, refusal: str | None):
    """llama-server on ``gguf``; a load refusal raises LlamaCppRefused if it is the expected one."""
    port = free_port()
    with ExitStack() as stack:
        try:
            url, _ = stack.enter_context(server_process(llama_server_command(gguf, "127.0.0.1", port, 2, 256), port,
                                                        timeout=120, log=log))
        except AloeError:
            errors = [line for line in log.read_text().splitlines() if "error loading model" in line]
            if refusal and errors and refusal in errors[0]:
                raise LlamaCppRefused(errors[0]) from None
            raise AssertionError(f"llama-server did not start: {errors[:1] or log.read_text()[-2000:]}") from None
        yield url


@pytest.fixture(scope="module")
def llama_server_bin():
    try:
        return llama_server_binary(progress=False)
    except AloeError as exc:
        pytest.skip(f"llama-server cannot be built here: {exc}")


@pytest.mark.parametrize("kind", [
    "qwen3", "qwen3-moe", "mixtral", "mistral", "smollm3",
    pytest.param("qwen2-moe", marks=pytest.mark.xfail(
        strict=True, raises=LlamaCppRefused,
        reason="llama.cpp's qwen2moe loader assumes n_head * head_dim == n_embd (attn_q is n_embd x n_embd)")),
])
def test_llama_server_on_obfuscated_gguf_gives_the_plain_greedy_tokens(kind, llama_server_bin, smollm2_path,
                                                                       tmp_path):
    plain_dir = tiny_model_with_smollm2_vocab(kind, tmp_path / "plain", smollm2_path, SEEDS[kind])
    tok = AutoTokenizer.from_pretrained(plain_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    answers = plain_greedy(plain_dir, prompts)

    obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "secret.json", EXACT, progress=False)
    gguf = tmp_path / "obf.gguf"
    res = subprocess.run([sys.executable, "-m", "aloe.cli", "export", "gguf", str(tmp_path / "obf"), str(gguf),
                          "--outtype", "f32", "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]

    # llama.cpp reads the widened hidden size with the plain heads
    cfg = CONFIGS[kind]()
    meta, tensors, buf = read_gguf(gguf)
    a = GGUF_ARCH[kind]
    assert meta["general.architecture"] == a
    assert meta[f"{a}.embedding_length"] == cfg.hidden_size + 2 * H
    assert meta[f"{a}.attention.key_length"] == meta[f"{a}.attention.value_length"] == 16
    assert tensors["blk.0.attn_q.weight"][0] == (cfg.hidden_size + 2 * H, 4 * 16)
    assert tensors["token_embd.weight"][0] == (cfg.hidden_size + 2 * H, VOCAB)
    if kind in MOE:
        assert meta[f"{a}.expert_count"] == 4 and meta[f"{a}.expert_used_count"] == 2
    buf.close()

    with llama_server(gguf, tmp_path / "llama-server.log", REFUSED.get(kind)) as url:
        client = PrivateClient(url, tmp_path / "secret.json", tok, backend="llama.cpp")
        client.verify()
        for ids, want in zip(prompts, answers, strict=True):
            got = client.complete(ids, max_tokens=N_TOKENS, temperature=0.0)
            assert got.token_ids == want, (kind, tok.decode(ids), got.token_ids, want)
            assert got.server_prompt_ids != ids and got.server_output_ids != want


@pytest.mark.parametrize("kind,reason", [("gemma2", "cannot serve an obfuscated Gemma2ForCausalLM"),
                                         ("gemma", "cannot serve an obfuscated GemmaForCausalLM"),
                                         ("granite", "cannot serve an obfuscated GraniteForCausalLM"),
                                         ("phi3", "cannot serve an obfuscated Phi3ForCausalLM"),
                                         ("ministral", "MinistralForCausalLM")])
def test_export_refuses_what_llama_cpp_would_serve_wrong(kind, reason, smollm2_path, tmp_path):
    """llama.cpp's Gemma and Gemma 2 take their output layer from the token embedding (the converter drops
    lm_head), which would answer wrong tokens for an obfuscated model, whose head has its own key; its Granite
    converter drops
    head_dim, which the widened hidden size needs, and its Phi-3 converter derives the head size and the RoPE
    dimensions from the hidden size; its converter does not know Ministral. The export says so, in one
    line, and writes nothing."""
    plain_dir = tiny_model_with_smollm2_vocab(kind, tmp_path / "plain", smollm2_path)
    obfuscate_checkpoint(plain_dir, tmp_path / "obf", tmp_path / "secret.json", EXACT, progress=False)
    out = tmp_path / "obf.gguf"
    res = subprocess.run([sys.executable, "-m", "aloe.cli", "export", "gguf", str(tmp_path / "obf"), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and not out.exists() and not list(tmp_path.glob(".obf.gguf*"))
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and reason in err[0], err
    assert kind == "ministral" or "aloe serve" in err[0]
