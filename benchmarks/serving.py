"""Serving cost of obfuscation: decode tokens/s and time-to-first-token, plain vs obfuscated on the same engine,
side by side in one run (requests alternate between the two servers), for the embedded transformers server and
llama.cpp's llama-server; the client's own cost; and a bounded loopback load test.

    python benchmarks/serving.py [--profile balanced] [--h 18,126] [--engines transformers,llama.cpp]
        [--requests 5] [--new-tokens 48] [--load-seconds 60] [--json]

Writes benchmarks/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from aloe.assets.cache import cache_root
from aloe.assets.smollm2 import smollm2_path
from aloe.obfuscation.client import TokenMap
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import get_profile
from aloe.obfuscation.secret import load_secret
from aloe.serving.local import aloe_serve_command, free_port, server_process
from common import markdown_table, median_seconds, write_results


def flops_per_token(cfg: dict, d: int) -> float:
    """Matmul FLOPs of one decoded token at hidden size d (attention over the context left out)."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, f = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f
    return 2.0 * (cfg["num_hidden_layers"] * per_layer + d * cfg["vocab_size"])


def stream_once(url: str, backend: str, prompt: list[int], n: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s after the first, tokens) for one greedy streamed request."""
    if backend == "openai":
        path, body = "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "stream": True}
    else:
        path, body = "/completion", {"prompt": prompt, "n_predict": n, "temperature": 0.0, "stream": True,
                                     "return_tokens": True, "cache_prompt": False, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = []
    with httpx.stream("POST", url + path, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            ids = chunk["choices"][0].get("token_ids") if backend == "openai" else chunk.get("tokens")
            stamps.extend([time.perf_counter()] * len(ids or []))
    ttft = stamps[0] - t0
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else float("nan")
    return ttft, rate, len(stamps)


def compare(engine: str, plain_dir: Path, obf_dir: Path, prompt_plain: list[int], prompt_obf: list[int], n: int,
            requests: int, threads: int) -> dict:
    from aloe.serving.commands import cached_gguf, llama_server_command

    ports = [free_port(), free_port()]
    dirs = [plain_dir, obf_dir]
    if engine == "transformers":
        cmds = [aloe_serve_command(d, p, "--threads", str(threads), "--max-new-tokens", str(n + 8))
                for d, p in zip(dirs, ports)]
        backend = "openai"
    else:
        cmds = [llama_server_command(cached_gguf(d, "f32"), "127.0.0.1", p, threads, 2048) for d, p in zip(dirs, ports)]
        backend = "llama.cpp"
    res = {"plain": {"ttft": [], "rate": []}, "obfuscated": {"ttft": [], "rate": []}}
    with server_process(cmds[0], ports[0], timeout=600) as (url_p, _), \
            server_process(cmds[1], ports[1], timeout=600) as (url_o, _):
        for url, prompt in ((url_p, prompt_plain), (url_o, prompt_obf)):
            stream_once(url, backend, prompt, 8)  # warm-up
        for _ in range(requests):
            for key, url, prompt in (("plain", url_p, prompt_plain), ("obfuscated", url_o, prompt_obf)):
                ttft, rate, _ = stream_once(url, backend, prompt, n)
                res[key]["ttft"].append(ttft)
                res[key]["rate"].append(rate)
    out = {"engine": engine}
    for key in ("plain", "obfuscated"):
        out[f"{key}_ttft_ms"] = 1000 * statistics.median(res[key]["ttft"])
        out[f"{key}_tokens_per_s"] = statistics.median(res[key]["rate"])
    out["speed_ratio"] = out["obfuscated_tokens_per_s"] / out["plain_tokens_per_s"]
    out["ttft_ratio"] = out["obfuscated_ttft_ms"] / out["plain_ttft_ms"]
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def load_test(obf_dir: Path, seconds: float, clients: int, threads: int) -> dict:
    port = free_port()
    ok, failed, lock = [0], [], threading.Lock()
    with server_process(aloe_serve_command(obf_dir, port, "--threads", str(threads), "--max-waiting", "32"), port,
                        timeout=600) as (url, proc):
        httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4}, timeout=120)
        rss_start = rss_kb(proc.pid)
        deadline = time.monotonic() + seconds

        def worker(k: int) -> None:
            j = 0
            with httpx.Client(timeout=300) as http:
                while time.monotonic() < deadline:
                    j += 1
                    try:
                        r = http.post(url + "/v1/completions", json={
                            "prompt": [1, 100 + k, 200 + j % 50, 300], "max_tokens": 8, "temperature": 0.8,
                            "seed": j, "stream": bool(j % 2)})
                        r.read()
                        code = r.status_code
                    except httpx.HTTPError as exc:
                        code = repr(exc)
                    with lock:
                        if code == 200:
                            ok[0] += 1
                        else:
                            failed.append(code)

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rss_end = rss_kb(proc.pid)
    return {"clients": clients, "seconds": seconds, "requests_ok": ok[0], "requests_failed": len(failed),
            "failures": failed[:5], "server_rss_start_mb": rss_start / 1024, "server_rss_end_mb": rss_end / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="balanced")
    ap.add_argument("--h", default="", help="comma-separated expansions to measure (default: the profile's)")
    ap.add_argument("--engines", default="transformers,llama.cpp")
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load-seconds", type=float, default=60.0)
    ap.add_argument("--load-clients", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    plain_dir = smollm2_path(progress=not args.json)
    base = get_profile(args.profile)
    cfg = json.loads((plain_dir / "config.json").read_text())

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(plain_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    work = cache_root() / "bench" / "serving"
    rows, obf_dir, map_ms = [], None, None
    for h in [int(x) for x in args.h.split(",") if x] or [base.h]:
        profile = base.with_overrides(name=f"{base.name}-h{h}", h=h)
        obf_dir, secret_path = work / profile.name, work / f"{profile.name}.secret"
        summary = obfuscate_checkpoint(plain_dir, obf_dir, secret_path, profile, progress=not args.json)
        tmap = TokenMap(load_secret(secret_path))
        if map_ms is None:
            ids = np.random.default_rng(0).integers(17, cfg["vocab_size"], 1000).tolist()
            map_ms = 1000 * median_seconds(lambda m=tmap, x=ids: m.from_server(m.to_server(x)), repeats=21)
        d, d_out = summary["hidden_size"], summary["obfuscated_hidden_size"]
        flop_ratio = flops_per_token(cfg, d_out) / flops_per_token(cfg, d)
        for engine in args.engines.split(","):
            row = compare(engine, plain_dir, obf_dir, list(prompt), tmap.to_server(prompt), args.new_tokens,
                          args.requests, args.threads)
            row.update(h=summary["expansion"]["effective"], hidden=f"{d} -> {d_out}", flop_ratio=flop_ratio,
                       flop_speed_limit=1 / flop_ratio)
            rows.append(row)
    payload = {
        "profile": base.name, "client_map_ms_per_1000_tokens": map_ms, "engines": rows,
        "settings": {"requests": args.requests, "new_tokens": args.new_tokens, "threads": args.threads,
                     "prompt_tokens": len(prompt)},
    }
    if args.load_seconds > 0:
        payload["load_test"] = load_test(obf_dir, args.load_seconds, args.load_clients, args.threads)
    md = [
        "# Serving: plain vs obfuscated SmolLM2-135M-Instruct on the same engine\n",
        f"Greedy, {args.new_tokens} new tokens, prompt of {len(prompt)} tokens, {args.threads} threads, median of "
        f"{args.requests} requests alternating between the plain and the obfuscated server (both up at once). "
        "`flop limit` = 1 / (matmul FLOPs per decoded token, obfuscated / plain): the best speed ratio where decoding "
        "is compute- or weight-bandwidth-bound. Produced by `python benchmarks/serving.py`.\n",
        markdown_table(rows, [("engine", "engine"), ("h", "h"), ("hidden", "hidden size"),
                              ("plain_tokens_per_s", "plain tok/s"), ("obfuscated_tokens_per_s", "obf. tok/s"),
                              ("speed_ratio", "obf/plain"), ("flop_speed_limit", "flop limit"),
                              ("plain_ttft_ms", "plain TTFT ms"), ("obfuscated_ttft_ms", "obf. TTFT ms"),
                              ("ttft_ratio", "TTFT ratio")]),
        f"\nClient cost (map 1,000 ids to the server and back): {map_ms:.3f} ms.\n",
    ]
    if "load_test" in payload:
        lt = payload["load_test"]
        md.append(f"\nLoad test: {lt['clients']} concurrent clients for {lt['seconds']:.0f} s on the embedded "
                  f"server: {lt['requests_ok']} requests succeeded, {lt['requests_failed']} failed; server RSS "
                  f"{lt['server_rss_start_mb']:.0f} MB -> {lt['server_rss_end_mb']:.0f} MB.\n")
    write_results("serving", payload, "\n".join(md))
    print(json.dumps(payload, indent=2) if args.json else "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
