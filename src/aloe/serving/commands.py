"""``aloe serve`` (the untrusted server, two stock engines) and ``aloe export gguf``."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
from pathlib import Path

from aloe import AloeError
from aloe.argtypes import port_number, positive_int
from aloe.assets.cache import cache_root


def cached_gguf(model_dir: Path, outtype: str = "f32") -> Path:
    """GGUF export of a model folder, cached by the folder's manifest/config and weights' identity."""
    from aloe.serving.llamacpp import GGUF_LAYOUT, export_gguf

    model_dir = Path(model_dir)
    h = hashlib.sha256(f"layout {GGUF_LAYOUT}".encode())
    for name in sorted(os.listdir(model_dir)):
        p = model_dir / name
        if p.is_file():
            st = p.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = cache_root() / "gguf" / f"{model_dir.name}-{h.hexdigest()[:16]}-{outtype}.gguf"
    if target.is_file():
        os.utime(target)  # recently used: evicted last
        return target
    budget = gguf_cache_budget()
    export_gguf(model_dir, target, outtype=outtype)
    evict_gguf_cache(target.parent, keep=target, budget_bytes=budget)
    return target


def gguf_cache_budget() -> int:
    """``ALOE_GGUF_CACHE_GB`` (default 8) in bytes."""
    try:
        return int(float(os.environ.get("ALOE_GGUF_CACHE_GB", "8")) * 2**30)
    except ValueError:
        raise AloeError("ALOE_GGUF_CACHE_GB must be a number of gigabytes") from None


def evict_gguf_cache(folder: Path, keep: Path, budget_bytes: int | None = None) -> list[Path]:
    """Every export is cached by its folder's identity, so each new obfuscation adds one (938 MB for SmolLM2 in f32).
    Remove the least recently used exports until the cache fits ``budget_bytes`` (``ALOE_GGUF_CACHE_GB``, default
    8); the export just made is always kept. A llama-server still serving a removed file keeps its open copy."""
    if budget_bytes is None:
        budget_bytes = gguf_cache_budget()
    files = []
    for p in folder.glob("*.gguf"):
        if p.name.startswith(".") or p == keep:
            continue  # another process's export in progress, or the one just made
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files) + keep.stat().st_size
    removed = []
    for _, size, p in sorted(files):
        if total <= budget_bytes:
            break
        p.unlink(missing_ok=True)
        total -= size
        removed.append(p)
    return removed


def llama_server_command(gguf: Path, host: str, port: int, threads: int | None, context: int) -> list[str]:
    from aloe.serving.llamacpp import llama_server_binary

    cmd = [str(llama_server_binary()), "-m", str(gguf), "--host", host, "--port", str(port), "-c", str(context),
           "--no-webui", "-np", "1"]
    if threads:
        cmd += ["-t", str(threads)]
    return cmd


def _serve(args: argparse.Namespace) -> int:
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise AloeError("refusing to listen beyond loopback without --allow-remote")
    if args.engine == "transformers":
        from aloe.serving.server import Limits, serve

        limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                        max_waiting=args.max_waiting)
        serve(args.model, args.host, args.port, limits, args.threads, log_level=args.log_level)
        return 0
    gguf = cached_gguf(args.model, args.outtype)
    cmd = llama_server_command(gguf, args.host, args.port, args.threads, args.context)
    return subprocess.call(cmd)


def _export(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.serving.llamacpp import export_gguf

    out = export_gguf(args.model, args.out, outtype=args.outtype)
    info = {"path": str(out), "bytes": out.stat().st_size, "outtype": args.outtype}
    if args.json:
        print_json(info)
    else:
        print(json.dumps(info))
    return 0


def _proxy(args: argparse.Namespace) -> int:
    from aloe.obfuscation.commands import resolve_model
    from aloe.serving.proxy import run_proxy

    if args.timeout <= 0:
        raise AloeError("--timeout must be positive")
    run_proxy(args.server, args.secret, resolve_model(args.tokenizer), args.backend, args.host, args.port,
              args.timeout, args.log_level, client_vocab=args.client_vocab)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="AloePri: serve a (obfuscated) checkpoint on a stock engine")
    s.add_argument("model", type=Path, help="model folder (as written by aloe obfuscate)")
    s.add_argument("--engine", choices=["transformers", "llama.cpp"], default="transformers")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    s.add_argument("--threads", type=positive_int)
    s.add_argument("--max-prompt-tokens", type=positive_int, default=4096)
    s.add_argument("--max-new-tokens", type=positive_int, default=1024)
    s.add_argument("--max-waiting", type=positive_int, default=16)
    s.add_argument("--context", type=positive_int, default=4096, help="llama.cpp context size")
    s.add_argument("--outtype", choices=["f32", "f16"], default="f32", help="llama.cpp GGUF type")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=_serve)

    p = sub.add_parser("proxy", help="AloePri: a local plain-text OpenAI-compatible proxy (and chat page) in front "
                                     "of an untrusted server")
    p.add_argument("--server", required=True, help="the untrusted server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--secret", type=Path, required=True)
    p.add_argument("--tokenizer", required=True, help="plain model/tokenizer folder, or 'smollm2'")
    p.add_argument("--backend", choices=["openai", "llama.cpp", "embeds"], default="openai",
                   help="openai: /v1/completions (aloe serve, vLLM); llama.cpp: llama-server's /completion; "
                   "embeds: the client-held vocabulary mode (aloe serve, with --client-vocab)")
    p.add_argument("--client-vocab", type=Path, help="the client vocabulary file (--backend embeds)")
    p.add_argument("--host", default="127.0.0.1", help="loopback only")
    p.add_argument("--port", type=port_number, default=8100)
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait on the server (to connect, and for each next piece of its answer)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=_proxy)

    e = sub.add_parser("export", help="export a model folder to another format")
    g = e.add_subparsers(dest="export_format", metavar="FORMAT")
    g.required = True
    gg = g.add_parser("gguf", help="GGUF for llama.cpp, with llama.cpp's own converter")
    gg.add_argument("model", type=Path)
    gg.add_argument("out", type=Path)
    gg.add_argument("--outtype", choices=["f32", "f16"], default="f32")
    gg.add_argument("--json", action="store_true")
    gg.set_defaults(func=_export)
