"""The client side of AloePri serving: the privacy proxy under load, and the client-held vocabulary mode's decode
speed against token-id serving.

- **Speed**: one SmolLM2 artifact served twice by ``aloe serve`` (whole, and split with ``--client-vocab``, both up
  at once); greedy streamed requests alternate between token-id serving (``--backend openai``) and the embeds mode
  (``--backend embeds``: one round trip per token, the head applied by the client). Decode tokens/s after the first
  token, medians, and their ratio.
- **Load**: ``aloe proxy`` (a separate process) in front of ``aloe serve``; N concurrent clients stream chat
  completions through it for S seconds, each read event by event to ``[DONE]`` (``--load-mix alternate`` makes every
  other request non-streamed). Failed requests, and the RSS of the proxy and the server sampled every second:
  at the start, at each quarter of the run and at the end, and its growth over the second half.

    python benchmarks/proxy.py [--profile balanced] [--requests 5] [--new-tokens 48] [--load-seconds 60]
        [--load-clients 8] [--load-mix streamed|alternate] [--threads 1] [--json]

Writes benchmarks/results/proxy.json and proxy.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import httpx

from aloe.assets.cache import cache_root
from aloe.assets.smollm2 import smollm2_path
from aloe.obfuscation.client import PrivateClient
from aloe.obfuscation.client_vocab import split_vocabulary
from aloe.obfuscation.model import obfuscate_checkpoint
from aloe.obfuscation.profiles import get_profile
from aloe.serving.local import aloe_serve_command, free_port, server_process
from common import markdown_table, publish
from serving import rss_kb

PROMPT = "Tell me a long story about a lighthouse."


def timed_stream(client: PrivateClient, n: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s after the first, tokens) of one greedy streamed request."""
    t0, stamps = time.perf_counter(), []
    for _ in client.open_stream(PROMPT, max_tokens=n, temperature=0.0):
        stamps.append(time.perf_counter())
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return stamps[0] - t0, rate, len(stamps)


def speed(whole_url: str, split_url: str, secret, tokenizer, client_vocab, n: int, requests: int) -> dict:
    modes = {"token ids": PrivateClient(whole_url, secret, tokenizer, timeout=600),
             "client-held vocabulary": PrivateClient(split_url, secret, tokenizer, backend="embeds",
                                                     client_vocab=client_vocab, timeout=600)}
    for c in modes.values():
        c.verify()
        timed_stream(c, 4)  # warm-up
    runs: dict[str, list] = {m: [] for m in modes}
    for _ in range(requests):
        for m, c in modes.items():
            runs[m].append(timed_stream(c, n))
    rows = []
    for m, rs in runs.items():
        rows.append({"mode": m, "tokens_per_s": statistics.median(r[1] for r in rs),
                     "ttft_ms": 1000 * statistics.median(r[0] for r in rs),
                     "tokens": statistics.median(r[2] for r in rs)})
    rows[1]["speed_ratio"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    rows[0]["speed_ratio"] = 1.0
    return {"rows": rows, "requests": requests, "new_tokens": n}


def _stream_chat(http: httpx.Client, url: str, body: dict) -> tuple[object, bool]:
    """One streamed chat completion read event by event: (status code, whether it ended cleanly with content)."""
    pieces, done, error = 0, False, False
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, False
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            error = error or "error" in chunk
            pieces += bool(chunk.get("choices") and chunk["choices"][0]["delta"].get("content"))
    return r.status_code, done and not error and pieces > 0


def _rss_at(samples: list[tuple[float, int, int]], t: float, which: int) -> float:
    """RSS in MB of the sample nearest to ``t`` seconds into the run (which: 1 proxy, 2 server)."""
    return min(samples, key=lambda s: abs(s[0] - t))[which] / 1024


def _rss_profile(samples: list[tuple[float, int, int]], seconds: float, which: int) -> dict:
    marks = {"start": 0.0, "q1": seconds / 4, "half": seconds / 2, "q3": 3 * seconds / 4}
    prof = {k: _rss_at(samples, t, which) for k, t in marks.items()}
    prof["end"] = samples[-1][which] / 1024
    prof["max"] = max(s[which] for s in samples) / 1024
    prof["second_half_growth"] = prof["end"] - prof["half"]
    return prof


def load(server_url: str, server_pid: int, secret, seconds: float, clients: int, timeout: float,
         mix: str = "streamed") -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "aloe.cli", "proxy", "--server", server_url, "--secret", str(secret),
           "--tokenizer", "smollm2", "--port", str(port), "--timeout", str(timeout)]
    ok, failed, lock = [0, 0], [], threading.Lock()  # ok: streamed, not streamed
    samples: list[tuple[float, int, int]] = []  # (seconds into the run, proxy RSS kB, server RSS kB)
    with server_process(cmd, port, timeout=300, path="/v1/models") as (url, proc):
        stop = threading.Event()
        t0 = time.monotonic()
        deadline = t0 + seconds

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, rss_kb(proc.pid), rss_kb(server_pid)))
                stop.wait(1.0)

        def worker(k: int) -> None:
            j = 0
            with httpx.Client(timeout=timeout + 30) as http:
                while time.monotonic() < deadline:
                    j += 1
                    stream = mix == "streamed" or bool(j % 2)
                    body = {"model": "aloe", "messages": [{"role": "user", "content": f"Count to {k + j % 7}."}],
                            "max_tokens": 12, "temperature": 0.7, "seed": j, "stream": stream}
                    try:
                        if stream:
                            code, good = _stream_chat(http, url, body)
                        else:
                            r = http.post(url + "/v1/chat/completions", json=body)
                            code, good = r.status_code, r.status_code == 200 and "choices" in r.json()
                    except (httpx.HTTPError, ValueError) as exc:
                        code, good = repr(exc), False
                    with lock:
                        if good:
                            ok[not stream] += 1
                        else:
                            failed.append(code)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        stop.set()
        sampler.join()
        samples.append((time.monotonic() - t0, rss_kb(proc.pid), rss_kb(server_pid)))
    samples = [s for s in samples if s[1] and s[2]]
    return {"clients": clients, "seconds": seconds, "mix": mix, "requests_ok": ok[0] + ok[1],
            "streamed_ok": ok[0], "non_streamed_ok": ok[1], "requests_failed": len(failed),
            "failures": [str(f) for f in failed[:5]], "rss_samples": len(samples),
            "proxy_rss_mb": _rss_profile(samples, seconds, 1), "server_rss_mb": _rss_profile(samples, seconds, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="balanced")
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--load-seconds", type=float, default=60.0)
    ap.add_argument("--load-clients", type=int, default=8)
    ap.add_argument("--load-mix", choices=["streamed", "alternate"], default="streamed",
                    help="every load request streamed, or every other one not")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    plain = smollm2_path(progress=not args.json)
    profile = get_profile(args.profile)
    work = cache_root() / "bench" / "proxy"
    whole, secret = work / profile.name, work / f"{profile.name}.secret"
    split, client_vocab = work / f"{profile.name}-split", work / f"{profile.name}-split.client.safetensors"
    obfuscate_checkpoint(plain, whole, secret, profile, progress=not args.json)
    if not split.is_dir():
        client_vocab.unlink(missing_ok=True)
        split_vocabulary(whole, split, client_vocab)
    p1, p2 = free_port(), free_port()
    threads = ("--threads", str(args.threads), "--max-waiting", "32")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(plain))
    with server_process(aloe_serve_command(whole, p1, *threads), p1, timeout=600) as (u1, proc1), \
            server_process(aloe_serve_command(split, p2, *threads), p2, timeout=600) as (u2, _):
        sp = speed(u1, u2, secret, tok, client_vocab, args.new_tokens, args.requests)
        lt = load(u1, proc1.pid, secret, args.load_seconds, args.load_clients, 300.0, args.load_mix) \
            if args.load_seconds > 0 else None
    payload = {"profile": profile.name, "speed": sp, "load_test": lt,
               "settings": {"threads": args.threads, "prompt": PROMPT}}
    md = ["# Client side: the proxy under load, and the client-held vocabulary mode\n",
          f"SmolLM2-135M-Instruct, profile `{profile.name}`, each `aloe serve` on {args.threads} torch thread(s), "
          "both servers up at once. Produced by `python benchmarks/proxy.py`.\n",
          f"## Decode speed: greedy, up to {sp['new_tokens']} new tokens, median of {sp['requests']} requests "
          "alternating between the two modes\n",
          markdown_table(sp["rows"], [("mode", "mode"), ("tokens_per_s", "decode tok/s"), ("ttft_ms", "TTFT ms"),
                                      ("speed_ratio", "speed vs token ids")]),
          "\nThe client-held vocabulary mode makes one HTTP round trip per generated token (the server sends the "
          "final hidden state, the client applies the head and samples), where token-id serving streams ids from "
          "one request.\n"]
    if lt:
        kind = "streamed" if lt["mix"] == "streamed" else "alternately streamed and non-streamed"
        rows = [{"process": name, **lt[key]} for name, key in (("aloe proxy", "proxy_rss_mb"),
                                                                ("aloe serve", "server_rss_mb"))]
        md += [f"## Load: {lt['clients']} concurrent {kind} chat completions through `aloe proxy` for "
               f"{lt['seconds']:.0f} s\n",
               f"{lt['requests_ok']} requests succeeded ({lt['streamed_ok']} streamed), {lt['requests_failed']} "
               f"failed. RSS in MB ({lt['rss_samples']} samples, one a second), at the start, at each quarter of the "
               "run and at the end:\n",
               markdown_table(rows, [("process", "process"), ("start", "start"), ("q1", "25%"), ("half", "50%"),
                                     ("q3", "75%"), ("end", "end"), ("max", "max"),
                                     ("second_half_growth", "growth over the 2nd half")])]
    return publish("proxy", payload, "\n".join(md), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
