"""``aloe recsys``: train and evaluate session recommenders; show the interests of a session."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aloe import AloeError
from aloe.argtypes import nonnegative_int, positive_float, positive_int
from aloe.recsys.data import DATASETS
from aloe.recsys.models import DEFAULT_INTERESTS, MODELS, check_interests


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise AloeError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def _train(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.recsys.train import DEFAULT_NEGATIVES, fit_and_evaluate

    _check(args.data, DATASETS, "dataset")
    _check(args.model, MODELS, "model")
    if args.epochs < 1:
        raise AloeError("--epochs must be at least 1")
    if args.interests is not None:
        check_interests(args.interests)
        if args.model != "comirec":
            raise AloeError("--interests applies to the comirec model")
    negatives = args.negatives if args.negatives is not None else 0 if args.loss == "ce" else DEFAULT_NEGATIVES
    r = fit_and_evaluate(args.data, args.model, augment=args.augment, seed=args.seed, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, matrix_dim=args.matrix_dim, hidden=args.hidden,
                         cache=args.cache, progress=not args.json and sys.stderr.isatty(), loss=args.loss,
                         negatives=negatives, sample_alpha=args.sample_alpha, bpreg=args.bpreg,
                         interests=DEFAULT_INTERESTS if args.interests is None else args.interests)
    for key in ("model_obj", "data_obj", "ranks", "losses"):
        r.pop(key)
    if args.json:
        print_json(r)
    else:
        name = r["model"] + ("+[e;1]" if r["augment"] else "")
        name += f" (K={r['config']['interests']})" if r["model"] == "comirec" else ""
        name += f" ({r['loss']})" if r["loss"] not in (None, "ce") else ""
        print(f"{args.data} {name}: recall@20 {r['recall@20']:.4f}  mrr@20 {r['mrr@20']:.4f}  "
              f"params {r['params']:,}  ({r['n_test']} test prefixes, {r['train_seconds']:.1f} s training)")
    return 0


def _interests(args: argparse.Namespace) -> int:
    import torch

    from aloe.cli import print_json
    from aloe.recsys.interests import session_interests
    from aloe.recsys.train import load_trained

    _check(args.data, DATASETS, "dataset")
    model, data = load_trained(args.data, "matrix", augment=args.augment, seed=args.seed, cache=args.cache)
    seqs = data.test_sequences()
    if not 0 <= args.session < len(seqs):
        raise AloeError(f"--session must be in 0..{len(seqs) - 1} ({len(seqs)} test sequences)")
    s = seqs[args.session]
    with torch.no_grad():
        z = model.queries(torch.from_numpy(s[None, :]))[0, -1]
        interests = session_interests(model.session_matrix(z), model.item_vectors(), args.top, args.items)
    from aloe.recsys.data import item_titles

    raw, titles = data.item_raw, item_titles(args.data)
    out = {"data": args.data, "session": args.session, "clicks": raw[s].tolist(),
           "interests": [{"eigenvalue": it.eigenvalue, "share": it.share, "items": raw[it.items].tolist()}
                         for it in interests]}
    if titles:
        out["click_titles"] = [titles.get(int(i), "") for i in out["clicks"]]
        for it in out["interests"]:
            it["titles"] = [titles.get(int(i), "") for i in it["items"]]
    if args.json:
        print_json(out)
    else:
        print(f"session {args.session}: clicked items {out.get('click_titles', out['clicks'])}")
        for j, it in enumerate(out["interests"]):
            print(f"interest {j}: eigenvalue {it['eigenvalue']:.3f} ({it['share']:.0%}) -> items "
                  f"{it.get('titles', it['items'])}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recsys", help="session recommendation with a matrix (quadratic-form) session embedding")
    g = p.add_subparsers(dest="recsys_command", metavar="ACTION")
    g.required = True

    t = g.add_parser("train", help="train a model on a dataset and report Recall@20 / MRR@20")
    t.add_argument("--data", required=True, metavar="|".join(DATASETS))
    t.add_argument("--model", required=True, metavar="|".join(MODELS))
    t.add_argument("--augment", action="store_true", help="matrix model over [e; 1] (contains the vector model)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=positive_int, default=64)
    t.add_argument("--lr", type=positive_float, default=3e-3)
    t.add_argument("--matrix-dim", type=positive_int, default=16, help="n of the n x n session matrix")
    t.add_argument("--hidden", type=positive_int, default=100, help="GRU state size")
    t.add_argument("--interests", type=positive_int, metavar="K",
                   help=f"interests per session of the comirec model (default {DEFAULT_INTERESTS}); its candidate "
                        "size is set to match the matrix model's parameter count")
    t.add_argument("--loss", default="ce", metavar="ce|bpr-max|top1-max",
                   help="full softmax (default) or GRU4Rec's sampled BPR-max / TOP1-max")
    t.add_argument("--negatives", type=int, metavar="N",
                   help="popularity-sampled negatives per batch beside the in-batch ones (sampled losses; default "
                        "2048)")
    t.add_argument("--sample-alpha", type=float, default=0.5,
                   help="negatives drawn with probability proportional to count^alpha (0 uniform, 1 popularity)")
    t.add_argument("--bpreg", type=float, default=1.0, help="BPR-max score regularisation")
    t.add_argument("--cache", type=Path, help="cache folder (default $ALOE_CACHE or ~/.cache/aloe)")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=_train)

    i = g.add_parser("interests", help="positive eigenvectors of a test session's matrix and the items each retrieves")
    i.add_argument("--data", required=True, metavar="|".join(DATASETS))
    i.add_argument("--session", type=nonnegative_int, default=0, help="index of the test sequence")
    i.add_argument("--augment", action="store_true")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--top", type=positive_int, default=3, help="how many interests")
    i.add_argument("--items", type=positive_int, default=10, help="items per interest")
    i.add_argument("--cache", type=Path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_interests)
