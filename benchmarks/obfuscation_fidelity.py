"""Fidelity of every obfuscation profile on SmolLM2-135M-Instruct (fp32, Lee corpus), conversion speed against this
machine's GEMM throughput, and the conversion's peak memory.

    python benchmarks/obfuscation_fidelity.py [--profiles exact,balanced,paper] [--tokens 1024] [--prompts 8]
        [--max-new-tokens 64] [--fresh] [--json]

Resumable: finished profiles are kept in benchmarks/results/obfuscation_fidelity.json and skipped unless --fresh or
the settings changed. Writes that JSON and obfuscation_fidelity.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

from aloe.assets.cache import cache_root
from aloe.obfuscation.fidelity import measure_fidelity
from aloe.obfuscation.profiles import PROFILES
from common import RESULTS, load_json, markdown_table, median_seconds, run_measured, write_results


def gemm_gflops(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, repeats=7) / 1e9


def conversion_flops(cfg: dict, d_out: int) -> float:
    """Multiply-adds of the key products the conversion performs (2 flops each)."""
    d, n, f, L = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * hd
    kv_out = cfg["num_key_value_heads"] * hd
    per_layer = d_out * d * (q_out + 2 * kv_out + 2 * f) + q_out * d * d_out + f * d * d_out
    return 2.0 * (L * per_layer + 2 * n * d * d_out)


def convert(profile: str, workdir) -> dict:
    out, secret = workdir / profile, workdir / f"{profile}.secret"
    shutil.rmtree(out, ignore_errors=True)
    if secret.exists():
        secret.unlink()
    cmd = [sys.executable, "-m", "aloe.cli", "obfuscate", "smollm2", str(out), "--secret", str(secret),
           "--profile", profile, "--seed-from-os", "--json"]
    stdout, seconds, peak_mb = run_measured(cmd, f"conversion of profile {profile}")
    return {"out": str(out), "secret": str(secret), "convert_seconds": seconds, "convert_peak_rss_mb": peak_mb,
            "summary": json.loads(stdout)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", default="exact,balanced,paper")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    settings = {"tokens": args.tokens, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                "corpus": "lee", "model": "SmolLM2-135M-Instruct fp32"}
    path = RESULTS / "obfuscation_fidelity.json"
    previous = load_json(path)
    rows = {} if args.fresh or previous.get("settings") != settings else previous.get("profiles", {})
    workdir = cache_root() / "bench" / "obfuscation"
    workdir.mkdir(parents=True, exist_ok=True)
    gflops32, gflops64 = gemm_gflops(torch.float32), gemm_gflops(torch.float64)
    from aloe.assets.smollm2 import smollm2_path

    model = smollm2_path(progress=not args.json)
    cfg = json.loads((model / "config.json").read_text())
    for name in args.profiles.split(","):
        if name not in PROFILES:
            raise SystemExit(f"unknown profile {name}")
        if name in rows:
            continue
        conv = convert(name, workdir)
        fid = measure_fidelity(model, conv["out"], conv["secret"], n_tokens=args.tokens, n_prompts=args.prompts,
                               max_new_tokens=args.max_new_tokens, progress=not args.json)
        s = conv["summary"]
        flops = conversion_flops(cfg, s["obfuscated_hidden_size"])
        p = PROFILES[name]
        rows[name] = {
            "profile": name, "keys": p.keys, "h": s["expansion"]["effective"], "lam": p.lam if p.keys == "paper"
            else None, "alpha_e": p.alpha_e, "alpha_h": p.alpha_h, "beta": p.beta, "gamma": p.gamma,
            **{k: fid[k] for k in ("ppl_plain", "ppl_obfuscated", "ppl_ratio", "top1_agreement",
                                   "greedy_agreement", "greedy_exact_prompts", "max_abs_logit_diff", "tokens")},
            "convert_seconds": conv["convert_seconds"], "convert_peak_rss_mb": conv["convert_peak_rss_mb"],
            "convert_gflops": flops / 1e9,
            "convert_gflops_per_s": flops / 1e9 / conv["convert_seconds"],
        }
        payload = {"settings": settings, "profiles": rows}
        write_results("obfuscation_fidelity", payload, "")  # checkpoint after each profile (resumable)
    for r in rows.values():
        r["convert_vs_fp32_gemm"] = r["convert_gflops_per_s"] / gflops32
    payload = {"settings": settings, "gemm_gflops_fp32": gflops32, "gemm_gflops_fp64": gflops64, "profiles": rows}
    md = [
        "# Obfuscation fidelity (SmolLM2-135M-Instruct, fp32)\n",
        f"Lee corpus, {args.tokens} tokens (256-token windows); greedy agreement over {args.prompts} chat prompts x "
        f"{args.max_new_tokens} new tokens. Produced by `python benchmarks/obfuscation_fidelity.py`.\n",
        markdown_table(list(rows.values()), [
            ("profile", "profile"), ("keys", "keys"), ("h", "h"), ("alpha_e", "alpha_e"), ("alpha_h", "alpha_h"),
            ("beta", "beta"), ("ppl_plain", "ppl plain"), ("ppl_obfuscated", "ppl obf."), ("ppl_ratio", "ppl ratio"),
            ("top1_agreement", "top-1 agree"), ("greedy_agreement", "greedy agree"),
            ("max_abs_logit_diff", "max abs logit diff")]),
        "\n## Conversion cost\n",
        f"fp32 GEMM on this machine: {gflops32:.1f} GFLOP/s (fp64: {gflops64:.1f}); float32 outputs are "
        "converted with float32 GEMMs, all cores. `vs fp32 GEMM` = the conversion's key-product FLOPs per second / "
        "the fp32 GEMM rate. Peak RSS: the conversion's own process.\n",
        markdown_table(list(rows.values()), [
            ("profile", "profile"), ("convert_seconds", "seconds"), ("convert_gflops", "GFLOP"),
            ("convert_gflops_per_s", "GFLOP/s"), ("convert_vs_fp32_gemm", "vs fp32 GEMM"),
            ("convert_peak_rss_mb", "peak RSS MB")]),
    ]
    write_results("obfuscation_fidelity", payload, "\n".join(md))
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
