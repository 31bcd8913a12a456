"""Label Mapping vs one-hot, ECOC and MACH: accuracy against output-layer parameters on every task.

For each task, every method is trained with the same trunk, optimiser, data and epochs at budgets that are
fractions of one-hot's full output layer ((d + 1) N): lm-nt, lm-it, ecoc and mach get ``budget // (d + 1)`` output
units, one-hot below its full size gets a low-rank factorised softmax. Training throughput (examples/s of the
training step, measured in the same run) is reported as a ratio to the full one-hot run of the same task. A
scaling part trains lm-nt on the synthetic teacher at N = 10^6 (Zipfian labels, exponent 1) and times one-hot's
and lm-nt's training steps side by side at N = 10^4, 10^5, 10^6.

    python benchmarks/labelmap.py --quick          # a few minutes on one CPU thread
    python benchmarks/labelmap.py                  # the full run (tens of minutes)
    python benchmarks/labelmap.py --tasks words,scaling   # a subset

Writes ``benchmarks/results/labelmap[-quick][-TASKS].{json,md,png}`` (TASKS when ``--tasks`` names a subset).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from aloe import AloeError  # noqa: E402
from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.labelmap import decode  # noqa: E402
from aloe.labelmap.harness import Method, train  # noqa: E402
from aloe.labelmap.maps import choose_moduli  # noqa: E402
from aloe.labelmap.tasks import (  # noqa: E402
    chars_task,
    missing_cjk_font_packages,
    synthetic_task,
    words_task,
)

METHODS = ("lm-nt", "lm-it", "ecoc", "mach", "onehot")

CONFIGS = {
    "quick": {
        "words": {"task": {"n_classes": 10_000, "max_train": 100_000, "max_test": 3000}, "epochs": 1, "lr": 5e-3,
                  "fractions": [10, 50]},
        "synthetic": {"task": {"n_classes": 2000, "n_train": 100_000, "n_test": 2000}, "epochs": 1, "lr": 1e-2,
                      "fractions": [10, 50]},
        "chars": {"task": {"n_classes": 300, "train_per_font": 4}, "epochs": 3, "lr": 2e-3, "fractions": [4]},
        "scaling": {"sizes": [10_000, 100_000, 1_000_000], "steps": 2, "train_big": 60_000, "test_big": 500},
    },
    "full": {
        "words": {"task": {"n_classes": 10_000, "max_train": 300_000, "max_test": 5000}, "epochs": 1,
                  "lr": 5e-3, "fractions": [10, 50, 100]},
        "synthetic": {"task": {"n_classes": 10_000, "n_train": 300_000, "n_test": 3000}, "epochs": 1, "lr": 1e-2,
                      "fractions": [10, 50]},
        "chars": {"task": {"n_classes": 1000, "train_per_font": 6}, "epochs": 4, "lr": 2e-3, "fractions": [4]},
        "scaling": {"sizes": [10_000, 100_000, 1_000_000], "steps": 4, "train_big": 300_000, "test_big": 2000},
    },
}


def make(name: str, cfg: dict):
    if name == "words":
        return words_task(**cfg["task"])
    if name == "synthetic":
        return synthetic_task(**cfg["task"])
    if name == "chars":
        return chars_task(**cfg["task"])
    raise AloeError(f"unknown task {name!r}")


def run_task(name: str, cfg: dict, log) -> list[dict]:
    task = make(name, cfg)
    full = (task.width + 1) * task.n_classes
    rows = []
    base = train(task, "onehot", None, epochs=cfg["epochs"], lr=cfg["lr"], report_map=False)
    base["fraction"] = 1
    rows.append(base)
    log(base)
    for frac in cfg["fractions"]:
        budget = full // frac
        for method in METHODS:
            try:
                res = train(task, method, budget, epochs=cfg["epochs"], lr=cfg["lr"])
            except AloeError as exc:
                res = {"task": name, "method": method, "budget": budget, "error": str(exc)}
            res["fraction"] = frac
            rows.append(res)
            log(res)
    for r in rows:
        if "train_examples_per_second" in r:
            r["throughput_vs_onehot"] = r["train_examples_per_second"] / base["train_examples_per_second"]
    return rows


def step_throughput(task, method_name: str, budget: int | None, steps: int, batch_size: int = 256,
                    order: int | None = None) -> float:
    """Median examples/s of ``steps`` training steps (after one warm-up step)."""
    torch.manual_seed(0)
    method = Method(method_name, task.n_classes, task.width, budget, order=order)
    model = method.build(task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    batches = task.train_batches(batch_size, 0)
    for i in range(steps + 1):
        x, y = next(batches)
        t0 = time.perf_counter()
        loss = method.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    del model, opt
    return batch_size / statistics.median(times)


def run_scaling(cfg: dict, log) -> dict:
    out = {"throughput": []}
    for n in cfg["sizes"]:
        task = synthetic_task(n, n_train=256 * (cfg["steps"] + 1), n_test=256)
        units = sum(choose_moduli(n, 4 * round(n ** 0.5) + 40, order=2))  # 4 heads near sqrt(N), r = 2
        budget = (task.width + 1) * units
        one = step_throughput(task, "onehot", None, cfg["steps"])
        lm = step_throughput(task, "lm-nt", budget, cfg["steps"], order=2)
        row = {"n_classes": n, "onehot_examples_per_second": one, "lm_nt_examples_per_second": lm,
               "ratio": lm / one, "lm_nt_output_params": budget, "onehot_output_params": (task.width + 1) * n}
        out["throughput"].append(row)
        log(row)
    n = cfg["sizes"][-1]
    task = synthetic_task(n, n_train=cfg["train_big"], n_test=cfg["test_big"], zipf=1.0)  # Zipfian labels
    budget = out["throughput"][-1]["lm_nt_output_params"]
    res = train(task, "lm-nt", budget, order=2, lr=1e-2, report_map=False)
    lmap = Method("lm-nt", n, task.width, budget, order=2).lmap
    g = torch.Generator().manual_seed(0)
    logps = [torch.log_softmax(torch.randn(512, k, generator=g), 1) for k in lmap.sizes]
    t0 = time.perf_counter()
    decode.topk_sum_logprob(logps, lmap, 5)
    dt = time.perf_counter() - t0
    res["exact_decode_ms_per_example"] = 1000 * dt / 512
    out["big"] = res
    log(res)
    return out


def _ordered(tasks: dict) -> list:
    return [(k, tasks[k]) for k in ("words", "synthetic", "chars") if k in tasks]


def fmt(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [f"# Label Mapping benchmark ({result['mode']})", "",
             f"`{result['command']}` on {result['machine']}, torch {result['torch']}, 1 thread. "
             "Output params = weights + biases of the output layer; one-hot below its full size is a low-rank "
             "softmax. Throughput = training examples/s relative to full one-hot on the same task, same run.", ""]
    for name, rows in _ordered(result["tasks"]):
        if isinstance(rows, dict):
            lines += [f"## {name}", "", f"not run: {rows['skipped']}", ""]
            continue
        info = next((r.get("task_info") for r in rows if "task_info" in r), {})
        n = next(r["n_classes"] for r in rows if "n_classes" in r)
        ntr = next(r.get("train_examples") for r in rows if "train_examples" in r)
        lines += [f"## {name} (N = {n:,}, {ntr:,} training examples seen in {rows[0]['epochs']} epoch(s))", "",
                  f"task: {json.dumps(info, ensure_ascii=False)}", "",
                  "| budget | method | output params | heads / bits | top-1 | top-5 | other decoders (top-1) | "
                  "throughput vs one-hot |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| 1/{r['fraction']} | {r['method']} | - | - | - | - | {r['error']} | - |")
                continue
            heads = r.get("head_sizes") or r.get("code_bits") or (f"rank {r['rank']}" if r.get("rank") else "N")
            if isinstance(heads, list):
                heads = f"{len(heads)} heads {min(heads)}..{max(heads)}"
            others = ", ".join(f"{d} {v['top1']:.4f}" for d, v in r["decoders"].items() if d != r["decoder"])
            lines.append(f"| 1/{r['fraction']} | {r['method']} ({r['decoder']}) | {r['output_params']:,} | {heads} | "
                         f"{fmt(r['top1'])} | {fmt(r['top5'])} | {others or '-'} | "
                         f"{fmt(r.get('throughput_vs_onehot'), 2)}x |")
        lines.append("")
    sc = result.get("scaling")
    if sc:
        lines += ["## Scaling (synthetic teacher)", "",
                  "| N | one-hot output params | one-hot ex/s | lm-nt output params | lm-nt ex/s | ratio |",
                  "|---|---|---|---|---|---|"]
        for r in sc["throughput"]:
            lines.append(f"| {r['n_classes']:,} | {r['onehot_output_params']:,} | "
                         f"{r['onehot_examples_per_second']:.0f} | {r['lm_nt_output_params']:,} | "
                         f"{r['lm_nt_examples_per_second']:.0f} | {r['ratio']:.1f}x |")
        b = sc["big"]
        lines += ["", f"lm-nt at N = {b['n_classes']:,} ({len(b['head_sizes'])} heads, {b['output_params']:,} output "
                  f"params vs one-hot {b['onehot_output_params']:,}), {b['train_examples']:,} training examples "
                  f"with Zipfian labels (always answering the most frequent class: top-1 "
                  f"{b['task_info']['top_class_probability']:.4f}): "
                  f"top-1 {b['top1']:.4f}, top-5 {b['top5']:.4f}; exact top-5 decoding over all N: "
                  f"{b['exact_decode_ms_per_example']:.2f} ms per example.", ""]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = {k: v for k, v in _ordered(result["tasks"]) if isinstance(v, list)}
    cols = max(1, len(tasks))
    fig, axes = plt.subplots(2, cols, figsize=(5.2 * cols, 7.5), squeeze=False)
    markers = {"lm-nt": "o", "lm-it": "s", "ecoc": "^", "mach": "v", "onehot": "D"}
    for col, (name, rows) in enumerate(tasks.items()):
        for row, metric in enumerate(("top1", "top5")):
            ax = axes[row][col]
            for method in METHODS:
                pts = sorted((r["output_params"], r[metric]) for r in rows
                             if r.get("method") == method and r.get(metric) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[method], label=method)
            ax.set_xscale("log")
            ax.set_xlabel("output-layer parameters")
            ax.set_ylabel(f"{metric[:3]}-{metric[3:]} accuracy")
            ax.set_title(f"{name} (N = {rows[0]['n_classes']:,})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (a few minutes on one CPU thread)")
    ap.add_argument("--tasks", default="words,synthetic,chars,scaling",
                    help="comma-separated subset of words,synthetic,chars,scaling")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--replot", type=Path, help="re-render the markdown and PNG of a result JSON and exit")
    args = ap.parse_args()
    if args.replot:
        result = json.loads(args.replot.read_text())
        atomic_write_text(args.replot.with_suffix(".md"), markdown(result))
        plot(result, args.replot.with_suffix(".png"))
        return 0
    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    cfgs = CONFIGS[mode]
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(wanted) - set(cfgs)
    if unknown:
        print(f"error: unknown task(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    missing = missing_cjk_font_packages() if "chars" in wanted else []
    if missing:  # the recorded chars setting renders from all four faces: fail before anything runs
        print(f"error: the chars task needs the CJK fonts of the Debian package(s) {', '.join(missing)}; install "
              f"them with 'make setup' as root or 'apt-get install -y --no-install-recommends {' '.join(missing)}' "
              "(or leave chars out with --tasks words,synthetic,scaling)", file=sys.stderr)
        return 2
    command = "python benchmarks/labelmap.py" + (" --quick" if args.quick else "")
    if "--tasks" in " ".join(sys.argv):
        command += f" --tasks {args.tasks}"
    result = {"mode": mode, "command": command,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
              "tasks": {}}

    def log(row: dict) -> None:
        if not args.json:
            keys = ("task", "method", "fraction", "output_params", "top1", "top5", "n_classes", "ratio",
                    "throughput_vs_onehot", "error")
            print(json.dumps({k: row[k] for k in keys if k in row}), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    for name in ("words", "synthetic", "chars"):
        if name not in wanted:
            continue
        result["tasks"][name] = run_task(name, cfgs[name], log)
    if "scaling" in wanted:
        result["scaling"] = run_scaling(cfgs["scaling"], log)
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "labelmap" + ("-quick" if args.quick else "")
    if "--tasks" in " ".join(sys.argv) and set(wanted) != {"words", "synthetic", "chars", "scaling"}:
        stem += "-" + "-".join(wanted)  # a subset gets its own files
    atomic_write_json(args.out / f"{stem}.json", result)
    atomic_write_text(args.out / f"{stem}.md", markdown(result))
    plot(result, args.out / f"{stem}.png")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
