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


def _party(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.mpc import deploy

    role = deploy.role_of(args.role)
    dep = deploy.load(args.config)
    if args.op is not None:
        from aloe.mpc.bench import bench_program, parse_shape, summarize_party

        shapes = parse_shape(args.op, args.shape)
        result, _ = deploy.run(role, dep, bench_program, (args.op, shapes, args.reps, 0, True), args.frac_bits)
        summary = summarize_party(role, args.op, shapes, result)
    else:
        summary = train_party(role, dep)
    if args.json:
        print_json(summary)
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def train_party(role: str, dep) -> dict:
    """One party of a deployment's training run; a party named in ``reveal_to`` writes the model."""
    import time

    import torch

    from aloe.mpc import deploy
    from aloe.mpc.nn import data as D
    from aloe.mpc.nn.train import train_program, write_model

    cfg = deploy.train_config(dep, role)
    spec = dep.parties[role]
    if role in cfg.reveal_to and spec.model_out is None:
        raise AloeError(f"{dep.path}: {role} learns the model (reveal_to) but has no model_out")
    count = cfg.examples if cfg.examples is not None else (
        D.MNIST_TRAIN if role == "D" and cfg.dataset == "mnist" else None)
    lay = D.layout(cfg.model, cfg.dataset, cfg.limit, cfg.blobs, root=cfg.data_dir, count=count, owners=cfg.owners)
    t0 = time.perf_counter()
    result, stats = deploy.run(role, dep, train_program, (cfg, lay, None), cfg.frac_bits)
    out = {"role": deploy.CERT_ROLE[role], "model": cfg.model, "examples": lay.n, "epochs": cfg.epochs,
           "seconds": time.perf_counter() - t0, "online_bytes_sent": stats["online_bytes_sent"],
           "offline_bytes": stats["offline_bytes_sent"] + stats["offline_bytes_received"]}
    if role == "L":
        out.update(rounds=result["rounds"], train_seconds=result["train_seconds"])
    weights = (result or {}).get("weights")
    if weights:
        write_model(Path(spec.model_out), {k: torch.from_numpy(v) for k, v in weights.items()},
                    {"model": cfg.model, "epochs": cfg.epochs, "features": lay.l_shape[0] + (lay.r_shape or (0,))[0]})
        out["model_path"] = spec.model_out
    return out


def _share(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.mpc import deploy
    from aloe.mpc.owners import share_file

    if args.role != "owner":
        raise AloeError("aloe mpc share runs as --role owner")
    dep = deploy.load(args.config)
    summary = share_file(dep, args.name, args.data)
    if args.json:
        print_json(summary)
    else:
        print(f"owner {summary['owner']}: shared {summary['rows']} x {summary['columns']}"
              f"{' + labels' if summary['labels'] else ''} with L and R")
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

    q = g.add_parser("party", help="run one party of a deployment (deploy.toml): its training job, or a bench op")
    q.add_argument("--role", required=True, choices=["L", "R", "dealer", "D"])
    q.add_argument("--config", type=Path, required=True, help="the deployment file (TOML; see docs/mpc-deployment.md)")
    q.add_argument("--op", choices=OPS, help="run this bench op instead of the file's [train] job")
    q.add_argument("--shape")
    q.add_argument("--reps", type=int, default=3)
    q.add_argument("--frac-bits", type=int, default=14)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_party)

    s = g.add_parser("share", help="a data owner secret-shares its own file with L and R")
    s.add_argument("--role", required=True, choices=["owner"])
    s.add_argument("--name", help="which of the file's [owners.*] this is (needed when it names several)")
    s.add_argument("--config", type=Path, required=True)
    s.add_argument("--data", type=Path, required=True, help="CSV or .npy: this owner's columns (+ label column)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_share)

    from aloe.mpc.nn.commands import register_train

    register_train(g)
