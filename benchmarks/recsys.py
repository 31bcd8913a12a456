"""Matrix vs vector session embedding: Recall@20 / MRR@20 on every dataset, per bucket of the number of positive
eigenvalues of the session matrix, retrieval latency, interests.

    python benchmarks/recsys.py --quick      # 3 seeds x 3 epochs, 20k-item catalogue: a few minutes, 1 thread
    python benchmarks/recsys.py              # 5 seeds x 10 epochs, 100k-item catalogue
    python benchmarks/recsys.py --loss bpr-max   # adds the GRU4Rec-style vector model (BPR-max, 2048 negatives)
    python benchmarks/recsys.py --comirec        # adds the ComiRec-SA multi-interest model (K = 4, same budget)
    python benchmarks/recsys.py --tune           # each model's learning rate and epochs chosen on held-out sessions

With ``--tune`` every trained model gets the same tuning budget before its seeds run: one model per learning rate
of ``--tune-lrs``, ``--tune-epochs`` epochs each, scored by Recall@20 after every epoch on 10% of the training
sequences (at most 5,000) held out from its training; the best (learning rate, epochs) then trains every seed on the
whole training split and is scored once on the test split.

Writes benchmarks/results/recsys[_quick].{json,md,png}. Everything runs on one thread (torch and faiss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from aloe import AloeError  # noqa: E402
from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.recsys.data import DATASETS, movielens_genres  # noqa: E402
from aloe.recsys.interests import session_interests  # noqa: E402
from aloe.recsys.metrics import (  # noqa: E402
    bucket_labels,
    metrics_by_bucket,
    mrr_at,
    positive_eigen_counts,
    recall_at,
)
from aloe.recsys.models import DEFAULT_INTERESTS  # noqa: E402
from aloe.recsys.retrieval import MipsIndex, eigen_topk, exact_topk, recall_vs_exact, same_topk  # noqa: E402
from aloe.recsys.train import (  # noqa: E402
    DEFAULT_NEGATIVES,
    LOSSES,
    TUNE_LRS,
    TUNE_SEED,
    TrainConfig,
    fit_and_evaluate,
    test_queries,
    tune,
)
from common import t_ci  # noqa: E402

VARIANTS = [("pop", False, "ce"), ("vector", False, "ce"), ("matrix", False, "ce"), ("matrix", True, "ce")]
K = 20


def label(kind: str, aug: bool, loss: str = "ce") -> str:
    return ("matrix[e;1]" if aug else kind) + ("" if loss == "ce" else f"/{loss}")


def bootstrap_ci(ranks: np.ndarray, metric, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    draws = [metric(ranks[rng.integers(0, len(ranks), len(ranks))], K) for _ in range(n_boot)]
    return float(metric(ranks, K)), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def ci(triple: tuple[float, float, float]) -> dict:
    return dict(zip(("mean", "lo", "hi"), triple))


def eigen_buckets(per_seed: dict[str, list[dict]], edges: tuple[int, ...], rtol: float) -> dict:
    """Recall@20 / MRR@20 per bucket of the number of positive eigenvalues of the plain matrix model's session matrix
    on each test prefix. Seed s's matrix model sets the buckets and every trained variant of seed s is scored on the
    same prefixes; mean over seeds with a 95% t-interval (seeds with an empty bucket are left out of it)."""
    names = [n for n in per_seed if n != "pop"]
    tables, medians = [], []
    for s, run in enumerate(per_seed["matrix"]):
        model = run["model_obj"]
        with torch.no_grad():
            z, _ = test_queries(model, run["data_obj"])
            counts = positive_eigen_counts(model.session_matrix(z), rtol)
        medians.append(float(np.median(counts)))
        tables.append(metrics_by_bucket(counts, {n: per_seed[n][s]["ranks"] for n in names}, edges, K))
    rows = []
    for b, lab in enumerate(bucket_labels(edges)):
        full = [t[b] for t in tables if t[b]["n"]]
        row = {"bucket": lab, "n_per_seed": [t[b]["n"] for t in tables], "models": {}, "paired_vs_vector": {}}
        for n in names:
            row["models"][n] = {m: ci(t_ci([t["models"][n][m] for t in full])) for m in ("recall@20", "mrr@20")}
            if n != "vector":
                row["paired_vs_vector"][n] = {
                    m: ci(t_ci([t["models"][n][m] - t["models"]["vector"][m] for t in full]))
                    for m in ("recall@20", "mrr@20")}
        rows.append(row)
    return {"edges": list(edges), "rtol": rtol, "positive_eigenvalues_median_per_seed": medians, "rows": rows}


def per_query_ms(fn, queries: np.ndarray, repeats: int = 1) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(q[None])
        times.append((time.perf_counter() - t0) / repeats * 1e3)
    return float(np.median(times))


def retrieval_bench(model, data, n_queries: int, big_items: int, seed: int = 0) -> dict:
    """Exact top-20 vs faiss flat / HNSW over phi(e) vs the eigenvector route, on the trained catalogue and on a
    larger catalogue drawn from a Gaussian fitted to the trained item vectors (same trained queries)."""
    with torch.no_grad():
        q_all, _ = test_queries(model, data)
        vectors = model.item_vectors().double()
        m = vectors.shape[1]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(q_all), size=min(n_queries, len(q_all)), replace=False)
    zq = q_all[pick].numpy().astype(np.float32)
    base = model.candidates.detach().double().numpy()
    mean, cov = base.mean(0), np.cov(base, rowvar=False)
    big = rng.multivariate_normal(mean, cov, size=big_items)
    if model.config.augment:
        big = np.concatenate([big, np.ones((big_items, 1))], 1)
    return {name: catalogue_row(zq, x, m) for name, x in
            [("trained", vectors.numpy()), (f"gaussian-{big_items}", big)]}


def catalogue_row(zq: np.ndarray, x: np.ndarray, m: int) -> dict:
    from aloe.recsys.symmetric import phi, sym_from_z

    x32 = x.astype(np.float32)
    feats = phi(torch.from_numpy(x)).numpy().astype(np.float32)
    s_ex, i_ex = exact_topk(zq, feats, K)
    flat, hnsw, item_index = MipsIndex(feats, "flat"), MipsIndex(feats, "hnsw"), MipsIndex(x32, "flat")
    s_f, i_f = flat.search(zq, K)
    _, i_h = hnsw.search(zq, K)
    hnsw.index.hnsw.efSearch = 512
    _, i_h512 = hnsw.search(zq, K)
    hnsw_ms_512 = per_query_ms(lambda q: hnsw.search(q, K), zq[: min(50, len(zq))])
    hnsw.index.hnsw.efSearch = 128

    def eigen(z: np.ndarray):
        return eigen_topk(sym_from_z(torch.from_numpy(z).double(), m).numpy(), x32, K, item_index)

    eig = [eigen(z) for z in zq]
    i_e = np.stack([r.ids for r in eig])
    s_e = np.stack([r.scores for r in eig]).astype(np.float32)
    lat_q = zq[: min(50, len(zq))]
    return {
        "items": int(len(x)), "feature_dim": int(feats.shape[1]), "item_dim": int(m), "queries": int(len(zq)),
        "exact_ms": per_query_ms(lambda q: exact_topk(q, feats, K), lat_q),
        "faiss_flat_ms": per_query_ms(lambda q: flat.search(q, K), lat_q),
        "faiss_hnsw_ms": per_query_ms(lambda q: hnsw.search(q, K), lat_q),
        "eigen_route_ms": per_query_ms(lambda q: eigen(q[0]), lat_q),
        "faiss_flat_identical": float(np.mean([np.array_equal(a, b) for a, b in zip(i_f, i_ex)])),
        "faiss_flat_equal_up_to_ties": float(same_topk(i_f, s_f, i_ex, s_ex).mean()),
        "faiss_hnsw_recall": recall_vs_exact(i_h, i_ex),
        "faiss_hnsw_ef512_ms": hnsw_ms_512,
        "faiss_hnsw_ef512_recall": recall_vs_exact(i_h512, i_ex),
        "eigen_identical": float(np.mean([np.array_equal(a, b) for a, b in zip(i_e, i_ex)])),
        "eigen_equal_up_to_ties": float(same_topk(i_e, s_e, i_ex, s_ex).mean()),
        "eigen_candidates_fraction": float(np.median([r.candidates for r in eig]) / len(x)),
        "eigen_rounds_median": float(np.median([r.rounds for r in eig])),
        "positive_eigenvalues_median": float(np.median(
            [(np.linalg.eigvalsh(sym_from_z(torch.from_numpy(z).double(), m).numpy()) > 0).sum() for z in zq])),
    }


def vector_retrieval(model, data, n_queries: int, seed: int = 0) -> dict:
    """The vector model's top-20 on its trained catalogue: exact and faiss flat over e (dimension n_v). The same for
    the ComiRec model, whose queries are K interests: exact scores max_k u_k^T e, faiss flat searches once per
    interest and keeps each item's best score."""
    with torch.no_grad():
        q_all, _ = test_queries(model, data)
        feats = model.item_features().numpy().astype(np.float32)
    rng = np.random.default_rng(seed)
    zq = q_all[rng.choice(len(q_all), size=min(n_queries, len(q_all)), replace=False)].numpy().astype(np.float32)
    flat = MipsIndex(feats, "flat")
    s_ex, i_ex = exact_topk(zq, feats, K)
    s_f, i_f = flat.search(zq, K)
    lat_q = zq[: min(50, len(zq))]
    return {"items": int(len(feats)), "feature_dim": int(feats.shape[1]), "interests": int(model.interests),
            "exact_ms": per_query_ms(lambda q: exact_topk(q, feats, K), lat_q),
            "faiss_flat_ms": per_query_ms(lambda q: flat.search(q, K), lat_q),
            "faiss_flat_equal_up_to_ties": float(same_topk(i_f, s_f, i_ex, s_ex).mean())}


def interest_coherence(model, data, top: int = 3, per: int = 10, max_sessions: int = 300) -> dict:
    """MovieLens: genre agreement (mean pairwise Jaccard of genre sets) among the items each interest retrieves,
    against the top-`per` items of the whole score and random item sets."""
    genres = movielens_genres()
    g = [genres.get(int(r), frozenset()) for r in data.item_raw]

    def coherence(items) -> float:
        pairs = [(a, b) for i, a in enumerate(items) for b in items[i + 1:]]
        return float(np.mean([len(g[a] & g[b]) / max(1, len(g[a] | g[b])) for a, b in pairs]))

    rng = np.random.default_rng(0)
    seqs = data.test_sequences()[:max_sessions]
    per_interest, whole, rand, n_pos = [], [], [], []
    with torch.no_grad():
        x = model.item_vectors().double()
        feats = model.item_features()
        for s in seqs:
            z = model.queries(torch.from_numpy(s[None, :]))[0, -1]
            ints = session_interests(model.session_matrix(z), x, top, per)
            n_pos.append(len(ints))
            per_interest += [coherence(list(it.items)) for it in ints]
            whole.append(coherence(list(torch.topk(feats @ z, per).indices.numpy())))
            rand.append(coherence(list(rng.choice(data.n_items, per, replace=False))))
    return {"sessions": len(seqs), "per_interest_jaccard": float(np.mean(per_interest)),
            "whole_score_top_jaccard": float(np.mean(whole)), "random_jaccard": float(np.mean(rand)),
            "interests_per_session_median": float(np.median(n_pos))}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(results["accuracy"][results["datasets"][0]])
    width = 0.8 / len(names)
    for ax, metric in zip(axes[:2], ("recall@20", "mrr@20")):
        for j, name in enumerate(names):
            mids, los, his = [], [], []
            for d in results["datasets"]:
                s = results["accuracy"][d][name][metric]
                mids.append(s["mean"])
                los.append(s["mean"] - (s["lo"] if np.isfinite(s["lo"]) else s["mean"]))
                his.append((s["hi"] if np.isfinite(s["hi"]) else s["mean"]) - s["mean"])
            xs = np.arange(len(results["datasets"])) + j * width
            ax.bar(xs, mids, width, yerr=[los, his], capsize=3, label=name)
        ax.set_xticks(np.arange(len(results["datasets"])) + width * (len(names) - 1) / 2, results["datasets"])
        ax.set_title(f"{metric.upper()} (95% CI)")
    axes[0].legend(fontsize=8)
    ax = axes[2]
    methods = ["exact_ms", "faiss_flat_ms", "faiss_hnsw_ms", "eigen_route_ms"]
    rows = [(f"{d}\n{c}", r) for d in results["datasets"] for c, r in results["retrieval"][d].items()]
    for j, mth in enumerate(methods):
        ax.bar(np.arange(len(rows)) + j * 0.2, [r[mth] for _, r in rows], 0.2, label=mth.replace("_ms", ""))
    ax.set_xticks(np.arange(len(rows)) + 0.3, [n for n, _ in rows], fontsize=6)
    ax.set_yscale("log")
    ax.set_title("top-20 latency per query (ms, 1 thread, matrix model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_ci(c: dict, sign: str = "") -> str:
    return f"{c['mean']:{sign}.4f} [{c['lo']:{sign}.4f}, {c['hi']:{sign}.4f}]"


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# recsys benchmark ({'quick' if cfg['quick'] else 'full'})", "",
             f"Command: `{cfg['command']}`  ", f"Seeds {cfg['seeds']}, "
             + ("learning rate and epochs tuned per model and dataset (below)" if cfg.get("tune")
                else f"{cfg['epochs']} epochs at Adam lr 3e-3")
             + f", GRU hidden {cfg['hidden']}, matrix n={cfg['matrix_dim']}, one CPU thread ({cfg['machine']}).", "",
             "Trained models: mean over seeds with a 95% t-interval; popularity is deterministic, its interval is a "
             "bootstrap over test prefixes. Full ranking over all items, ties counted against the target.", "",
             "## Accuracy", "",
             "| dataset | test prefixes | model | params | Recall@20 | MRR@20 |", "|---|---|---|---|---|---|"]
    for d in results["datasets"]:
        for name, r in results["accuracy"][d].items():
            rc, mr = r["recall@20"], r["mrr@20"]
            lines.append(f"| {d} | {r['n_test']} | {name} | {r['params']:,} | {rc['mean']:.4f} "
                         f"[{rc['lo']:.4f}, {rc['hi']:.4f}] | {mr['mean']:.4f} [{mr['lo']:.4f}, {mr['hi']:.4f}] |")
    if cfg.get("tune"):
        t = cfg["tune"]
        lines += ["", "## Tuning", "",
                  f"Same budget for every trained model: {len(t['lrs'])} learning rates "
                  f"({', '.join(f'{x:g}' for x in t['lrs'])}) x {t['epochs']} epochs = "
                  f"{len(t['lrs']) * t['epochs']} training epochs, model seed {t['seed']} (not an evaluation seed), "
                  f"on the training split less {t['holdout_fraction']:.0%} of its sequences (at most "
                  f"{t['holdout_max_sequences']:,}), which are scored whole by Recall@20 after every epoch. The best "
                  "(learning rate, epochs) trains every seed on the whole training split; the test split is scored "
                  "once.", "",
                  "| dataset | model | chosen lr | chosen epochs | held-out Recall@20 | "
                  "held-out Recall@20 per lr (best epoch) | tuning s |", "|---|---|---|---|---|---|---|"]
        for d in results["datasets"]:
            for name, tr in results["tuning"][d].items():
                per_lr = ", ".join(f"{float(lr):g}: {max(c):.4f}" for lr, c in tr["curves"].items())
                lines.append(f"| {d} | {name} | {tr['best']['lr']:g} | {tr['best']['epochs']} | "
                             f"{tr['best']['recall@20']:.4f} | {per_lr} | {tr['seconds']:.0f} |")
    lines += ["", "Paired difference variant - vector (ce, same seed), mean and 95% t-interval:", "",
              "| dataset | variant | dRecall@20 | dMRR@20 |", "|---|---|---|---|"]
    for d in results["datasets"]:
        for name, r in results["paired_vs_vector"][d].items():
            a, b = r["recall@20"], r["mrr@20"]
            lines.append(f"| {d} | {name} | {a['mean']:+.4f} [{a['lo']:+.4f}, {a['hi']:+.4f}] | "
                         f"{b['mean']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}] |")
    if results.get("eigen_buckets"):
        lines += ["", "## Per bucket of positive eigenvalues of the session matrix", "",
                  "Each test prefix falls in the bucket of the number of positive eigenvalues of the plain matrix "
                  "model's session matrix A (same seed; an eigenvalue counts when it exceeds "
                  f"{cfg['eigen_rtol']:g} x the largest |eigenvalue|). Every model is scored on the same prefixes. "
                  "Mean over seeds, 95% t-interval; d = model - vector (ce), paired by seed.", "",
                  "| dataset | positive eigenvalues | prefixes (per seed) | model | Recall@20 | MRR@20 | dRecall@20 | "
                  "dMRR@20 |", "|---|---|---|---|---|---|---|---|"]
        for d in results["datasets"]:
            for row in results["eigen_buckets"][d]["rows"]:
                if not any(row["n_per_seed"]):
                    continue
                n = "/".join(str(x) for x in row["n_per_seed"])
                for name, r in row["models"].items():
                    p = row["paired_vs_vector"].get(name)
                    diffs = [fmt_ci(p[m], "+") if p else "-" for m in ("recall@20", "mrr@20")]
                    lines.append(f"| {d} | {row['bucket']} | {n} | {name} | {fmt_ci(r['recall@20'])} | "
                                 f"{fmt_ci(r['mrr@20'])} | {' | '.join(diffs)} |")
    lines += ["", "## Retrieval (matrix model, seed 0, top-20)", "",
              "Per-query latency is the median over single-query calls on one thread. HNSW: M=32, efConstruction 200, "
              "efSearch 128 (and 512). 'flat == exact' / 'eigen == exact': fraction of queries whose top-20 ids equal "
              "the exact top-20 in order (in brackets: equal up to float ties). 'eigen scored': median share of the "
              "catalogue the eigenvector route had to score exactly before its bound proved the top-20.", "",
              "| dataset | catalogue | items | dim phi | exact ms | faiss flat ms | HNSW ms (ef 512) | eigen ms | "
              "flat == exact | HNSW recall (ef 512) | eigen == exact | eigen scored |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in results["datasets"]:
        for c, r in results["retrieval"][d].items():
            lines.append(f"| {d} | {c} | {r['items']:,} | {r['feature_dim']} | {r['exact_ms']:.3f} | "
                         f"{r['faiss_flat_ms']:.3f} | {r['faiss_hnsw_ms']:.3f} ({r['faiss_hnsw_ef512_ms']:.3f}) | "
                         f"{r['eigen_route_ms']:.3f} | "
                         f"{r['faiss_flat_identical']:.3f} ({r['faiss_flat_equal_up_to_ties']:.3f} up to ties) | "
                         f"{r['faiss_hnsw_recall']:.3f} ({r['faiss_hnsw_ef512_recall']:.3f}) | "
                         f"{r['eigen_identical']:.3f} "
                         f"({r['eigen_equal_up_to_ties']:.3f}) | {r['eigen_candidates_fraction']:.1%} |")
    lines += ["", "Vector model on its trained catalogue (item features e, dimension n_v):", "",
              "| dataset | items | dim | exact ms | faiss flat ms | flat == exact (up to ties) |",
              "|---|---|---|---|---|---|"]
    for d in results["datasets"]:
        r = results["retrieval_vector"][d]
        lines.append(f"| {d} | {r['items']:,} | {r['feature_dim']} | {r['exact_ms']:.3f} | {r['faiss_flat_ms']:.3f} | "
                     f"{r['faiss_flat_equal_up_to_ties']:.3f} |")
    if results.get("retrieval_comirec"):
        lines += ["", f"ComiRec-SA model (K = {cfg['interests']} interests; same GRU trunk, candidate size chosen for "
                  "the matrix model's parameter count) on its trained catalogue: exact scores max_k u_k^T e; faiss "
                  "flat searches once per interest and keeps each item's best score.", "",
                  "| dataset | items | dim | interests | exact ms | faiss flat ms | flat == exact (up to ties) |",
                  "|---|---|---|---|---|---|---|"]
        for d, r in results["retrieval_comirec"].items():
            lines.append(f"| {d} | {r['items']:,} | {r['feature_dim']} | {r['interests']} | {r['exact_ms']:.3f} | "
                         f"{r['faiss_flat_ms']:.3f} | {r['faiss_flat_equal_up_to_ties']:.3f} |")
    if "interests" in results:
        it = results["interests"]
        lines += ["", "## Interests (MovieLens-100K, matrix model, seed 0)", "",
                  f"Over {it['sessions']} test users, median {it['interests_per_session_median']:.0f} positive "
                  "eigenvectors among the top 3 asked for. Mean pairwise genre Jaccard of the 10 items each interest "
                  f"retrieves: {it['per_interest_jaccard']:.3f}; of the top-10 of the whole score: "
                  f"{it['whole_score_top_jaccard']:.3f}; of random 10-item sets: {it['random_jaccard']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--seeds", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--matrix-dim", type=int, default=16)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--loss", default="", metavar="bpr-max,top1-max",
                   help="also train the --loss-models with these sampled losses (GRU4Rec), same seeds")
    p.add_argument("--loss-models", default="vector", metavar="vector,matrix,comirec")
    p.add_argument("--comirec", action="store_true",
                   help="also train the ComiRec-SA multi-interest model (same trunk, seeds and budget)")
    p.add_argument("--interests", type=int, default=DEFAULT_INTERESTS, metavar="K",
                   help="interests of the ComiRec model")
    p.add_argument("--negatives", type=int, default=DEFAULT_NEGATIVES,
                   help="popularity-sampled negatives per batch for the sampled losses")
    p.add_argument("--sample-alpha", type=float, default=0.5)
    p.add_argument("--bpreg", type=float, default=1.0)
    p.add_argument("--eigen-buckets", default="1,2,3,4,6,8", metavar="E1,E2,...",
                   help="lower edges of the buckets of positive eigenvalues (the last bucket is open)")
    p.add_argument("--eigen-rtol", type=float, default=1e-3,
                   help="an eigenvalue is positive above this times the largest |eigenvalue|")
    p.add_argument("--tune", action="store_true",
                   help="choose each model's learning rate and epochs on held-out training sessions first")
    p.add_argument("--tune-lrs", default=",".join(map(repr, TUNE_LRS)), metavar="LR1,LR2,...")
    p.add_argument("--tune-epochs", type=int, default=10, help="epochs per learning rate when tuning")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    losses = [x for x in args.loss.split(",") if x]
    loss_models = [x for x in args.loss_models.split(",") if x]
    try:
        edges = tuple(int(x) for x in args.eigen_buckets.split(","))
        metrics_by_bucket(np.zeros(0), {}, edges)
    except ValueError:
        p.error(f"--eigen-buckets: expected comma-separated integers, got {args.eigen_buckets!r}")
    except AloeError as exc:
        p.error(f"--eigen-buckets: {exc}")
    if not args.eigen_rtol >= 0:
        p.error(f"--eigen-rtol must be at least 0, got {args.eigen_rtol}")
    for loss in losses:
        if loss == "ce" or loss not in LOSSES:
            p.error(f"--loss: unknown sampled loss {loss!r}; choose from bpr-max, top1-max")
    for kind in loss_models:
        if kind not in ("vector", "matrix", "comirec"):
            p.error(f"--loss-models: unknown model {kind!r}; choose from vector, matrix, comirec")
    if args.interests < 1:
        p.error(f"--interests must be at least 1, got {args.interests}")
    try:
        tune_lrs = tuple(float(x) for x in args.tune_lrs.split(",") if x)
    except ValueError:
        p.error(f"--tune-lrs: expected comma-separated numbers, got {args.tune_lrs!r}")
    if not tune_lrs or any(not lr > 0 for lr in tune_lrs) or args.tune_epochs < 1:
        p.error("--tune-lrs must list positive learning rates and --tune-epochs be at least 1")
    try:
        for loss in losses:
            TrainConfig(loss=loss, negatives=args.negatives, sample_alpha=args.sample_alpha, bpreg=args.bpreg).check()
    except AloeError as exc:
        p.error(str(exc))
    variants = VARIANTS + ([("comirec", False, "ce")] if args.comirec else []) + [
        (kind, False, loss) for loss in losses for kind in loss_models]
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    seeds = args.seeds or (3 if args.quick else 5)
    epochs = args.epochs or (3 if args.quick else 10)
    n_queries, big = (60, 20_000) if args.quick else (200, 100_000)
    datasets = args.datasets.split(",")
    log = sys.stderr
    t_start = time.perf_counter()
    results: dict = {"config": {"quick": args.quick, "seeds": seeds, "epochs": epochs, "hidden": args.hidden,
                                "matrix_dim": args.matrix_dim, "losses": losses, "loss_models": loss_models,
                                "comirec": args.comirec, "interests": args.interests,
                                "negatives": args.negatives, "sample_alpha": args.sample_alpha, "bpreg": args.bpreg,
                                "eigen_buckets": list(edges), "eigen_rtol": args.eigen_rtol,
                                "tune": {"lrs": list(tune_lrs), "epochs": args.tune_epochs, "seed": TUNE_SEED,
                                         "holdout_fraction": 0.1, "holdout_max_sequences": 5000}
                                if args.tune else None,
                                "command": "python benchmarks/recsys.py "
                                + " ".join(argv if argv is not None else sys.argv[1:]),
                                "machine": f"{platform.machine()}, torch {torch.__version__}, "
                                           f"faiss {faiss.__version__}"},
                     "datasets": datasets, "accuracy": {}, "paired_vs_vector": {}, "retrieval": {},
                     "retrieval_vector": {}, "retrieval_comirec": {}, "eigen_buckets": {}, "runs": [],
                     "tuning": {}}
    for d in datasets:
        results["accuracy"][d], per_seed = {}, {}
        results["tuning"][d] = {}
        seed0_matrix = None
        for kind, aug, loss in variants:
            name = label(kind, aug, loss)
            runs = []
            options = dict(augment=aug, matrix_dim=args.matrix_dim, hidden=args.hidden, loss=loss,
                           negatives=0 if loss == "ce" else args.negatives, sample_alpha=args.sample_alpha,
                           bpreg=args.bpreg, interests=args.interests)
            lr, n_epochs = TrainConfig.lr, epochs
            if args.tune and kind != "pop":
                tr = tune(d, kind, lrs=tune_lrs, max_epochs=args.tune_epochs, **options)
                results["tuning"][d][name] = tr
                lr, n_epochs = tr["best"]["lr"], tr["best"]["epochs"]
                print(f"{d} {name} tuned: lr {lr:g}, {n_epochs} epochs (held-out recall@20 "
                      f"{tr['best']['recall@20']:.4f}, {tr['seconds']:.0f} s)", file=log, flush=True)
            for seed in ([0] if kind == "pop" else range(seeds)):
                r = fit_and_evaluate(d, kind, seed=seed, epochs=n_epochs, lr=lr, save=False, **options)
                print(f"{d} {name} seed {seed}: recall@20 {r['recall@20']:.4f} mrr@20 {r['mrr@20']:.4f} "
                      f"({r['train_seconds']:.1f} s)", file=log, flush=True)
                runs.append(r)
                results["runs"].append({k: r[k] for k in ("data", "model", "augment", "loss", "seed", "recall@20",
                                                          "mrr@20", "params", "train_seconds", "losses", "n_test")})
                if kind == "matrix" and not aug and loss == "ce" and seed == 0:
                    seed0_matrix = r
            per_seed[name] = runs
            if kind == "pop":
                rc, mr = bootstrap_ci(runs[0]["ranks"], recall_at), bootstrap_ci(runs[0]["ranks"], mrr_at)
            else:
                rc, mr = t_ci([r["recall@20"] for r in runs]), t_ci([r["mrr@20"] for r in runs])
            results["accuracy"][d][name] = {
                "recall@20": dict(zip(("mean", "lo", "hi"), rc)), "mrr@20": dict(zip(("mean", "lo", "hi"), mr)),
                "params": runs[0]["params"], "n_test": runs[0]["n_test"], "seeds": len(runs),
                "train_seconds_median": float(np.median([r["train_seconds"] for r in runs])),
                "lr": None if kind == "pop" else lr, "epochs": 0 if kind == "pop" else n_epochs}
        results["paired_vs_vector"][d] = {
            name: {m: dict(zip(("mean", "lo", "hi"), t_ci([a[m] - b[m] for a, b in zip(per_seed[name],
                                                                                       per_seed["vector"])])))
                   for m in ("recall@20", "mrr@20")}
            for name in per_seed if name not in ("pop", "vector")}
        results["eigen_buckets"][d] = eigen_buckets(per_seed, edges, args.eigen_rtol)
        print(f"{d}: retrieval", file=log, flush=True)
        results["retrieval"][d] = retrieval_bench(seed0_matrix["model_obj"], seed0_matrix["data_obj"], n_queries,
                                                  big)
        results["retrieval_vector"][d] = vector_retrieval(per_seed["vector"][0]["model_obj"],
                                                          per_seed["vector"][0]["data_obj"], n_queries)
        if "comirec" in per_seed:
            results["retrieval_comirec"][d] = vector_retrieval(per_seed["comirec"][0]["model_obj"],
                                                               per_seed["comirec"][0]["data_obj"], n_queries)
        if d == "ml100k":
            results["interests"] = interest_coherence(seed0_matrix["model_obj"], seed0_matrix["data_obj"])
    results["seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "recsys_quick" if args.quick else "recsys"
    atomic_write_json(args.out / f"{stem}.json", results)
    atomic_write_text(args.out / f"{stem}.md", markdown(results))
    plot(results, args.out / f"{stem}.png")
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
