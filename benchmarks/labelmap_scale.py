"""Label Mapping at N = 10^5 classes on real text: label maps vs one-hot at equal parameters and equal training time.

Task ``pairs`` (aloe.labelmap.tasks.pairs_task): the previous 3 words of KJV + Shakespeare predict the next two
words jointly; the classes are the 10^5 most frequent word pairs of the training split (the texts have only about
32k distinct words, so next-word classification cannot reach 10^5 classes). Every method gets the same trunk
(3 x 64-d embeddings over a 20k-word input vocabulary, two ReLU layers of 128), Adam, batch 256, and the same
training time: ``--seconds`` of training steps each (as many epochs as fit). Output budgets are fractions of
one-hot's full output layer (d + 1) N; below it one-hot is a rank-r factorised softmax of the same size.

    python benchmarks/labelmap_scale.py                  # 5 runs x 100 s of training (about 10 minutes)
    python benchmarks/labelmap_scale.py --seconds 20     # a quick look

Writes benchmarks/results/labelmap_scale.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.labelmap.harness import train  # noqa: E402
from aloe.labelmap.tasks import pairs_task  # noqa: E402

# (method, fraction of one-hot's full output layer)
RUNS = [("onehot", 1), ("onehot", 10), ("lm-nt", 10), ("lm-nt", 50), ("lm-it", 50)]


def markdown(result: dict) -> str:
    c = result["config"]
    info = result["task_info"]
    lines = ["# Label Mapping at scale", "",
             f"Command: `{c['command']}` on {c['machine']}, 1 thread; {result['seconds']:.0f} s wall.", "",
             f"Task `pairs`: N = {c['classes']:,} word-pair classes ({info['distinct_train_pairs']:,} distinct pairs "
             f"in training, the classes cover {info['train_pair_coverage']:.1%} of training positions), "
             f"{result['n_train']:,} training and {result['n_test']:,} test examples; always answering the most "
             f"frequent pair: top-1 {info['test_majority_top1']:.4f}.", "",
             f"Equal training time: {c['seconds']:.0f} s of training steps per method (1 thread, batch 256).", "",
             "| budget | method | output params | heads | examples seen | epochs | train ex/s | top-1 | top-5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        heads = r.get("head_sizes")
        heads = f"{len(heads)} heads {min(heads)}..{max(heads)}" if heads else (
            f"rank {r['rank']}" if r.get("rank") else "N")
        lines.append(f"| 1/{r['fraction']} | {r['method']} | {r['output_params']:,} | {heads} | "
                     f"{r['train_examples']:,} | {r['train_examples'] / result['n_train']:.2f} | "
                     f"{r['train_examples_per_second']:.0f} | {r['top1']:.4f} | {r['top5']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in result["runs"]:
        name = f"{r['method']} 1/{r['fraction']}"
        axes[0].scatter(r["output_params"], r["top1"], s=40)
        axes[0].annotate(name, (r["output_params"], r["top1"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        axes[1].scatter(r["train_examples_per_second"], r["top1"], s=40)
        axes[1].annotate(name, (r["train_examples_per_second"], r["top1"]), fontsize=8, xytext=(4, 3),
                         textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("output-layer parameters")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("training examples/s")
    for ax in axes:
        ax.set_ylabel("top-1")
        ax.grid(alpha=0.3)
    fig.suptitle(f"pairs, N = {result['config']['classes']:,}, {result['config']['seconds']:.0f} s of training each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=100.0, help="training time per method")
    p.add_argument("--test-examples", type=int, default=3000)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = pairs_task(args.classes, max_test=args.test_examples)
    print(f"pairs task: N = {task.n_classes:,}, {task.n_train:,} train, {task.n_test:,} test "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    full = (task.width + 1) * task.n_classes
    runs = []
    for method, frac in RUNS:
        res = train(task, method, None if frac == 1 else full // frac, epochs=1000, lr=args.lr,
                    max_seconds=args.seconds, report_map=False)
        res["fraction"] = frac
        res.pop("task_info", None)
        runs.append(res)
        print(json.dumps({k: res.get(k) for k in ("method", "fraction", "output_params", "train_examples",
                                                   "train_examples_per_second", "top1", "top5")}),
              file=sys.stderr, flush=True)
    result = {"config": {"classes": args.classes, "seconds": args.seconds, "lr": args.lr,
                         "test_examples": args.test_examples,
                         "command": "python benchmarks/labelmap_scale.py "
                                    + " ".join(argv if argv is not None else sys.argv[1:]),
                         "machine": f"{platform.machine()}, torch {torch.__version__}"},
              "task_info": task.info, "n_train": task.n_train, "n_test": task.n_test, "runs": runs,
              "seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "labelmap_scale.json", result)
    atomic_write_text(args.out / "labelmap_scale.md", markdown(result))
    plot(result, args.out / "labelmap_scale.png")
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
