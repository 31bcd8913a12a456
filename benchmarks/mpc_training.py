"""Secure training, aloe vs CrypTen, side by side in one run.

Workloads (the reference's W2 and W3):
- ``lr``: one epoch of logistic regression on 5,000 x 20 Gaussian clusters, full batch (CrypTen's benchmark
  default), features split between the two data owners, labels owned by one;
- ``b-avg`` / ``b-max``: one training step of Network B (conv 16 5x5, ReLU, pool, conv 16 5x5, ReLU, pool, FC 100,
  ReLU, FC 10) at batch 128 on MNIST, with average or max pooling; softmax + cross-entropy, momentum SGD.

aloe runs ``aloe.mpc.nn.train.train`` (three processes: L, R and the dealer; the dealer starts with them, so its
work is inside the timed span) and reports the training loop's time on L (from after the parties' start-up to the
end of the step, including sharing the batch; the time to write the epoch checkpoint is subtracted and recorded
separately, since CrypTen writes none), its rounds, and the bytes on the
L-R channel (online) and from the dealer (offline). CrypTen 0.4.1 (two parties plus its trusted third party,
provider TTP, momentum SGD) runs in its own virtual environment (see ``benchmarks/mpc_ops.py``) and reports the
same step's time, rounds, and rank 1's byte counter (the traffic between the two parties). aloe runs each workload
a second time with ``preprocess=True``: the dealer delivers the step's correlated randomness first, and the step's
online phase is timed alone (reported beside the goal, which is checked on the first run: CrypTen's TTP mode has no
offline phase).

aloe's channels are TLS 1.3 (its default) unless ``--channels plain`` asks for plain TCP (``--insecure-loopback``);
the choice is recorded in the JSON (``channels``) and the Markdown.

``--wan`` repeats both inside a network namespace whose loopback is limited to 100 Mbit/s (``tbf``; the kernel has no
``netem``), and adds a projection ``seconds + rounds x one-way delay`` for 2.5 ms and 25 ms (labelled as such).
One measurement per Network B workload (each is a full training step; the machine is shared and slow); the LR
epoch, a fraction of a second, is timed 5 times on each side and the medians compared.

Usage: python benchmarks/mpc_training.py [--quick] [--workloads lr,b-avg,b-max] [--drelu prefix,gmodule]
[--channels tls|plain] [--wan [--wan-workloads lr]] [--json]
``--quick``: lr and b-avg only. ``--drelu``: the DReLU methods the network workloads run with, each beside the same
CrypTen measurement (default both); LR runs with the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from aloe import AloeError  # noqa: E402
from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.mpc.nn import data as D  # noqa: E402
from aloe.mpc.nn.train import DEFAULT_DRELU, TrainConfig, train  # noqa: E402
from common import latency_projection  # noqa: E402

WORKLOADS = ("lr", "b-avg", "b-max")
# LR's step takes a fraction of a second, so a hiccup of the shared machine can double it: both sides time it this
# many times and report the median (a Network B step is timed once)
REPS = {"lr": 5}
GOALS = {"lr": 0.25, "b-avg": 0.2, "b-max": 0.2}
BLOBS = (5000, 20)
CHANNELS = ("tls", "plain")


def aloe_config(w: str, ckpt: str, preprocess: bool = False, drelu: str = DEFAULT_DRELU,
                channels: str = "tls") -> TrainConfig:
    plain = channels == "plain"  # else TLS with a fresh certificate bundle per launch (train's default)
    if w == "lr":
        return TrainConfig(model="lr", dataset="blobs", limit=BLOBS[0], batch=BLOBS[0], epochs=1, lr=0.1,
                           blobs=BLOBS, checkpoint_dir=ckpt, timeout=600.0, preprocess=preprocess, drelu=drelu,
                           insecure_loopback=plain)
    return TrainConfig(model="b", pool=w.split("-")[1], limit=128, batch=128, epochs=1, lr=0.01, checkpoint_dir=ckpt,
                       timeout=600.0, preprocess=preprocess, drelu=drelu, insecure_loopback=plain)


def run_aloe(w: str, drelu: str = DEFAULT_DRELU, channels: str = "tls") -> dict:
    reps, pres = [], []
    for _ in range(REPS.get(w, 1)):
        with tempfile.TemporaryDirectory() as tmp:
            reps.append(train(aloe_config(w, tmp, drelu=drelu, channels=channels), progress=False, plain=False))
        with tempfile.TemporaryDirectory() as tmp:
            pres.append(train(aloe_config(w, tmp, preprocess=True, drelu=drelu, channels=channels), progress=False,
                              plain=False))
    # the step without writing the epoch checkpoint (CrypTen writes none); that time is reported beside it
    rep = reps[-1]
    return {"seconds": statistics.median(r["train_seconds"] - r["checkpoint_seconds"] for r in reps),
            "repetitions": len(reps), "launch_seconds": statistics.median(r["seconds"] for r in reps),
            "checkpoint_seconds": statistics.median(r["checkpoint_seconds"] for r in reps), "rounds": rep["rounds"],
            "online_bytes": rep["online_bytes"], "offline_bytes": rep["offline_bytes"],
            "online_seconds": statistics.median(p["online_seconds"] for p in pres)}


def crypten_data(path: Path) -> None:
    xl, _ = D.blobs_columns(BLOBS[0], BLOBS[1], 0, "L")
    xr, y = D.blobs_columns(BLOBS[0], BLOBS[1], 0, "R")
    torch.save({"lr_xl": xl, "lr_xr": xr, "lr_y": y, "b_x": D.mnist_images("train", 128),
                "b_y": D.mnist_labels("train", 128)}, path)


def run_crypten(workloads: list[str]) -> dict:
    from mpc_ops import crypten_python

    py = crypten_python()
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data.pt", Path(tmp) / "crypten.json"
        crypten_data(data)
        proc = subprocess.run([str(py), str(HERE / "crypten_training_harness.py"), str(data), str(out),
                               ",".join(workloads), ",".join(f"{w}={n}" for w, n in REPS.items())],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            raise AloeError(f"CrypTen harness failed: {proc.stderr.strip().splitlines()[-3:]}")
        return json.loads(out.read_text())


def measure(workloads: list[str], drelus: list[str], channels: str = "tls") -> dict:
    # each network workload once per DReLU method; LR (whose only compares are the sigmoid's clamp) with the first
    runs = [(w, d) for w in workloads for d in (drelus if w != "lr" else drelus[:1])]
    aloe = {(w, d): run_aloe(w, d, channels) for w, d in runs}
    crypten = run_crypten(workloads)
    rows = []
    for w, d in runs:
        a, c = aloe[(w, d)], crypten["workloads"][w]
        rows.append({
            "workload": w,
            "drelu": d,
            "aloe_seconds": a["seconds"],
            "repetitions": a["repetitions"],
            "crypten_repetitions": c.get("repetitions", 1),
            "aloe_launch_seconds": a["launch_seconds"],
            "aloe_checkpoint_seconds": a["checkpoint_seconds"],
            "crypten_seconds": c["seconds"],
            "ratio": a["seconds"] / c["seconds"],
            "aloe_online_seconds": a["online_seconds"],
            "online_ratio": a["online_seconds"] / c["seconds"],
            "goal": GOALS[w],
            "aloe_rounds": a["rounds"],
            "crypten_rounds": c["rounds"],
            "aloe_online_bytes": a["online_bytes"],
            "aloe_offline_bytes": a["offline_bytes"],
            "crypten_online_bytes": c["online_bytes"],
            "crypten_rank0_bytes": c["rank0_bytes"],
        })
    return {"crypten_version": crypten["crypten"], "torch": crypten["torch"], "channels": channels, "rows": rows}


NAMES = {"lr": "LR epoch, 5,000 x 20, full batch", "b-avg": "Network B step, b=128, avg-pool",
         "b-max": "Network B step, b=128, max-pool"}


def markdown(result: dict, title: str, wan: bool = False) -> str:
    lines = [f"### {title}", "",
             "| workload | aloe DReLU | aloe s | CrypTen s | aloe/CrypTen (goal) | rounds aloe / CrypTen | "
             "online MB aloe / CrypTen | aloe offline MB | aloe online phase s (/CrypTen) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {NAMES[r['workload']]} | {r['drelu']} | {r['aloe_seconds']:.2f} | "
            f"{r['crypten_seconds']:.2f} | {r['ratio']:.2f} "
            f"(<= {r['goal']}) | {r['aloe_rounds']} / {r['crypten_rounds']} | {r['aloe_online_bytes'] / 1e6:,.1f} / "
            f"{r['crypten_online_bytes'] / 1e6:,.1f} | {r['aloe_offline_bytes'] / 1e6:,.1f} | "
            f"{r['aloe_online_seconds']:.2f} ({r['online_ratio']:.2f}) |")
    if wan:
        rows = [{**r, "workload": f"{r['workload']} ({r['drelu']})"} for r in result["rows"]]
        lines += latency_projection(rows, "workload", "aloe_seconds", "crypten_seconds", 1e3, 2,
                                    "Projection with latency (not a measurement): seconds + rounds x one-way delay.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "seconds", "wall seconds per step"), (axes[1], "online_bytes", "online bytes")):
        ax.bar([i - 0.2 for i in x], [r[f"aloe_{key}"] for r in rows], 0.4, label="aloe")
        ax.bar([i + 0.2 for i in x], [r[f"crypten_{key}"] for r in rows], 0.4, label="CrypTen (TTP)")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{r['workload']}\n{r['drelu']}" for r in rows])
        ax.legend()
    fig.suptitle("secure training, aloe vs CrypTen (LAN, one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="lr and b-avg only")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--wan", action="store_true", help="also run inside a 100 Mbit/s network namespace")
    ap.add_argument("--wan-workloads", help="workloads for the WAN run (default: the LAN ones)")
    ap.add_argument("--drelu", default=f"{DEFAULT_DRELU},gmodule",
                    help="DReLU methods to run the network workloads with (comma list of prefix, gmodule; "
                         f"default {DEFAULT_DRELU},gmodule)")
    ap.add_argument("--channels", choices=CHANNELS, default="tls",
                    help="aloe's channels: TLS 1.3 (default) or plain TCP (--insecure-loopback)")
    ap.add_argument("--inner", choices=["wan"], help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    workloads = ["lr", "b-avg"] if args.quick else [w for w in args.workloads.split(",") if w]
    if any(w not in WORKLOADS for w in workloads):
        raise SystemExit(f"unknown workload in {args.workloads}")
    drelus = list(dict.fromkeys(d for d in args.drelu.split(",") if d))
    if not drelus or any(d not in ("prefix", "gmodule") for d in drelus):
        raise SystemExit(f"unknown DReLU method in {args.drelu}")
    torch.set_num_threads(1)
    if args.inner == "wan":
        print(json.dumps(measure(workloads, drelus, args.channels)))
        return 0
    lan = measure(workloads, drelus, args.channels)
    cmd_line = "python benchmarks/mpc_training.py"
    cmd_line += " --quick" if args.quick else f" --workloads {','.join(workloads)}"
    cmd_line += f" --drelu {','.join(drelus)} --channels {args.channels}"
    report = {"lan": lan, "channels": args.channels, "machine": f"{os.cpu_count()} CPU cores (shared), loopback"}
    md = ["# Secure training: aloe vs CrypTen (side by side, one run)", "",
          f"CrypTen {lan['crypten_version']} with provider TTP, torch {lan['torch']}. aloe's channels: "
          f"{'TLS 1.3' if args.channels == 'tls' else 'plain TCP (--insecure-loopback)'}. "
          "One measurement per Network B workload; "
          "the LR epoch (a fraction of a second) is timed 5 times on each side and the medians compared. "
          "aloe s: the training loop on L (batch sharing, forward, backward, update; the epoch checkpoint's "
          "write is excluded and recorded in the JSON), dealer running alongside; CrypTen s: the same step. "
          "aloe online phase s: a second aloe run in which the dealer delivers the step's correlated randomness "
          "before L and R start it (`--preprocess`), timing the online phase alone; CrypTen's TTP mode has no "
          "such split, so the goal is checked against aloe s. "
          "Online MB: traffic between the two computing parties "
          "(aloe: both directions of the L-R channel incl. frames; CrypTen: rank 1's counter). aloe offline MB: the "
          "dealer's corrections.", "", markdown(lan, "LAN (loopback)")]
    if args.wan:
        wl = args.wan_workloads or ",".join(workloads)
        cmd_line += f" --wan --wan-workloads {wl}"
        cmd = ("ip link set lo up && tc qdisc add dev lo root tbf rate 100mbit burst 1mbit latency 100ms && "
               f"{sys.executable} {Path(__file__).resolve()} --inner wan --workloads {wl} --drelu {','.join(drelus)} "
               f"--channels {args.channels}")
        proc = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, timeout=7200)
        if proc.returncode != 0:
            raise AloeError(f"WAN run failed: {proc.stderr.strip().splitlines()[-3:]}")
        wan = json.loads(proc.stdout.strip().splitlines()[-1])
        report["wan_100mbit"] = wan
        md.append(markdown(wan, "WAN: 100 Mbit/s loopback (tbf) in a private network namespace", wan=True))
    md.insert(2, f"Command: `{cmd_line}`")
    md.insert(3, "")
    out_dir = HERE / "results"
    atomic_write_json(out_dir / "mpc_training.json", report)
    atomic_write_text(out_dir / "mpc_training.md", "\n".join(md))
    plot(lan, out_dir / "mpc_training.png")
    print(json.dumps(report, indent=2) if args.json else "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
