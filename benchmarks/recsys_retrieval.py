"""Match-stage retrieval at scale: top-20 of the matrix model's score e^T A e over a catalogue of 10^6 items.

Queries: the matrix-embedding model (GRU, n = 16, as in benchmarks/recsys.py) is trained on YooChoose for a few
epochs, and its session matrices A (as z, the n(n+1)/2 upper-triangle entries) on randomly drawn real test
prefixes are the queries. Catalogue: ``--items`` synthetic item vectors e in R^16 drawn from the trained ones:
``mixture`` (default) picks a trained item uniformly and adds Gaussian noise of ``--jitter`` times the per-dimension
standard deviation of the trained vectors (clusters around the real items); ``gaussian`` draws from one Gaussian
fitted to the trained vectors (the catalogue of benchmarks/recsys.py). Item features phi(e) in R^136, float32.

Routes, measured side by side in one run on the same queries (each repeat times every route once, in turn):

- exact: brute force over phi(e) (torch matmul + top-k, chunks of 64 queries); the reference for recall. It is
  checked against the quadratic form e^T A e computed directly in float64 on a subset of the queries.
- faiss flat over phi(e) (exact inner-product search);
- faiss IVF-Flat over phi(e): ``--nlist`` k-means cells trained on 65,536 items, nprobe in ``--nprobe``;
- faiss HNSW over phi(e) (``--hnsw``; on by default only in ``--quick``: its build is the slow part);
- eigenvector route, approximate: the 4 largest positive eigenvalues of A send +u and -u to an index over e
  (IVF-Flat, 1,024 cells, nprobe 16; or flat) for ``--per-list`` items each, the union re-ranked exactly;
- eigenvector route, exact (the pruning bound of aloe.recsys.retrieval.eigen_topk over a flat index over e), one
  query at a time on ``--eigen-exact-queries`` queries.

Batched routes get the queries in batches of ``--batch``. Queries/s is the median over ``--repeats`` repeats.

    python benchmarks/recsys_retrieval.py            # 10^6 items, 500 queries, 3 repeats, 2 threads
    python benchmarks/recsys_retrieval.py --quick    # 10^5 items, with HNSW

Writes benchmarks/results/recsys_retrieval[_quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _threads_from_argv(default: int = 2) -> int:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch/faiss load
    os.environ[_var] = str(_threads_from_argv())

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.recsys.retrieval import (  # noqa: E402
    MipsIndex,
    eigen_candidates_topk,
    eigen_topk,
    exact_topk_chunked,
    recall_vs_exact,
)
from aloe.recsys.symmetric import phi, sym_from_z  # noqa: E402
from aloe.recsys.train import fit_and_evaluate, test_queries  # noqa: E402

K = 20


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def trained_model(data_name: str, epochs: int, seed: int):
    """The matrix model (n = 16, as in benchmarks/recsys.py) trained on ``data_name``; kept under
    ``<cache>/recsys/retrieval-bench/`` so that a rerun does not train again."""
    from aloe.assets.cache import atomic_directory, cache_root
    from aloe.recsys.data import load_dataset
    from aloe.recsys.models import ModelConfig, SessionModel

    folder = cache_root() / "recsys" / "retrieval-bench" / f"{data_name}-matrix-e{epochs}-seed{seed}"
    if (folder / "result.json").is_file():
        fit = json.loads((folder / "result.json").read_text())
        model = SessionModel(ModelConfig(**fit["config"]))
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        fit["cached"] = str(folder)
        return model.eval(), load_dataset(data_name), fit
    fit = fit_and_evaluate(data_name, "matrix", seed=seed, epochs=epochs, save=False)
    keep = {k: fit[k] for k in ("recall@20", "mrr@20", "train_seconds", "config", "epochs", "seed")}
    with atomic_directory(folder, overwrite=True) as tmp:
        torch.save(fit["model_obj"].state_dict(), tmp / "model.pt")
        atomic_write_json(tmp / "result.json", keep)
    return fit["model_obj"].eval(), fit["data_obj"], keep


def make_catalogue(base: np.ndarray, items: int, kind: str, jitter: float, seed: int,
                   chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(items, n) float32 item vectors and (items, n(n+1)/2) float32 features phi(e), generated in chunks."""
    rng = np.random.default_rng(seed)
    n = base.shape[1]
    std = base.std(0)
    mean, cov = base.mean(0), np.cov(base, rowvar=False)
    e = np.empty((items, n), np.float32)
    feats = np.empty((items, n * (n + 1) // 2), np.float32)
    for s in range(0, items, chunk):
        m = min(chunk, items - s)
        if kind == "mixture":
            x = base[rng.integers(0, len(base), m)] + jitter * std * rng.standard_normal((m, n))
        else:
            x = rng.multivariate_normal(mean, cov, size=m)
        e[s:s + m] = x
        feats[s:s + m] = phi(torch.from_numpy(e[s:s + m])).numpy()
    return e, feats


def float64_reference(mats: np.ndarray, e: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    """Top-k ids of e^T A e computed directly in float64 (one query at a time, items in chunks)."""
    out = []
    for a in mats:
        scores = np.concatenate([np.einsum("vi,ij,vj->v", x, a, x) for x in
                                 (e[s:s + chunk].astype(np.float64) for s in range(0, len(e), chunk))])
        top = np.argpartition(-scores, K)[:K]
        out.append(top[np.lexsort((top, -scores[top]))])
    return np.stack(out)


def batched(fn, queries: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(queries[s:s + batch]) for s in range(0, len(queries), batch)])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in result["routes"]:
        ax.scatter(r["recall@20"], r["queries_per_second"], s=40)
        ax.annotate(r["route"], (r["recall@20"], r["queries_per_second"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("recall@20 against exact search")
    ax.set_ylabel(f"queries/s (median of {result['config']['repeats']}, {result['config']['threads']} threads)")
    ax.set_title(f"top-20 of e^T A e over {result['config']['items']:,} items ({result['config']['catalogue']})")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    c = result["config"]
    m = result["model"]
    lines = [f"# Retrieval at scale ({'quick' if c['quick'] else 'full'})", "",
             f"Command: `{c['command']}`  ",
             f"{c['machine']}; {c['threads']} threads for torch, numpy and faiss; {result['seconds']:.0f} s wall, "
             f"peak RSS {result['peak_rss_gb']:.2f} GB.", "",
             f"Queries: {c['queries']} session matrices of the matrix model (n = {m['matrix_dim']}, "
             f"{m['epochs']} epochs on {m['data']}, its own Recall@20 {m['recall@20']:.4f}) on random real test "
             f"prefixes. Catalogue: {c['items']:,} items, generator `{c['catalogue']}`"
             + (f" (a trained item plus {c['jitter']} x its per-dimension std of Gaussian noise)"
                if c["catalogue"] == "mixture" else " (one Gaussian fitted to the trained item vectors)")
             + f", phi(e) of dimension {result['feature_dim']}, float32.", "",
             f"Reference: exact brute force in float32. On {result['float64_check']['queries']} queries it returns "
             f"the float64 top-20 of e^T A e with recall {result['float64_check']['recall@20']:.4f}.", "",
             f"Batched routes get batches of {c['batch']} queries; the exact eigenvector route runs one query at a "
             f"time on {c['eigen_exact_queries']} queries. Queries/s: median over {c['repeats']} repeats, each "
             "repeat timing every route in turn.", "",
             "| route | index | recall@20 | queries/s | vs exact | items scored per query | build s |",
             "|---|---|---|---|---|---|---|"]
    ex = next(r for r in result["routes"] if r["route"] == "exact")
    for r in result["routes"]:
        scored, build_s = r.get("items_scored_median"), r.get("build_seconds")
        scored_txt = "-" if scored is None else f"{scored:,.0f}"
        build_txt = "-" if build_s is None else f"{build_s:.1f}"
        lines.append(f"| {r['route']} | {r['index']} | {r['recall@20']:.4f} | {r['queries_per_second']:.1f} | "
                     f"{r['queries_per_second'] / ex['queries_per_second']:.2f}x | {scored_txt} | {build_txt} |")
    lines += ["", f"Positive eigenvalues per session matrix: median {result['positive_eigenvalues_median']:.0f} of "
              f"{m['matrix_dim']}; the largest carries a median {result['top_eigenvalue_share_median']:.0%} of the "
              "positive spectrum.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10^5 items, 200 queries, HNSW included")
    p.add_argument("--items", type=int)
    p.add_argument("--queries", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--data", default="yoochoose")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--catalogue", choices=("mixture", "gaussian"), default="mixture")
    p.add_argument("--jitter", type=float, default=0.5)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", default="8,32,128")
    p.add_argument("--per-list", default="100,1000")
    p.add_argument("--eigen-exact-queries", type=int, default=10)
    p.add_argument("--hnsw", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    items = args.items or (100_000 if args.quick else 1_000_000)
    n_queries = args.queries or (200 if args.quick else 500)
    use_hnsw = args.quick if args.hnsw is None else args.hnsw
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    log = sys.stderr
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s, {rss_gb():.2f} GB] {msg}", file=log, flush=True)

    # queries: the trained matrix model's session matrices on real test prefixes
    model, data, fit = trained_model(args.data, args.epochs, args.seed)
    say(f"matrix model on {args.data}: recall@20 {fit['recall@20']:.4f} (trained in {fit['train_seconds']:.0f} s"
        f"{', loaded from ' + fit['cached'] if fit.get('cached') else ''})")
    with torch.no_grad():
        q_all, _ = test_queries(model, data)
        base = model.item_vectors().double().numpy()
    rng = np.random.default_rng(args.seed)
    zq = q_all[rng.choice(len(q_all), size=min(n_queries, len(q_all)), replace=False)].numpy().astype(np.float32)
    n = base.shape[1]
    mats = sym_from_z(torch.from_numpy(zq).double(), n).numpy()
    lam = np.linalg.eigvalsh(mats)
    pos = np.where(lam > 0, lam, 0.0)
    top_share = pos.max(1) / np.maximum(pos.sum(1), 1e-300)

    e, feats = make_catalogue(base, items, args.catalogue, args.jitter, args.seed + 1)
    say(f"catalogue {items:,} x {n} ({args.catalogue}), phi {feats.shape[1]}")

    builds = {}

    def build(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        builds[name] = time.perf_counter() - t0
        say(f"built {name} in {builds[name]:.1f} s")
        return out

    flat = build("flat(phi)", lambda: MipsIndex(feats, "flat"))
    ivf = build(f"ivf{args.nlist}(phi)", lambda: MipsIndex(feats, "ivf", nlist=args.nlist, seed=args.seed))
    hnsw = build("hnsw(phi)", lambda: MipsIndex(feats, "hnsw", hnsw_m=16, ef_construction=40)) if use_hnsw else None
    e_flat = build("flat(e)", lambda: MipsIndex(e, "flat"))
    e_nlist = min(1024, items // 40)
    e_ivf = build("ivf(e)", lambda: MipsIndex(e, "ivf", nlist=e_nlist, nprobe=16, seed=args.seed))

    routes: list[tuple[str, str, object, np.ndarray | None, float | None]] = []  # name, index, fn, queries, build

    def exact_fn(q):
        return exact_topk_chunked(q, feats, K)[1]

    routes.append(("exact", "brute force over phi(e)", exact_fn, None, None))
    routes.append(("faiss flat", "IndexFlatIP over phi(e)", lambda q: flat.search(q, K)[1], None,
                   builds["flat(phi)"]))
    for npb in [int(v) for v in args.nprobe.split(",")]:
        def ivf_fn(q, npb=npb):
            ivf.set_search_effort(npb)
            return ivf.search(q, K)[1]
        routes.append((f"faiss IVF nprobe {npb}", f"IVFFlat({args.nlist}) over phi(e)", ivf_fn, None,
                       builds[f"ivf{args.nlist}(phi)"]))
    if hnsw is not None:
        for ef in (64, 256):
            def hnsw_fn(q, ef=ef):
                hnsw.set_search_effort(ef)
                return hnsw.search(q, K)[1]
            routes.append((f"faiss HNSW efSearch {ef}", "HNSWFlat(M 16, efConstruction 40) over phi(e)", hnsw_fn,
                           None, builds["hnsw(phi)"]))
    scored: dict[str, list[float]] = {}
    for per in [int(v) for v in args.per_list.split(",")]:
        for tag, idx in (("IVF(e)", e_ivf), ("flat(e)", e_flat)):
            name = f"eigen approx, {per}/list, {tag}"

            def eig_fn(q, idx=idx, per=per, name=name):
                a = sym_from_z(torch.from_numpy(q).double(), n).numpy()
                _, ids, cand = eigen_candidates_topk(a, e, K, idx, per_list=per, eigenvectors=4)
                scored.setdefault(name, []).extend(cand.tolist())
                return ids
            index_desc = (f"IVFFlat({e_nlist}, nprobe 16)" if tag == "IVF(e)" else "IndexFlatIP") \
                + " over e, 4 eigenvectors"
            routes.append((name, index_desc, eig_fn, None, builds["ivf(e)" if tag == "IVF(e)" else "flat(e)"]))
    eq = zq[: args.eigen_exact_queries]

    def eig_exact_fn(q):
        out = []
        for z in q:
            a = sym_from_z(torch.from_numpy(z).double(), n).numpy()
            r = eigen_topk(a, e, K, e_flat)
            scored.setdefault("eigen exact", []).append(r.candidates)
            out.append(r.ids)
        return np.stack(out)
    routes.append(("eigen exact", "IndexFlatIP over e + pruning bound", eig_exact_fn, eq, builds["flat(e)"]))

    times: dict[str, list[float]] = {r[0]: [] for r in routes}
    results: dict[str, np.ndarray] = {}
    for rep in range(args.repeats):
        for name, _, fn, qsub, _ in routes:
            q = zq if qsub is None else qsub
            bs = args.batch if name != "eigen exact" else 1
            t0 = time.perf_counter()
            ids = batched(fn, q, bs)
            times[name].append((time.perf_counter() - t0) / len(q))
            if rep == 0:
                results[name] = ids
            say(f"repeat {rep + 1}/{args.repeats} {name}: {1 / times[name][-1]:.1f} q/s")
    ref = results["exact"]
    check_q = min(20, len(zq))
    ref64 = float64_reference(mats[:check_q], e)
    out_routes = []
    for name, index_desc, _, qsub, build_s in routes:
        nq = len(zq) if qsub is None else len(qsub)
        row = {"route": name, "index": index_desc, "queries": nq,
               "recall@20": recall_vs_exact(results[name], ref[:nq]),
               "queries_per_second": float(1 / np.median(times[name])),
               "seconds_per_query_repeats": times[name], "build_seconds": build_s}
        if name in scored:
            row["items_scored_median"] = float(np.median(scored[name]))
        elif name in ("exact", "faiss flat"):
            row["items_scored_median"] = float(items)
        out_routes.append(row)
    result = {
        "config": {"quick": args.quick, "items": items, "queries": len(zq), "repeats": args.repeats,
                   "threads": args.threads, "batch": args.batch, "catalogue": args.catalogue, "jitter": args.jitter,
                   "nlist": args.nlist, "eigen_exact_queries": len(eq), "seed": args.seed,
                   "command": "python benchmarks/recsys_retrieval.py "
                              + " ".join(argv if argv is not None else sys.argv[1:]),
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                              f"faiss {faiss.__version__}, numpy {np.__version__}"},
        "model": {"data": args.data, "epochs": args.epochs, "matrix_dim": n, "recall@20": fit["recall@20"],
                  "train_seconds": fit["train_seconds"]},
        "feature_dim": int(feats.shape[1]),
        "float64_check": {"queries": check_q, "recall@20": recall_vs_exact(ref[:check_q], ref64)},
        "positive_eigenvalues_median": float(np.median((lam > 0).sum(1))),
        "top_eigenvalue_share_median": float(np.median(top_share)),
        "routes": out_routes, "build_seconds": builds,
    }
    result["seconds"] = time.perf_counter() - t_start
    result["peak_rss_gb"] = rss_gb()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "recsys_retrieval_quick" if args.quick else "recsys_retrieval"
    atomic_write_json(args.out / f"{stem}.json", result)
    atomic_write_text(args.out / f"{stem}.md", markdown(result))
    plot(result, args.out / f"{stem}.png")
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
