"""Secure training accuracy on full MNIST: each model trained securely and in plain PyTorch, side by side.

Every run is ``aloe.mpc.nn.train.train`` with its defaults (three processes: L owns the images, R the labels, the
dealer helps; momentum SGD 0.9, batch 128, the default learning rate, the sign of ReLU and max-pool read at bit 31
by the parallel-prefix carry).
The plain baseline is the same model trained in plain PyTorch on the same data, initialisation, batch order and
quantised learning rate. Both are evaluated on the 10,000 MNIST test images. The report also gives the largest value
the plain run fed a ReLU or a max-pool compare, beside the range the secure compare reads exactly.

Usage: python benchmarks/mpc_accuracy.py [--runs lr,a,b-avg,b-max] [--epochs 1] [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from aloe.mpc.nn.train import TrainConfig, train  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

RUNS = ("lr", "a", "b-avg", "b-max")
NAMES = {"lr": "LR (pixels split L/R, label digit >= 5)", "a": "Network A", "b-avg": "Network B, avg-pool",
         "b-max": "Network B, max-pool"}


def config(run: str, epochs: int, limit: int | None, ckpt: str) -> TrainConfig:
    model, _, pool = run.partition("-")
    return TrainConfig(model=model, pool=pool or "max", epochs=epochs, limit=limit, checkpoint_dir=ckpt,
                       timeout=600.0)


def measure(runs: list[str], epochs: int, limit: int | None) -> list[dict]:
    rows = []
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            rep = train(config(run, epochs, limit, tmp), progress=True, plain=True)
        rows.append({"run": run, **{k: rep[k] for k in (
            "examples", "epochs", "batch", "steps_per_epoch", "lr", "accuracy", "plain_accuracy", "train_seconds",
            "online_bytes", "offline_bytes", "rounds", "sign_bits", "drelu", "compare_input_range",
            "plain_compare_input_max")}})
        r = rows[-1]
        print(f"{run}: secure {r['accuracy']:.4f}, plain {r['plain_accuracy']:.4f}", file=sys.stderr)
    return rows


def markdown(rows: list[dict], cmd: str) -> str:
    lines = ["# Secure training accuracy on MNIST (secure vs plain PyTorch, same data, initialisation and schedule)",
             "", f"Command: `{cmd}`", "",
             "Test set: the 10,000 MNIST test images. Machine: "
             f"{os.cpu_count()} CPU cores (shared); the three parties on loopback.", "",
             "| model | examples x epochs | steps | lr | secure accuracy | plain accuracy | difference (points) | "
             "training s | online GB | offline GB | largest compare input (plain) / exact range |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = 100 * (r["accuracy"] - r["plain_accuracy"])
        # LR has no ReLU or max-pool (its clamp before the sigmoid uses the full 63-bit compare)
        peak = "no compare at the sign bit" if r["run"] == "lr" else (
            f"{r['plain_compare_input_max']:.3g} / {r['compare_input_range']:,.0f}")
        lines.append(
            f"| {NAMES[r['run']]} | {r['examples']:,} x {r['epochs']} | {r['steps_per_epoch'] * r['epochs']:,} | "
            f"{r['lr']:g} | {r['accuracy']:.4f} | {r['plain_accuracy']:.4f} | {diff:+.2f} | "
            f"{r['train_seconds']:,.0f} | {r['online_bytes'] / 1e9:.2f} | {r['offline_bytes'] / 1e9:.2f} | "
            f"{peak} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], [r["accuracy"] for r in rows], 0.4, label="secure (aloe)")
    ax.bar([i + 0.2 for i in x], [r["plain_accuracy"] for r in rows], 0.4, label="plain PyTorch")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["run"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("MNIST: secure vs plain training, same data, init and schedule")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, help="the first N training examples (default: all 60,000)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    if not runs or any(r not in RUNS for r in runs):
        raise SystemExit(f"--runs takes names from {', '.join(RUNS)}")
    if args.epochs < 1 or (args.limit is not None and args.limit < 128):
        raise SystemExit("--epochs must be >= 1 and --limit >= 128")
    torch.set_num_threads(1)
    rows = measure(runs, args.epochs, args.limit)
    cmd = f"python benchmarks/mpc_accuracy.py --runs {','.join(runs)} --epochs {args.epochs}"
    if args.limit:
        cmd += f" --limit {args.limit}"
    md = markdown(rows, cmd)
    write_results("mpc_accuracy", {"command": cmd, "rows": rows}, md)
    plot(rows, RESULTS / "mpc_accuracy.png")
    print(json.dumps(rows, indent=2) if args.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
