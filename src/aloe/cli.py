"""The ``aloe`` command: one subcommand group per system. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from aloe import AloeError, __version__

# Each module here defines ``register(subparsers)`` adding its subcommand group(s); a handler is stored as the
# parser default ``func`` and receives the parsed arguments.
COMMAND_MODULES = [
    "aloe.assets.commands",
    "aloe.obfuscation.commands",
    "aloe.serving.commands",
    "aloe.mpc.commands",
    "aloe.labelmap.commands",
    "aloe.recsys.commands",
    "aloe.attacks.commands",
    "aloe.demo",
]


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aloe", description="Privacy-preserving machine learning toolkit.")
    parser.add_argument("--version", action="version", version=f"aloe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AloeError as exc:
        print(f"aloe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aloe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
