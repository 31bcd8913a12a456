"""How the conversion scales: synthetic checkpoints (random bfloat16 weights in real Qwen2 shapes) converted with
the ``exact`` profile to float32, in a child process; time, GFLOP/s against the fp32 GEMM rate measured in the same
run, and the child's peak RSS against the largest tensor.

    python benchmarks/conversion_scaling.py [--sizes 0.5b,1.5b,3b] [--keep] [--json]

Checkpoints are written under ~/.cache/aloe/bench/scaling (sharded, 2 GB a shard) and deleted with their outputs
after each size unless --keep. Writes benchmarks/results/conversion_scaling.json/.md/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

from aloe.assets.cache import cache_root
from common import RESULTS, markdown_table, run_measured, write_results
from obfuscation_fidelity import conversion_flops, gemm_gflops

# Qwen2.5 shapes (hidden, layers, heads, kv heads, ffn, vocab, tied)
SHAPES = {
    "0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "3b": (2048, 36, 16, 2, 11008, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
}

CHILD = """
import json, sys
from pathlib import Path
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import PROFILES
src, out = Path(sys.argv[1]), Path(sys.argv[2])
s = obfuscate_checkpoint(src, out, out.with_name(out.name + ".secret"), PROFILES["exact"], progress=False)
print(json.dumps({"seconds": s["seconds"], "d_out": s["obfuscated_hidden_size"]}))
"""


def config(size: str) -> dict:
    d, layers, heads, kv, ffn, vocab, tied = SHAPES[size]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": d, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d // heads,
            "intermediate_size": ffn, "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "rope_theta": 1e6, "max_position_embeddings": 32768}


def tensor_shapes(cfg: dict):
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv, f, v = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"], \
        cfg["vocab_size"]
    yield "model.embed_tokens.weight", (v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield from ((p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                    (p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.weight", (kv, d)),
                    (p + "self_attn.k_proj.bias", (kv,)), (p + "self_attn.v_proj.weight", (kv, d)),
                    (p + "self_attn.v_proj.bias", (kv,)), (p + "self_attn.o_proj.weight", (d, q)),
                    (p + "post_attention_layernorm.weight", (d,)), (p + "mlp.gate_proj.weight", (f, d)),
                    (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f)))
    yield "model.norm.weight", (d,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (v, d)


def write_checkpoint(folder, cfg: dict, shard_bytes: int = 2 << 30) -> int:
    """Random bfloat16 weights, shard by shard (one shard in memory at a time); the parameter count."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    shards, cur, cur_bytes, n_params = [], {}, 0, 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(cur, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(cur)))

    for name, shape in tensor_shapes(cfg):
        t = (torch.randn(shape, generator=g) * (1.0 if len(shape) == 1 else 0.02)).to(torch.bfloat16)
        n_params += t.numel()
        if cur and cur_bytes + 2 * t.numel() > shard_bytes:
            flush()
            cur, cur_bytes = {}, 0
        cur[name] = t
        cur_bytes += 2 * t.numel()
    flush()
    weight_map = {t: name for name, ts in shards for t in ts}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return n_params


def convert(src, out) -> dict:
    stdout, wall, peak_mb = run_measured([sys.executable, "-c", CHILD, str(src), str(out)], f"conversion of {src}",
                                       stderr=None)
    return dict(json.loads(stdout), wall_seconds=wall, peak_rss_mb=peak_mb)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["params_b"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    a.plot(x, [r["seconds"] for r in rows], "o-", label="conversion")
    a.plot(x, [r["wall_seconds"] for r in rows], "s--", label="process wall")
    a.set(xlabel="parameters (B)", ylabel="seconds", title="time")
    a.legend()
    b.plot(x, [r["vs_fp32_gemm"] for r in rows], "o-")
    b.set(xlabel="parameters (B)", ylabel="key-product GFLOP/s / fp32 GEMM", title="speed vs GEMM", ylim=(0, 1))
    c.plot(x, [r["peak_rss_mb"] / 1024 for r in rows], "o-", label="peak RSS")
    c.plot(x, [r["largest_out_tensor_mb"] / 1024 for r in rows], "s--", label="largest tensor (out, fp32)")
    c.set(xlabel="parameters (B)", ylabel="GB", title="memory")
    c.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5b,1.5b,3b")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = cache_root() / "bench" / "scaling"
    rows = []
    for size in args.sizes.split(","):
        cfg = config(size)
        src, out = work / size, work / f"{size}-obf"
        for p in (src, out):
            shutil.rmtree(p, ignore_errors=True)
        (work / f"{size}-obf.secret").unlink(missing_ok=True)
        n_params = write_checkpoint(src, cfg)
        gemm_before = gemm_gflops(torch.float32)
        conv = convert(src, out)
        gemm = (gemm_before + gemm_gflops(torch.float32)) / 2
        flops = conversion_flops(cfg, conv["d_out"])
        largest = max(s[0] * s[1] for _, s in tensor_shapes(cfg) if len(s) == 2) * conv["d_out"] / cfg["hidden_size"]
        row = {"size": size, "params_b": n_params / 1e9, "layers": cfg["num_hidden_layers"],
               "hidden": cfg["hidden_size"], "d_out": conv["d_out"], "gflop": flops / 1e9,
               "seconds": conv["seconds"], "wall_seconds": conv["wall_seconds"],
               "gflops_per_s": flops / 1e9 / conv["seconds"], "gemm_fp32_gflops": gemm,
               "peak_rss_mb": conv["peak_rss_mb"], "largest_out_tensor_mb": 4 * largest / 2 ** 20,
               "out_gb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2 ** 30}
        row["vs_fp32_gemm"] = row["gflops_per_s"] / gemm
        row["seconds_per_b_params"] = row["seconds"] / row["params_b"]
        rows.append(row)
        if not args.keep:
            for p in (src, out):
                shutil.rmtree(p, ignore_errors=True)
        print(json.dumps(row), file=sys.stderr)
    payload = {"profile": "exact", "output_dtype": "float32", "input_dtype": "bfloat16", "threads":
               torch.get_num_threads(), "rows": rows}
    md = "\n".join([
        "# Conversion scaling (synthetic Qwen2 shapes, exact profile, bfloat16 in, float32 out)\n",
        "Random weights in the shapes of Qwen2.5 0.5B/1.5B/3B, converted by `aloe.obfuscation.model."
        "obfuscate_checkpoint` in a child process. `seconds`: the conversion itself (as it reports); `wall`: the "
        "child process, imports included. `vs fp32 GEMM`: the key products' FLOPs per second over the fp32 GEMM "
        "rate (1024^3) measured in the same run, around each conversion. Produced by "
        "`python benchmarks/conversion_scaling.py`.\n",
        markdown_table(rows, [("size", "size"), ("params_b", "params (B)"), ("layers", "layers"),
                              ("d_out", "d'"), ("gflop", "GFLOP"), ("seconds", "seconds"),
                              ("wall_seconds", "wall"), ("seconds_per_b_params", "s / B params"),
                              ("gflops_per_s", "GFLOP/s"), ("gemm_fp32_gflops", "fp32 GEMM"),
                              ("vs_fp32_gemm", "vs fp32 GEMM"), ("peak_rss_mb", "peak RSS MB"),
                              ("largest_out_tensor_mb", "largest tensor MB (fp32 out)"), ("out_gb", "out GB")]),
        "![conversion scaling](conversion_scaling.png)\n",
    ])
    write_results("conversion_scaling", payload, md)
    plot(rows, RESULTS / "conversion_scaling.png")
    print(json.dumps(payload, indent=2) if args.json else md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
