"""``aloe assets``: build and inspect the offline real assets."""

from __future__ import annotations

import argparse
from pathlib import Path

from aloe.assets.corpus import CORPORA, load_corpus
from aloe.assets.gemma3 import build_gemma3
from aloe.assets.gguf_model import as_dict
from aloe.assets.smollm2 import build_smollm2

BUILDERS = {"smollm2": build_smollm2, "gemma3": build_gemma3}


def _build(args: argparse.Namespace) -> int:
    from aloe.cli import print_json

    built = BUILDERS[args.name](gguf=args.gguf, cache=args.cache, force=args.force, progress=not args.json)
    if args.json:
        print_json(as_dict(built))
    else:
        state = "reused" if built.reused else "built"
        print(f"{state} {built.path} ({built.n_params:,} parameters, {built.seconds:.1f} s)")
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from aloe.cli import print_json

    docs = load_corpus(args.name)
    stats = {"corpus": args.name, "documents": len(docs), "characters": sum(len(d) for d in docs)}
    if args.json:
        print_json(stats)
    else:
        print(f"{args.name}: {stats['documents']} documents, {stats['characters']:,} characters")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="offline real models and corpora")
    g = p.add_subparsers(dest="assets_command", metavar="ACTION")
    g.required = True

    b = g.add_parser("build", help="build a model asset into the cache (reused when already built)")
    b.add_argument("name", choices=list(BUILDERS), help="which model")
    b.add_argument("--gguf", type=Path, help="read this GGUF file instead of the registry package's")
    b.add_argument("--cache", type=Path, help="cache folder (default $ALOE_CACHE or ~/.cache/aloe)")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching build is cached")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=_build)

    c = g.add_parser("corpus", help="load a text corpus and print its size")
    c.add_argument("name", choices=sorted(CORPORA))
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_corpus)
