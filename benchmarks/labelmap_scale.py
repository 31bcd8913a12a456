"""Label Mapping at N = 10^5 classes on real text: label maps vs one-hot at equal parameters and equal training time.

Task ``pairs`` (aloe.labelmap.tasks.pairs_task): the previous 3 words of KJV + Shakespeare predict the next two
words jointly; the classes are the 10^5 most frequent word pairs of the training split (the texts have only about
32k distinct words, so next-word classification cannot reach 10^5 classes). Every method gets the same trunk
(3 x 64-d embeddings over a 20k-word input vocabulary, two ReLU layers of 128), Adam, batch 256, and the same
training time: ``--seconds`` of training steps each (as many epochs as fit). Output budgets are fractions of
one-hot's full output layer (d + 1) N; below it one-hot is a rank-r factorised softmax of the same size.

    python benchmarks/labelmap_scale.py                  # 5 methods x 5 seeds x 100 s of training (about 50 min)
    python benchmarks/labelmap_scale.py --seconds 20 --seeds 1   # a quick look
    python benchmarks/labelmap_scale.py --task words --classes 10000 --probe-classes ''   # next word, N = 10^4

Task ``words`` (``--task words``, aloe.labelmap.tasks.words_task) is next-word prediction over the N most frequent
words of the same texts (same trunk, its input vocabulary the N classes); it writes labelmap_scale_words.*.

Tuning (``--tune-seconds``, 0 to skip): every method gets the same budget before its seeds run: the six
configurations of ``TUNE_GRID`` (learning rate; for label maps also the head width), ``--tune-seconds`` of training
each, scored by top-1 on a validation split cut from the training text (the last 10% of each document's training
part; the test part is never seen). The best configuration then trains every seed for ``--seconds``.

Every method runs with ``--seeds`` training seeds (initialisation and label map; the task and its batch order are
fixed); the tables give the mean and a 95% Student-t interval over the seeds.

One-hot's memory limit (``--probe-classes``): for each N, a child process builds the synthetic task with N classes
(``aloe.labelmap.tasks.synthetic_task``, 2,048 training examples) and takes ``--probe-steps`` training steps of one-hot
(full output layer) and of lm-it at 1/50 of it, batch 256, Adam; its peak RSS is measured by the parent. A line fitted
to one-hot's peaks gives the N at which one training step would no longer fit this machine's memory (MemTotal): an
extrapolation, labelled as such.

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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from aloe import AloeError  # noqa: E402
from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.labelmap.harness import check_budget, train  # noqa: E402
from aloe.labelmap.tasks import pairs_task, synthetic_task, words_task  # noqa: E402
from common import run_measured, t_ci  # noqa: E402

# (method, fraction of one-hot's full output layer)
RUNS = [("onehot", 1), ("onehot", 10), ("lm-nt", 10), ("lm-nt", 50), ("lm-it", 50)]
# The tuning grid: six configurations per method, whatever the method. One-hot has only its learning rate to tune;
# a label map also has its head width: order 2 (a few wide heads, each >= sqrt(N) classes) or the order that
# maximises the map's guaranteed separation (many narrow heads).
TUNE_GRID = {"onehot": [{"lr": lr, "order": None} for lr in (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)],
             "map": [{"lr": lr, "order": order} for lr in (2e-3, 5e-3, 1e-2) for order in (2, None)]}
TUNE_SEED = 1000  # the tuning runs' seed: none of the evaluation seeds
TUNE_VALIDATION = 0.1


PROBE_METHODS = (("onehot", 1), ("lm-it", 50))
METRICS = ("top1", "top5", "train_examples_per_second", "train_examples")


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, fraction): the first seed's shape fields, each metric's mean and 95% interval."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["fraction"]), []).append(r)
    rows = []
    for rs in groups.values():
        row = {k: rs[0].get(k) for k in ("method", "fraction", "output_params", "head_sizes", "rank", "lr", "order")}
        row["seeds"] = [r["seed"] for r in rs]
        for m in METRICS:
            row[m] = dict(zip(("mean", "lo", "hi"), t_ci([r[m] for r in rs])))
        rows.append(row)
    return rows


TASKS = {"pairs": pairs_task, "words": words_task}


def tune(task_name: str, classes: int, test_examples: int, seconds: float) -> dict:
    """Every configuration of every method's grid, ``seconds`` of training each with seed ``TUNE_SEED``, scored by
    top-1 on the validation split; the best per method (ties: the first in grid order)."""
    vtask = TASKS[task_name](classes, max_test=test_examples, validation=TUNE_VALIDATION)
    full = (vtask.width + 1) * vtask.n_classes
    rows = []
    for method, frac in RUNS:
        trials = []
        for cfg in TUNE_GRID["onehot" if method == "onehot" else "map"]:
            budget = None if frac == 1 else full // frac
            try:
                check_budget(method, vtask.n_classes, vtask.width, budget, cfg["order"])
            except AloeError as exc:  # e.g. two heads of >= sqrt(N) classes do not fit a small budget
                trials.append({**cfg, "top1": None, "infeasible": str(exc)})
                continue
            res = train(vtask, method, budget, epochs=1000, lr=cfg["lr"], order=cfg["order"], seed=TUNE_SEED,
                        max_seconds=seconds, report_map=False)
            trials.append({**cfg, "top1": res["top1"], "top5": res["top5"], "output_params": res["output_params"],
                           "heads": len(res["head_sizes"]) if res.get("head_sizes") else None,
                           "train_examples": res["train_examples"]})
            print(json.dumps({"tuning": method, "fraction": frac, **trials[-1]}), file=sys.stderr, flush=True)
        best = max((i for i in range(len(trials)) if trials[i]["top1"] is not None),
                   key=lambda i: (trials[i]["top1"], -i))
        rows.append({"method": method, "fraction": frac, "trials": trials,
                     "best": {"lr": trials[best]["lr"], "order": trials[best]["order"]}})
    return {"seconds_per_trial": seconds, "seed": TUNE_SEED, "validation_fraction": TUNE_VALIDATION,
            "n_train": vtask.n_train, "n_validation": vtask.n_test, "rows": rows}


def fmt_ci(c: dict, digits: int = 4) -> str:
    if c["lo"] != c["lo"]:  # nan: one seed
        return f"{c['mean']:.{digits}f}"
    return f"{c['mean']:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def probe(method: str, frac: int, classes: int, steps: int) -> dict:
    """Child-process body: ``steps`` training steps of ``method`` at N = ``classes`` (synthetic task)."""
    torch.set_num_threads(1)
    task = synthetic_task(classes, n_train=2048, n_test=256)
    full = (task.width + 1) * task.n_classes
    res = train(task, method, None if frac == 1 else full // frac, epochs=1000, max_steps=steps, report_map=False)
    return {"method": method, "fraction": frac, "classes": classes, "output_params": res["output_params"],
            "steps": steps, "train_examples_per_second": res["train_examples_per_second"]}


def memory_probe(classes: list[int], steps: int) -> dict:
    rows = []
    for n in classes:
        for method, frac in PROBE_METHODS:
            out, seconds, peak_mb = run_measured(
                [sys.executable, __file__, "--probe-child", f"{method},{frac},{n},{steps}"],
                f"the memory probe of {method} at N = {n:,}", stderr=None)
            row = json.loads(out.decode().strip().splitlines()[-1])
            row.update(peak_rss_mb=peak_mb, wall_seconds=seconds)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    mem_total_mb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemTotal:")) / 1024
    one = [r for r in rows if r["method"] == "onehot"]
    fit = None
    if len(one) >= 2:
        slope, intercept = np.polyfit([r["classes"] for r in one], [r["peak_rss_mb"] for r in one], 1)
        fit = {"mb_per_class": float(slope), "intercept_mb": float(intercept),
               "classes_at_mem_total": int((mem_total_mb - intercept) / slope) if slope > 0 else None}
    return {"rows": rows, "steps": steps, "mem_total_mb": mem_total_mb, "onehot_fit": fit}


def markdown(result: dict) -> str:
    c = result["config"]
    info = result["task_info"]
    lines = ["# Label Mapping at scale", "",
             f"Command: `{c['command']}` on {c['machine']}, 1 thread; {result['seconds']:.0f} s wall.", "",
             (f"Task `pairs`: N = {c['classes']:,} word-pair classes ({info['distinct_train_pairs']:,} distinct "
              f"pairs in training, the classes cover {info['train_pair_coverage']:.1%} of training positions), "
              if c.get("task", "pairs") == "pairs" else
              f"Task `words`: next word among the N = {c['classes']:,} most frequent words, ")
             + f"{result['n_train']:,} training and {result['n_test']:,} test examples; always answering the most "
             f"frequent class: top-1 {info['test_majority_top1']:.4f}.", "",
             f"Equal training time: {c['seconds']:.0f} s of training steps per method and seed (1 thread, batch "
             f"256, Adam at the learning rate "
             + ("each method's tuning chose, below" if result.get("tuning") else f"{c['lr']}")
             + f"), {len(c['seeds'])} seeds ({', '.join(map(str, c['seeds']))}): mean [95% Student-t interval].", "",
             "| budget | method | lr | output params | heads | examples seen | epochs | train ex/s | top-1 | top-5 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        heads = r.get("head_sizes")
        heads = f"{len(heads)} heads {min(heads)}..{max(heads)}" if heads else (
            f"rank {r['rank']}" if r.get("rank") else "N")
        lines.append(f"| 1/{r['fraction']} | {r['method']} | {r['lr']:g} | {r['output_params']:,} | {heads} | "
                     f"{r['train_examples']['mean']:,.0f} | {r['train_examples']['mean'] / result['n_train']:.2f} | "
                     f"{fmt_ci(r['train_examples_per_second'], 0)} | {fmt_ci(r['top1'])} | {fmt_ci(r['top5'])} |")
    tu = result.get("tuning")
    if tu:
        lines += ["", f"Tuning: six configurations per method, {tu['seconds_per_trial']:.0f} s of training each "
                  f"(seed {tu['seed']}), on a validation split cut from the training text (last "
                  f"{tu['validation_fraction']:.0%} of each document's training part: {tu['n_train']:,} training, "
                  f"{tu['n_validation']:,} validation examples). Validation top-1 per configuration (lr; heads: "
                  "'wide' = order 2, 'auto' = the order of greatest separation); the chosen one in bold:", "",
                  "| budget | method | configurations (validation top-1) |", "|---|---|---|"]
        for r in tu["rows"]:
            cells = []
            for t in r["trials"]:
                if t["top1"] is None:
                    cells.append(f"{t['lr']:g} wide: does not fit the budget")
                    continue
                name = f"{t['lr']:g}" + ("" if r["method"] == "onehot" else
                                         f" {'wide' if t['order'] == 2 else 'auto'} ({t['heads']} heads)")
                cell = f"{name}: {t['top1']:.4f}"
                cells.append(f"**{cell}**" if (t["lr"], t["order"]) == (r["best"]["lr"], r["best"]["order"])
                             else cell)
            lines.append(f"| 1/{r['fraction']} | {r['method']} | {'; '.join(cells)} |")
    mp = result.get("memory_probe")
    if mp:
        lines += ["", f"One training step's memory (synthetic task, batch 256, {mp['steps']} steps, peak RSS of the "
                  "child process incl. the interpreter and torch):", "",
                  "| N | method | output params | peak RSS MB | train ex/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['classes']:,} | {r['method']} 1/{r['fraction']} | {r['output_params']:,} | "
                  f"{r['peak_rss_mb']:,.0f} | {r['train_examples_per_second']:.0f} |" for r in mp["rows"]]
        f = mp.get("onehot_fit")
        if f:
            lines += ["", f"One-hot's peak grows by {f['mb_per_class'] * 1024:.1f} KB per class (line fitted to the "
                      f"rows above); this machine has {mp['mem_total_mb'] / 1024:.1f} GB (MemTotal), so one one-hot "
                      f"training step stops fitting near N = {f['classes_at_mem_total']:,} (an extrapolation, not "
                      "run)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in result["summary"]:
        name = f"{r['method']} 1/{r['fraction']}"
        top1 = r["top1"]
        err = None if top1["lo"] != top1["lo"] else [[top1["mean"] - top1["lo"]], [top1["hi"] - top1["mean"]]]
        for ax, x in ((axes[0], r["output_params"]), (axes[1], r["train_examples_per_second"]["mean"])):
            ax.errorbar([x], [top1["mean"]], yerr=err, fmt="o", capsize=3)
            ax.annotate(name, (x, top1["mean"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("output-layer parameters")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("training examples/s")
    for ax in axes:
        ax.set_ylabel("top-1 (mean, 95% interval)")
        ax.grid(alpha=0.3)
    c = result["config"]
    fig.suptitle(f"{c.get('task', 'pairs')}, N = {c['classes']:,}, {c['seconds']:.0f} s of training each, "
                 f"{len(c['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="pairs")
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=100.0, help="training time per method and seed")
    p.add_argument("--seeds", type=int, default=5, help="training seeds per method (0..seeds-1)")
    p.add_argument("--test-examples", type=int, default=3000)
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate when not tuning (--tune-seconds 0)")
    p.add_argument("--tune-seconds", type=float, default=20.0,
                   help="training time of each tuning configuration (0: no tuning, --lr and the default heads)")
    p.add_argument("--probe-classes", default="100000,300000,1000000", metavar="N1,N2,...",
                   help="class counts of the one-hot memory probe ('' skips it)")
    p.add_argument("--probe-steps", type=int, default=3)
    p.add_argument("--probe-child", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.probe_child:
        method, frac, n, steps = args.probe_child.split(",")
        print(json.dumps(probe(method, int(frac), int(n), int(steps))))
        return 0
    try:
        probe_classes = [int(x) for x in args.probe_classes.split(",") if x]
    except ValueError:
        p.error(f"--probe-classes: expected comma-separated integers, got {args.probe_classes!r}")
    if (args.seeds < 1 or args.seconds <= 0 or args.probe_steps < 1 or any(n < 2 for n in probe_classes)
            or args.tune_seconds < 0):
        p.error("--seeds and --probe-steps must be at least 1, --seconds positive, --tune-seconds at least 0, "
                "probe class counts at least 2")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = TASKS[args.task](args.classes, max_test=args.test_examples)
    print(f"{args.task} task: N = {task.n_classes:,}, {task.n_train:,} train, {task.n_test:,} test "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    full = (task.width + 1) * task.n_classes
    chosen = {(method, frac): {"lr": args.lr, "order": None} for method, frac in RUNS}
    tuning = None
    if args.tune_seconds:
        tuning = tune(args.task, args.classes, args.test_examples, args.tune_seconds)
        chosen = {(r["method"], r["fraction"]): r["best"] for r in tuning["rows"]}
    runs = []
    for method, frac in RUNS:
        cfg = chosen[(method, frac)]
        for seed in range(args.seeds):
            res = train(task, method, None if frac == 1 else full // frac, epochs=1000, lr=cfg["lr"],
                        order=cfg["order"], seed=seed, max_seconds=args.seconds, report_map=False)
            res.update(fraction=frac, seed=seed, lr=cfg["lr"], order=cfg["order"])
            res.pop("task_info", None)
            runs.append(res)
            print(json.dumps({k: res.get(k) for k in ("method", "fraction", "seed", "output_params", "train_examples",
                                                       "train_examples_per_second", "top1", "top5")}),
                  file=sys.stderr, flush=True)
    result = {"config": {"task": args.task, "classes": args.classes, "seconds": args.seconds, "lr": args.lr,
                         "tune_seconds": args.tune_seconds,
                         "seeds": list(range(args.seeds)), "test_examples": args.test_examples,
                         "command": "python benchmarks/labelmap_scale.py "
                                    + " ".join(argv if argv is not None else sys.argv[1:]),
                         "machine": f"{platform.machine()}, torch {torch.__version__}"},
              "task_info": task.info, "n_train": task.n_train, "n_test": task.n_test, "runs": runs,
              "summary": summarize(runs), "tuning": tuning}
    if probe_classes:
        result["memory_probe"] = memory_probe(probe_classes, args.probe_steps)
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "labelmap_scale" if args.task == "pairs" else f"labelmap_scale_{args.task}"
    atomic_write_json(args.out / f"{stem}.json", result)
    atomic_write_text(args.out / f"{stem}.md", markdown(result))
    plot(result, args.out / f"{stem}.png")
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
