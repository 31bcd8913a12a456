"""``aloe mpc train``: secure training with three local processes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aloe import AloeError
from aloe.argtypes import positive_float


def _train(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.mpc.nn.train import TrainConfig, train

    if args.timeout <= 0:
        raise AloeError("--timeout must be positive")
    cfg = TrainConfig(
        model=args.model, epochs=args.epochs, limit=args.limit, dataset=args.data, batch=args.batch, lr=args.lr,
        momentum=args.momentum, pool=args.pool, seed=args.seed, frac_bits=args.frac_bits,
        softmax_steps=args.softmax_steps, sign_bits=args.sign_bits, drelu=args.drelu, wan=args.wan,
        checkpoint_dir=None if args.checkpoint_dir is None else str(args.checkpoint_dir), resume=args.resume,
        timeout=args.timeout, test_limit=args.test_limit, preprocess=args.preprocess,
        certs=None if args.certs is None else str(args.certs), insecure_loopback=args.insecure_loopback,
    )
    report = train(cfg, progress=not args.json and sys.stderr.isatty() or args.progress, out=args.out,
                   plain=not args.no_plain)
    if args.json:
        print_json(report)
    else:
        plain = report.get("plain_accuracy")
        print(f"{report['model']}: accuracy {report['accuracy']:.4f}"
              + ("" if plain is None else f" (plain PyTorch {plain:.4f})")
              + f", {report['seconds']:.1f} s, online {report['online_bytes'] / 1e6:.1f} MB, "
              f"offline {report['offline_bytes'] / 1e6:.1f} MB, {report['rounds']} rounds"
              + ("" if report["online_seconds"] is None else f", online phase {report['online_seconds']:.1f} s"))
    return 0


def register_train(g: argparse._SubParsersAction) -> None:
    from aloe.mpc.gmodule import DRELU_METHODS
    from aloe.mpc.nn.models import MODELS, POOLS
    from aloe.mpc.nn.train import DEFAULT_DRELU, DEFAULT_SIGN_BITS
    from aloe.mpc.nn.wan import PROFILES

    t = g.add_parser("train", help="train a model securely (L and R own the data, a dealer helps; 3 processes)")
    t.add_argument("--model", required=True, choices=MODELS, help="lr (features split L/R) or Networks a-d")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--limit", type=int, help="use the first N training examples")
    t.add_argument("--data", choices=["mnist", "blobs"], default="mnist",
                   help="mnist (default) or blobs (5000 x 20 Gaussian clusters, lr only)")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=positive_float, help="learning rate (default 0.1 for lr, 0.01 for networks)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--pool", choices=POOLS, default="max", help="pooling of Networks B and C (default max)")
    t.add_argument("--seed", type=int, default=0, help="public seed of the initialisation and the batch order")
    t.add_argument("--frac-bits", type=int, default=14)
    t.add_argument("--sign-bits", type=int, default=DEFAULT_SIGN_BITS,
                   help="ReLU and max-pool read the sign from this bit: exact for inputs below 2^(bits - frac bits) "
                        f"in absolute value (default {DEFAULT_SIGN_BITS}: 131,072 at 14 fractional bits; 63: "
                        "any value); the report gives the plain run's largest input beside the range")
    t.add_argument("--drelu", choices=DRELU_METHODS, default=DEFAULT_DRELU,
                   help="how ReLU and max-pool compute the sign: gmodule (the G-module compare, 4 rounds) or "
                        "prefix (parallel-prefix carry over AND gates, 6 rounds at bit 31, less traffic and work); "
                        f"the same bit either way (default {DEFAULT_DRELU})")
    t.add_argument("--softmax-steps", type=int, default=32, help="Euler steps of the ODE softmax (power of two)")
    t.add_argument("--wan", choices=list(PROFILES), help="emulate a network profile on the parties' links")
    t.add_argument("--checkpoint-dir", type=Path,
                   help="where each party keeps its per-epoch checkpoints, in L/, R/ and D/ (default: the aloe cache)")
    t.add_argument("--resume", action="store_true", help="continue from the last epoch all three parties checkpointed")
    t.add_argument("--out", type=Path, help="write the revealed model (the owner's copy) here")
    t.add_argument("--preprocess", action="store_true",
                   help="the dealer delivers each step's correlated randomness before L and R start the step; "
                        "reports online_seconds, the steps' time without the dealer's part")
    t.add_argument("--test-limit", type=int, help="evaluate on the first N test examples (default all)")
    t.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch baseline")
    t.add_argument("--timeout", type=float, default=60.0, help="seconds a party waits for a message (default 60)")
    from aloe.mpc.commands import add_channel_options

    add_channel_options(t)
    t.add_argument("--progress", action="store_true", help="show the progress bar even with --json")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=_train)
