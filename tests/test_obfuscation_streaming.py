"""The streaming conversion: bounded memory whatever the depth, a reader that checks each tensor without a copy of
it in float64, shards as save_file writes them, and the float32 path against the float64 one."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aloe import AloeError
from aloe.obfuscation.checkpoint import FINITE_CHUNK, CheckpointReader, ShardWriter
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
from obfuscation_helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]
# float32 key products against the float64 ones, relative to each tensor's largest entry (measured: <= 7e-7)
F32_TOL = 5e-6


def synthetic_llama(folder: Path, *, layers: int, d: int = 256, ffn: int = 1024, vocab: int = 2048) -> Path:
    """A random Llama checkpoint (float32, no tokenizer) of the given depth."""
    folder.mkdir(parents=True)
    heads, kv, hd = d // 64, max(1, d // 128), 64
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "hidden_act": "silu", "tie_word_embeddings": False, "rope_theta": 1e4, "max_position_embeddings": 256}
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": (heads * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                  p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, heads * hd),
                  p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                  p + "mlp.down_proj.weight": (d, ffn), p + "input_layernorm.weight": (d,),
                  p + "post_attention_layernorm.weight": (d,)})
    save_file({k: 0.05 * torch.randn(s, generator=g) for k, s in t.items()}, str(folder / "model.safetensors"))
    return folder


CHILD = """
import resource, sys
from pathlib import Path
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
src, out = Path(sys.argv[1]), Path(sys.argv[2])
obfuscate_checkpoint(src, out, out.with_suffix(".secret"), PROFILES["exact"], progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _child_peak_kb(src: Path, out: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return int(proc.stdout.split()[-1])


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    shallow = synthetic_llama(tmp_path / "l2", layers=2)
    deep = synthetic_llama(tmp_path / "l24", layers=24)
    peak_shallow = _child_peak_kb(shallow, tmp_path / "o2")
    peak_deep = _child_peak_kb(deep, tmp_path / "o24")
    out_mb = (tmp_path / "o24" / "model.safetensors").stat().st_size / 2 ** 20
    # the deep output (~200 MB) would be held whole by a writer that collects its shard; the bound is the noise of
    # the allocator and one layer's tensors (~3 MB), far under the output's size
    assert out_mb > 150
    assert (peak_deep - peak_shallow) / 1024 < 40, (peak_shallow, peak_deep)


READ_CHILD = """
import resource, sys
from aloe.obfuscation.checkpoint import CheckpointReader
reader = CheckpointReader(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = reader.tensor("table", (4096, 4096))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_reader_rejects_non_finite_tensors_without_a_float64_copy(tmp_path):
    """Reading a tensor checks that it is finite; the check sums in blocks, so reading a 64 MB float32 table raises
    the peak by about the table (its mapped file pages), not by the 128 MB float64 copy of it that one whole-table
    ``sum(dtype=float64)`` makes."""
    n = 3 * FINITE_CHUNK + 5
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), float("-inf")):
            folder = tmp_path / f"{str(dtype)[6:]}-{bad}"
            folder.mkdir()
            good, poisoned = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
            poisoned[n - 2] = bad                                    # in the last, partial block
            save_file({"good": good, "poisoned": poisoned}, str(folder / "model.safetensors"))
            reader = CheckpointReader(folder)
            assert torch.equal(reader.tensor("good", (n,)), good)
            with pytest.raises(AloeError, match="tensor poisoned holds non-finite values"):
                reader.tensor("poisoned")
    big = tmp_path / "big"
    big.mkdir()
    save_file({"table": torch.randn(4096, 4096)}, str(big / "model.safetensors"))
    proc = subprocess.run([sys.executable, "-c", READ_CHILD, str(big)], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    raised_mb = int(proc.stdout.split()[-1]) / 1024
    assert raised_mb < 1.5 * 64, raised_mb


def test_shard_writer_holds_no_tensor_and_writes_what_save_file_writes(tmp_path):
    writer = ShardWriter(tmp_path, "float32", max_shard_bytes=1 << 20)
    tensors = {f"model.layers.{i}.w": torch.randn(100, 100) for i in (2, 10, 1)}
    refs = []
    for name, t in tensors.items():
        writer.add(name, t)
        refs.append(weakref.ref(t))
    writer.add_rows("model.embed", (50, 100), (torch.randn(10, 100) for _ in range(5)))
    writer.scratch.flush()                                           # on disk already, not in memory
    assert (tmp_path / "shard-00000.data").stat().st_size == 4 * 100 * 100 * 3 + 4 * 50 * 100
    tensors.clear()
    del t
    gc.collect()
    assert all(r() is None for r in refs)
    assert writer.close() == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    save_file(written, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("profile", ["exact", "paper"])
def test_float32_path_matches_the_float64_path(tmp_path, profile):
    plain = tiny_model("qwen2-gqa3-bias-untied", tmp_path / "plain")
    prof = PROFILES[profile].with_overrides(name=f"{profile}-tiny", h=8)
    obfuscate_checkpoint(plain, tmp_path / "f64", tmp_path / "s.json", prof, dtype="float64", progress=False,
                         calibration_ids=np.arange(64))
    obfuscate_checkpoint(plain, tmp_path / "f32", tmp_path / "s.json", prof, dtype="float32", progress=False,
                         calibration_ids=np.arange(64))
    with safe_open(str(tmp_path / "f64" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "f32" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            ref, got = a.get_tensor(k), b.get_tensor(k).double()
            assert got.shape == ref.shape
            assert (got - ref).abs().max() <= F32_TOL * max(ref.abs().max().item(), 1e-30), k

