"""``aloe obfuscate`` and ``aloe fidelity``."""

from __future__ import annotations

import argparse
from pathlib import Path

from aloe import AloeError
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
                                   ("beta", args.beta), ("lam", args.lam), ("keys", args.keys)) if v is not None}
    if overrides:
        profile = profile.with_overrides(name=f"{profile.name}+custom", **overrides)
    model = resolve_model(args.model)
    calib = calibration_ids(model) if profile.keys == "paper" else None
    summary = obfuscate_checkpoint(model, args.out, args.secret, profile, seed_from_os=args.seed_from_os,
                                   dtype=args.dtype, max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
                                   calibration_ids=calib, progress=not args.json)
    if args.json:
        print_json(summary)
    else:
        state = "reused" if summary.get("reused") else "wrote"
        print(f"{state} {args.out} (profile {profile.name}, hidden size {summary['hidden_size']} -> "
              f"{summary['obfuscated_hidden_size']}); secret: {args.secret} (fingerprint "
              f"{summary['secret_fingerprint'][:16]}...)")
    return 0


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
    p.add_argument("--max-shard-mb", type=float, default=2048.0)
    p.add_argument("--h", type=int, help="override the profile's expansion h")
    p.add_argument("--alpha-e", type=float, help="override the embedding noise")
    p.add_argument("--alpha-h", type=float, help="override the head noise")
    p.add_argument("--beta", type=int, help="override the block-permutation window")
    p.add_argument("--lam", type=float, help="override lambda (paper keys)")
    p.add_argument("--keys", choices=["paper", "exact-norm"], help="override the key design")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_obfuscate)

    f = sub.add_parser("fidelity", help="AloePri: compare a plain and an obfuscated model")
    f.add_argument("--model", required=True, help="plain model folder, or 'smollm2'")
    f.add_argument("--obfuscated", type=Path, required=True)
    f.add_argument("--secret", type=Path, required=True)
    f.add_argument("--corpus", default="lee")
    f.add_argument("--text", type=Path, help="evaluate on this text file instead of a corpus")
    f.add_argument("--tokens", type=int, default=1024)
    f.add_argument("--prompts", type=int, default=8)
    f.add_argument("--max-new-tokens", type=int, default=64)
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_fidelity)
