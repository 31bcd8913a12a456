"""What TLS costs the secure training: encrypted vs plain channels, side by side in one run.

Workloads (as in ``benchmarks/mpc_training.py``):
- ``lr``: logistic regression on 5,000 x 20 Gaussian clusters, full batch, one step per epoch; 5 epochs per launch;
- ``b-avg``: Network B at batch 128 on MNIST with average pooling; 3 steps per launch.

Each launch starts L, R and the dealer as three processes (``aloe.mpc.nn.train.train``) with TLS 1.3 (a fresh
certificate bundle per launch, as ``aloe mpc train`` does without ``--certs``) or with plain loopback TCP
(``--insecure-loopback``). The launches alternate (plain, TLS, then TLS, plain, ...) so that load on the shared
machine hits both alike; each step is timed on L (sharing the batch, forward, backward, update; checkpoints
excluded) and the medians of all steps of each mode are compared. Also reported: the median launch time (process
start, handshakes, set-up) and the raw channel throughput of one 32 MB message each way between two threads.

Ops (``--ops``, default every op of ``aloe mpc bench`` at its default shape): each round launches the three parties
once per mode (alternating, as above) and times every op ``--op-reps`` times with the dealer synchronized
(``aloe.mpc.bench.run_suite``); the medians of all repetitions of each mode are compared.

Usage: python benchmarks/mpc_tls.py [--rounds 2] [--workloads lr,b-avg] [--ops mul,...|none] [--op-reps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.mpc import party as P  # noqa: E402
from aloe.mpc.nn.train import TrainConfig, train  # noqa: E402
from aloe.mpc.tls import Credentials, write_bundle  # noqa: E402

WORKLOADS = ("lr", "b-avg")
NAMES = {"lr": "LR epoch, 5,000 x 20, full batch", "b-avg": "Network B step, b=128, avg-pool"}
MODES = ("plain", "tls")


def config(w: str, ckpt: str, mode: str) -> TrainConfig:
    common = {"checkpoint_dir": ckpt, "timeout": 600.0, "insecure_loopback": mode == "plain"}
    if w == "lr":
        return TrainConfig(model="lr", dataset="blobs", limit=5000, batch=5000, epochs=5, lr=0.1, **common)
    return TrainConfig(model="b", pool="avg", limit=384, batch=128, epochs=1, lr=0.01, **common)


def channel_throughput(nbytes: int = 32 << 20, reps: int = 3) -> dict:
    """Seconds to move one ``nbytes`` message each way at once between two threads over loopback."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(Path(tmp) / "certs")
        secs = {"plain": (P.Security(authkey=os.urandom(32)),) * 2,
                "tls": tuple(P.Security(creds=Credentials.from_bundle(Path(tmp) / "certs", r)) for r in ("L", "R"))}
        x = torch.randint(-(2**62), 2**62, (nbytes // 8,), dtype=torch.int64)
        for mode in MODES:
            srv = socket.create_server(("127.0.0.1", 0))
            box = {}

            def serve(sec=secs[mode][0], srv=srv, box=box):
                box["ep"] = P._endpoint(P._accept(srv, sec, 30.0), "R", 60.0)

            t = threading.Thread(target=serve)
            t.start()
            client = P._endpoint(P._connect(srv.getsockname()[:2], secs[mode][1], 30.0, "L"), "L", 60.0)
            t.join()
            server = box["ep"]
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                th = threading.Thread(target=lambda s=server: s.send(0, [(x, 0)]))
                th.start()
                client.send(0, [(x, 0)])
                client.recv([((x.numel(),), 0)])
                server.recv([((x.numel(),), 0)])
                th.join()
                times.append(time.perf_counter() - t0)
            server.close()
            client.close()
            srv.close()
            out[mode] = statistics.median(times)
    return {"message_mb": nbytes / 1e6, "plain_seconds": out["plain"], "tls_seconds": out["tls"],
            "ratio": out["tls"] / out["plain"],
            "tls_mb_per_s_each_way": nbytes / 1e6 / out["tls"], "plain_mb_per_s_each_way": nbytes / 1e6 / out["plain"]}


def measure(workloads: list[str], rounds: int) -> dict:
    steps = {(w, m): [] for w in workloads for m in MODES}
    launches = {(w, m): [] for w in workloads for m in MODES}
    traffic = {}
    for i in range(rounds):
        for w in workloads:
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                with tempfile.TemporaryDirectory() as tmp:
                    rep = train(config(w, tmp, mode), progress=False, plain=False)
                steps[(w, mode)] += rep["step_seconds"]
                launches[(w, mode)].append(rep["seconds"] - rep["train_seconds"])
                traffic[w] = (rep["online_bytes"], rep["offline_bytes"], rep["rounds"] // len(rep["step_seconds"]))
    rows = []
    for w in workloads:
        med = {m: statistics.median(steps[(w, m)]) for m in MODES}
        rows.append({"workload": w, "steps_per_mode": len(steps[(w, "tls")]),
                     "plain_seconds": med["plain"], "tls_seconds": med["tls"], "ratio": med["tls"] / med["plain"],
                     "plain_all": steps[(w, "plain")], "tls_all": steps[(w, "tls")],
                     "plain_launch_seconds": statistics.median(launches[(w, "plain")]),
                     "tls_launch_seconds": statistics.median(launches[(w, "tls")]),
                     "online_bytes": traffic[w][0], "offline_bytes": traffic[w][1],
                     "rounds_per_step": traffic[w][2]})
    return {"rows": rows}


def measure_ops(ops: list[str], rounds: int, reps: int) -> dict:
    from aloe.mpc.bench import run_suite

    ms = {(op, m): [] for op in ops for m in MODES}
    shape = {}
    for i in range(rounds):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            for r in run_suite(ops, reps=reps, preprocessed=False, insecure_loopback=mode == "plain"):
                ms[(r["op"], mode)] += r["ms_all"]
                shape[r["op"]] = r["shape"]
    rows = []
    for op in ops:
        med = {m: statistics.median(ms[(op, m)]) for m in MODES}
        rows.append({"op": op, "shape": shape[op], "reps_per_mode": len(ms[(op, "tls")]), "plain_ms": med["plain"],
                     "tls_ms": med["tls"], "ratio": med["tls"] / med["plain"], "plain_all": ms[(op, "plain")],
                     "tls_all": ms[(op, "tls")]})
    return {"ops": rows}


def markdown(res: dict, cmd: str) -> str:
    lines = ["# TLS on the MPC channels: encrypted vs plain (side by side, one run)", "",
             f"Command: `{cmd}`", "",
             f"Machine: {os.cpu_count()} CPU cores (shared with other work), loopback. Launches alternate between "
             "plain (`--insecure-loopback`) and TLS 1.3 (ECDSA P-256 certificates, AES-GCM records); every step is "
             "timed on L, medians of all steps per mode. Launch s: the rest of the launch (process start-up, "
             "certificate bundle, handshakes, data loading), median over launches.", "",
             "| workload | steps per mode | plain s | TLS s | TLS / plain | launch s plain / TLS | online MB per run "
             "| offline MB per run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {NAMES[r['workload']]} | {r['steps_per_mode']} | {r['plain_seconds']:.3f} | "
                     f"{r['tls_seconds']:.3f} | **{r['ratio']:.2f}** | {r['plain_launch_seconds']:.1f} / "
                     f"{r['tls_launch_seconds']:.1f} | {r['online_bytes'] / 1e6:,.1f} | "
                     f"{r['offline_bytes'] / 1e6:,.1f} |")
    if res.get("ops"):
        lines += ["", "Ops (`aloe mpc bench` default shapes, dealer synchronized, medians of every repetition per "
                  "mode):",
                  "", "| op | shape | reps per mode | plain ms | TLS ms | TLS / plain |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['shape']} | {r['reps_per_mode']} | {r['plain_ms']:.1f} | {r['tls_ms']:.1f} | "
                  f"**{r['ratio']:.2f}** |" for r in res["ops"]]
    c = res["channel"]
    lines += ["", f"Raw channel: one {c['message_mb']:.0f} MB message each way at once between two threads: plain "
              f"{c['plain_seconds']:.3f} s, TLS {c['tls_seconds']:.3f} s (ratio {c['ratio']:.2f}; "
              f"{c['tls_mb_per_s_each_way']:,.0f} MB/s each way with TLS).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="launches per workload and mode (default 2)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--ops", default="all", help="ops of aloe mpc bench to time in both modes ('all' or 'none')")
    ap.add_argument("--op-reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from aloe.mpc.bench import OPS

    workloads = [w for w in args.workloads.split(",") if w]
    ops = list(OPS) if args.ops == "all" else [] if args.ops == "none" else [o for o in args.ops.split(",") if o]
    if any(w not in WORKLOADS for w in workloads) or args.rounds < 1 or args.op_reps < 1:
        raise SystemExit(f"unknown workload in {args.workloads}, or --rounds / --op-reps below 1")
    if any(o not in OPS for o in ops):
        raise SystemExit(f"unknown op in {args.ops}; choose from {', '.join(OPS)}, all or none")
    torch.set_num_threads(1)
    res = measure(workloads, args.rounds)
    if ops:
        res.update(measure_ops(ops, args.rounds, args.op_reps))
    res["channel"] = channel_throughput()
    cmd = (f"python benchmarks/mpc_tls.py --rounds {args.rounds} --workloads {','.join(workloads)} "
           f"--ops {','.join(ops) or 'none'} --op-reps {args.op_reps}")
    res["command"] = cmd
    out = HERE / "results"
    md = markdown(res, cmd)
    atomic_write_json(out / "mpc_tls.json", res)
    atomic_write_text(out / "mpc_tls.md", md)
    print(json.dumps(res, indent=2) if args.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
