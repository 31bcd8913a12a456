"""The README's per-system tables for Label Mapping and matrix embedding, printed from the benchmark results.

    python benchmarks/summary_tables.py            # markdown, from benchmarks/results/
    python benchmarks/summary_tables.py --json

Reads labelmap_scale.json (pairs, N = 10^5), labelmap_scale_words.json (words, N = 10^4) and recsys_quick.json (or
the file given by --recsys); every row is a mean over seeds with its 95% Student-t interval, as the benchmark wrote it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


MODEL_ORDER = ["pop", "vector", "matrix", "matrix[e;1]", "comirec"]


def ci(c: dict, digits: int = 4, sign: str = "") -> str:
    if c["lo"] != c["lo"]:  # nan: one seed
        return f"{c['mean']:{sign}.{digits}f}"
    return f"{c['mean']:{sign}.{digits}f} [{c['lo']:{sign}.{digits}f}, {c['hi']:{sign}.{digits}f}]"


def load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; run the benchmark that writes it first")
    return json.loads(path.read_text())


def labelmap_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        res = load(path)
        cfg = res["config"]
        tuned = bool(res.get("tuning"))
        for r in res["summary"]:
            rows.append({"dataset": f"{cfg.get('task', 'pairs')}, N = {cfg['classes']:,}",
                         "method": f"{r['method']} 1/{r['fraction']}", "lr": r.get("lr") or cfg["lr"],
                         "order": r.get("order"), "tuned": tuned, "seconds": cfg["seconds"],
                         "seeds": len(r["seeds"]), "output_params": r["output_params"],
                         "train_examples_per_second": r["train_examples_per_second"], "top1": r["top1"],
                         "top5": r["top5"], "source": str(path.relative_to(ROOT))})
    return rows


def recsys_rows(path: Path) -> list[dict]:
    res = load(path)
    rows = []
    for d in res["datasets"]:
        for name, r in sorted(res["accuracy"][d].items(), key=lambda kv: (MODEL_ORDER.index(kv[0].split("/")[0]),
                                                                           kv[0])):
            fixed = name != "pop" and r.get("lr") is None  # a run before tuning: Adam 3e-3, fixed epochs
            rows.append({"dataset": d, "model": name, "seeds": r["seeds"], "lr": 3e-3 if fixed else r.get("lr"),
                         "epochs": res["config"]["epochs"] if fixed else r.get("epochs"),
                         "tuned": bool(res["config"].get("tune")),
                         "recall@20": r["recall@20"], "mrr@20": r["mrr@20"],
                         "d_recall@20": res["paired_vs_vector"][d].get(name, {}).get("recall@20"),
                         "source": str(path.relative_to(ROOT))})
    return rows


def markdown(lm: list[dict], rs: list[dict]) -> str:
    out = ["| dataset | method | lr | output params | train ex/s | top-1 | top-5 |",
           "|---|---|---|---|---|---|---|"]
    for r in lm:
        lr = f"{r['lr']:g}" + (" (tuned)" if r["tuned"] else " (fixed)")
        out.append(f"| {r['dataset']} | {r['method']} | {lr} | {r['output_params']:,} | "
                   f"{ci(r['train_examples_per_second'], 0)} | {ci(r['top1'])} | {ci(r['top5'])} |")
    out += ["", "| dataset | model | lr, epochs | Recall@20 | MRR@20 | dRecall@20 vs vector |",
            "|---|---|---|---|---|---|"]
    for r in rs:
        setting = "-" if r["lr"] is None else f"{r['lr']:g}, {r['epochs']}" + (" (tuned)" if r["tuned"] else " (fixed)")
        d = ci(r["d_recall@20"], sign="+") if r["d_recall@20"] else "-"
        out.append(f"| {r['dataset']} | {r['model']} | {setting} | {ci(r['recall@20'])} | {ci(r['mrr@20'])} | {d} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelmap", type=Path, nargs="+",
                   default=[RESULTS / "labelmap_scale_words.json", RESULTS / "labelmap_scale.json"])
    p.add_argument("--recsys", type=Path, default=RESULTS / "recsys_quick.json")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    lm, rs = labelmap_rows([x.resolve() for x in args.labelmap]), recsys_rows(args.recsys.resolve())
    sys.stdout.write(json.dumps({"labelmap": lm, "recsys": rs}, indent=2) + "\n" if args.json else markdown(lm, rs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
