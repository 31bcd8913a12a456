"""``aloe mpc``: run the MPC engine's parties locally."""

from __future__ import annotations

import argparse

from aloe import AloeError


def _bench(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.mpc.bench import run_bench

    if args.reps < 1:
        raise AloeError("--reps must be at least 1")
    if args.timeout <= 0:
        raise AloeError("--timeout must be positive")
    result = run_bench(
        args.op,
        args.shape,
        reps=args.reps,
        processes=not args.threads,
        together=not args.preprocessed,
        frac_bits=args.frac_bits,
        timeout=args.timeout,
    )
    if args.json:
        print_json(result)
    else:
        print(
            f"{result['op']} {result['shape']}: {result['ms']:.2f} ms (median of {result['reps']}), "
            f"{result['rounds']} rounds, {result['online_bits_per_element']:.1f} online bits/element, "
            f"{result['offline_bits_per_element']:.1f} offline bits/element, "
            f"max abs error {result['max_abs_error']:.3g}"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from aloe.mpc.bench import OPS

    p = sub.add_parser("mpc", help="secure computation: two parties and a dealer (Morse-STF, G-module)")
    g = p.add_subparsers(dest="mpc_command", metavar="ACTION")
    g.required = True
    b = g.add_parser("bench", help="launch the three parties on loopback and measure one operation")
    b.add_argument("--op", required=True, choices=OPS)
    b.add_argument("--shape", help="e.g. 100x100, or 32x1x28x28,16x1x5x5 for conv2d (default: the standard shapes)")
    b.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up (default 5)")
    b.add_argument("--threads", action="store_true", help="run the parties as threads instead of processes")
    b.add_argument("--preprocessed", action="store_true",
                   help="the dealer finishes its part before L and R start (time the online phase only)")
    b.add_argument("--frac-bits", type=int, default=14, help="fixed-point fractional bits (default 14)")
    b.add_argument("--timeout", type=float, default=60.0, help="seconds a party waits for a message (default 60)")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=_bench)
