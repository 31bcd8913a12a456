"""``aloe mpc``: run the MPC engine's parties locally."""

from __future__ import annotations

import argparse
from pathlib import Path

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
        certs=None if args.certs is None else str(args.certs),
        insecure_loopback=args.insecure_loopback,
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


def _certs(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.mpc.tls import write_bundle

    owners = [o for o in (args.owners or "").split(",") if o]
    roles = write_bundle(args.dir, owners)
    if args.json:
        print_json({"dir": str(args.dir), "roles": roles, "ca": str(args.dir / "ca.pem")})
    else:
        print(f"wrote {args.dir}: ca.pem and a key (mode 0600) + certificate for each of {', '.join(roles)}; "
              "give each host ca.pem and its own role's two files")
    return 0


def add_channel_options(p: argparse.ArgumentParser) -> None:
    """How the local launcher protects the three parties' channels (TLS unless asked otherwise)."""
    p.add_argument("--certs", type=Path, metavar="DIR",
                   help="certificate bundle from `aloe mpc certs` (default: a fresh one in a private temp dir)")
    p.add_argument("--insecure-loopback", action="store_true",
                   help="plain TCP channels (HMAC-authenticated, not encrypted); loopback addresses only")


def _config(args: argparse.Namespace) -> int:
    import secrets

    from aloe.assets.cache import atomic_write_json
    from aloe.cli import print_json

    for name, value in (("--l", args.l), ("--r", args.r)):
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise AloeError(f"{name} must be HOST:PORT, got {value!r}")
    if args.out.exists() and not args.force:
        raise AloeError(f"{args.out} exists (use --force to replace it)")
    config = {"L": args.l, "R": args.r, "authkey": secrets.token_hex(32)}
    atomic_write_json(args.out, config, mode=0o600)
    if args.json:
        print_json({"config": str(args.out), "L": args.l, "R": args.r})
    else:
        print(f"wrote {args.out} (mode 0600; give the same file to the three parties)")
    return 0


def _party(args: argparse.Namespace) -> int:
    import json

    from aloe.cli import print_json
    from aloe.mpc.bench import bench_program, parse_shape, summarize_party
    from aloe.mpc.party import run_configured

    shapes = parse_shape(args.op, args.shape)
    try:
        config = json.loads(args.config.read_text())
    except (OSError, ValueError) as exc:
        raise AloeError(f"cannot read MPC config {args.config}: {exc}") from None
    if not isinstance(config, dict):
        raise AloeError(f"bad MPC config {args.config}: not a JSON object")
    result, _ = run_configured(args.role, config, bench_program, args.op, shapes, args.reps, 0, True,
                               frac_bits=args.frac_bits, timeout=args.timeout)
    summary = summarize_party(args.role, args.op, shapes, result)
    if args.json:
        print_json(summary)
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
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
    add_channel_options(b)
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=_bench)

    k = g.add_parser("certs", help="write a deployment's TLS bundle: a CA and a key + certificate per role")
    k.add_argument("dir", type=Path, help="new directory (refused if it exists and is not empty)")
    k.add_argument("--owners", metavar="NAME,...", help="data owners that get certificates (owner-NAME)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_certs)

    c = g.add_parser("config", help="write a deployment file (addresses of L and R, a fresh shared key)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--l", required=True, metavar="HOST:PORT", help="where L listens")
    c.add_argument("--r", required=True, metavar="HOST:PORT", help="where R listens")
    c.add_argument("--force", action="store_true")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_config)

    q = g.add_parser("party", help="run one party of a deployment (one process per host) on a bench op")
    q.add_argument("--role", required=True, choices=["L", "R", "D"])
    q.add_argument("--config", type=Path, required=True, help="file written by `aloe mpc config`")
    q.add_argument("--op", required=True, choices=OPS)
    q.add_argument("--shape")
    q.add_argument("--reps", type=int, default=3)
    q.add_argument("--frac-bits", type=int, default=14)
    q.add_argument("--timeout", type=float, default=60.0)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_party)

    from aloe.mpc.nn.commands import register_train

    register_train(g)
