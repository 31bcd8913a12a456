"""``aloe obfuscate`` and ``aloe fidelity``."""

from __future__ import annotations

import argparse
from pathlib import Path

from aloe import AloeError
from aloe.argtypes import positive_float, positive_int
from aloe.obfuscation.profiles import DEFAULT_PROFILE, PROFILES, get_profile


def resolve_model(name: str) -> Path:
    """A model folder, or ``smollm2`` for the cached SmolLM2-135M-Instruct (built on first use)."""
    if name == "smollm2":
        from aloe.assets.smollm2 import smollm2_path

        return smollm2_path(progress=True)
    path = Path(name)
    if not path.is_dir():
        raise AloeError(f"model folder {name} does not exist")
    return path


def calibration_ids(model_dir: Path, n_tokens: int = 512):
    """Held-out calibration text (the Lee test split) for the paper design's kappa."""
    from transformers import AutoTokenizer

    from aloe.obfuscation.fidelity import corpus_token_ids

    return corpus_token_ids(AutoTokenizer.from_pretrained(str(model_dir)), "lee-test", n_tokens)


def _obfuscate(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.obfuscation.model import obfuscate_checkpoint

    profile = get_profile(args.profile)
    overrides = {k: v for k, v in (("h", args.h), ("alpha_e", args.alpha_e), ("alpha_h", args.alpha_h),
                                   ("beta", args.beta), ("lam", args.lam), ("keys", args.keys),
                                   ("noise_shape", args.noise_shape), ("embed_shear", args.embed_shear),
                                   ("adapt_steps", args.adapt_steps)) if v is not None}
    if args.adapt_steps is not None and args.adapt_steps < 0:
        raise AloeError("--adapt-steps must be >= 0")
    if overrides:
        profile = profile.with_overrides(name=f"{profile.name}+custom", **overrides)
    if args.client_vocab is None and args.occurrence_noise is not None:
        raise AloeError("--occurrence-noise applies to the client-held vocabulary only (give --client-vocab FILE)")
    if args.client_vocab is not None:
        if args.out.exists():
            raise AloeError(f"output folder {args.out} already exists; choose another path")
        if args.client_vocab.exists():
            raise AloeError(f"client vocabulary file {args.client_vocab} already exists; choose a new path")
    model = resolve_model(args.model)
    calib = calibration_ids(model) if profile.keys == "paper" else None
    full = args.out.with_name(args.out.name + ".full") if args.client_vocab is not None else args.out
    summary = obfuscate_checkpoint(model, full, args.secret, profile, seed_from_os=args.seed_from_os,
                                   dtype=args.dtype, max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
                                   calibration_ids=calib, progress=not args.json)
    if args.client_vocab is not None:
        import shutil

        from aloe.obfuscation.client_vocab import split_vocabulary

        summary = dict(summary, path=str(args.out), client_vocabulary=split_vocabulary(
            full, args.out, args.client_vocab, occurrence_noise=args.occurrence_noise or 0.0))
        shutil.rmtree(full)
    if args.json:
        print_json(summary)
    else:
        state = "reused" if summary.get("reused") else "wrote"
        print(f"{state} {args.out} (profile {profile.name}, hidden size {summary['hidden_size']} -> "
              f"{summary['obfuscated_hidden_size']}); secret: {args.secret} (fingerprint "
              f"{summary['secret_fingerprint'][:16]}...)")
        custom = "not stated for these custom parameters; see the measured risk below"
        print(f"protects against: {profile.protects or custom}")
        print(risk_line(summary.get("measured_risk") or {}))
        if args.client_vocab is not None:
            print(f"client-held vocabulary: {args.out} holds no vocabulary rows; the tables are in "
                  f"{args.client_vocab} (keep it with the secret; serve with aloe serve, talk with --backend embeds)")
            if profile.keys == "exact-norm":
                print("the server still reads the writer key off the body's weights (exact-norm keys), so each vector "
                      "sent is as readable as its occurrence noise allows (on SmolLM2 every prompt token up to "
                      "occurrence noise 3.2, where perplexity is x784), and the answers through the hidden states it "
                      "returns (88-100% of the answer tokens at every noise level measured; docs/attacks.md)")
    return 0


def risk_line(risk: dict) -> str:
    """One line saying how much of the vocabulary each attack recovered on this profile (benchmarks/privacy.py)."""
    if risk.get("status") != "measured":
        if risk.get("measured_on"):
            return (f"privacy risk: not measured for this model (the profiles were measured on "
                    f"{risk['measured_on']}; run benchmarks/privacy.py)")
        return "privacy risk: not measured for these parameters (run benchmarks/privacy.py)"
    parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(risk["recovery"].items()))
    on = f" on {risk['measured_on']}" if risk.get("measured_on") else ""
    return (f"privacy risk (attack recovery over the full vocabulary, measured as '{risk['measured_as']}'{on}): "
            f"{parts}")


def _fidelity(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.obfuscation.fidelity import measure_fidelity

    res = measure_fidelity(resolve_model(args.model), args.obfuscated, args.secret, corpus=args.corpus,
                           text_file=args.text, n_tokens=args.tokens, n_prompts=args.prompts,
                           max_new_tokens=args.max_new_tokens, progress=not args.json)
    if args.json:
        print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:22s} {v}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("obfuscate", help="AloePri: obfuscate a checkpoint into a stock checkpoint + secret")
    p.add_argument("model", help="plain Hugging Face model folder, or 'smollm2'")
    p.add_argument("out", type=Path, help="output folder (must not exist)")
    p.add_argument("--secret", type=Path, required=True, help="secret file (created with mode 0600 if missing)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
    p.add_argument("--seed-from-os", action="store_true",
                   help="draw a fresh master seed from the OS CSPRNG (refuses to replace an existing secret)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-shard-mb", type=positive_float, default=2048.0)
    p.add_argument("--h", type=int, help="override the profile's expansion h")
    p.add_argument("--alpha-e", type=float, help="override the embedding noise")
    p.add_argument("--alpha-h", type=float, help="override the head noise")
    p.add_argument("--beta", type=int, help="override the block-permutation window")
    p.add_argument("--lam", type=float, help="override lambda (paper keys)")
    p.add_argument("--keys", choices=["paper", "exact-norm"], help="override the key design")
    p.add_argument("--noise-shape", choices=["entry", "row"], help="override the noise shape (one sigma per table, "
                   "or each row's own RMS)")
    p.add_argument("--embed-shear", type=float, help="override the non-isometric shear of the embedding key")
    p.add_argument("--adapt-steps", type=int, help="override the number of distillation steps after the noise "
                   "(0: none); an interrupted adaptation resumes when the same command is run again")
    p.add_argument("--client-vocab", type=Path, metavar="FILE",
                   help="client-held vocabulary: write OUT without the embedding and head rows and keep both "
                   "tables in FILE (mode 0600) for the client")
    p.add_argument("--occurrence-noise", type=float, metavar="ALPHA",
                   help="with --client-vocab: fresh noise the client adds to every embedding it sends (relative to "
                   "each row's RMS; 0 keeps the logits exact)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_obfuscate)

    f = sub.add_parser("fidelity", help="AloePri: compare a plain and an obfuscated model")
    f.add_argument("--model", required=True, help="plain model folder, or 'smollm2'")
    f.add_argument("--obfuscated", type=Path, required=True)
    f.add_argument("--secret", type=Path, required=True)
    f.add_argument("--corpus", default="lee")
    f.add_argument("--text", type=Path, help="evaluate on this text file instead of a corpus")
    f.add_argument("--tokens", type=positive_int, default=1024)
    f.add_argument("--prompts", type=positive_int, default=8)
    f.add_argument("--max-new-tokens", type=positive_int, default=64)
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_fidelity)
    register_client(sub)


def _client(args: argparse.Namespace):
    from aloe.obfuscation.client import PrivateClient

    tokenizer = resolve_model(args.tokenizer)
    client = PrivateClient(args.server, args.secret, tokenizer, backend=args.backend, timeout=args.timeout,
                           client_vocab=args.client_vocab)
    client.verify()
    return client


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, min_p=args.min_p, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, seed=args.seed)


def _complete(args: argparse.Namespace) -> int:
    from aloe.cli import print_json

    client = _client(args)
    res = client.complete(args.prompt, max_tokens=args.max_tokens, logprobs=args.logprobs, **_sampling(args))
    out = {"text": res.text, "token_ids": res.token_ids, "finish_reason": res.finish_reason,
           "client_map_ms": 1000 * res.timings.get("client_map_seconds", 0.0)}
    if res.logprobs is not None:   # per answer token: its log-probability, and the likeliest (plain ids)
        out["logprobs"] = [{"logprob": own, "top": [[i, v] for i, v in sorted(top.items(), key=lambda kv: -kv[1])]}
                           for own, top in res.logprobs]
    if args.show_server_view:
        out["server_prompt_text"] = client.server_view(res.server_prompt_ids)
        out["server_output_text"] = client.server_view(res.server_output_ids)
        out["server_prompt_ids"] = res.server_prompt_ids
        out["server_output_ids"] = res.server_output_ids
    if args.json:
        print_json(out)
    else:
        print(res.text)
        if args.show_server_view:
            print(f"\n[server saw]  {out['server_prompt_text']!r}\n[server sent] {out['server_output_text']!r}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    import sys

    client = _client(args)
    history: list[dict] = []
    print("private chat: the server sees only obfuscated token ids. Empty line or Ctrl-D to quit.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = []
        for piece in client.stream(history, max_tokens=args.max_tokens, **_sampling(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--secret", type=Path, required=True)
    p.add_argument("--tokenizer", required=True, help="plain model/tokenizer folder, or 'smollm2'")
    p.add_argument("--backend", choices=["openai", "llama.cpp", "embeds"], default="openai",
                   help="openai: /v1/completions (aloe serve, vLLM); llama.cpp: llama-server's /completion; "
                   "embeds: the client-held vocabulary mode (aloe serve, with --client-vocab)")
    p.add_argument("--client-vocab", type=Path, help="the client vocabulary file (--backend embeds)")
    p.add_argument("--max-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens under this share of the likeliest one's "
                   "probability (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=positive_float, default=300.0)


def register_client(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("complete", help="AloePri client: one private completion")
    _client_args(c)
    c.add_argument("prompt")
    c.add_argument("--show-server-view", action="store_true", help="also show what the server saw and sent")
    c.add_argument("--logprobs", type=int, metavar="K", help="with --json: each answer token's log-probability "
                   "under the model and the K likeliest tokens' (0-20)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_complete)
    ch = sub.add_parser("chat", help="AloePri client: interactive private chat (streaming)")
    _client_args(ch)
    ch.set_defaults(func=_chat)
