"""``aloe labelmap``: train any method on any task within an output-parameter budget; inspect label maps."""

from __future__ import annotations

import argparse
from pathlib import Path

from aloe import AloeError
from aloe.argtypes import nonnegative_int, positive_float, positive_int


def _int(text: str, what: str, minimum: int = 1) -> int:
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise AloeError(f"{what} must be a number, got {text!r}") from None
    if value != int(value) or value < minimum:
        raise AloeError(f"{what} must be an integer >= {minimum}, got {text!r}")
    return int(value)


def _task_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {"seed": args.seed}
    if args.task in ("words", "pairs"):
        kw["max_train"] = args.train_examples
        kw["max_test"] = args.test_examples
    elif args.task == "synthetic":
        if args.train_examples:
            kw["n_train"] = args.train_examples
        if args.test_examples:
            kw["n_test"] = args.test_examples
    elif args.task == "chars":
        if args.train_examples:
            raise AloeError("the chars task takes --renders-per-font instead of --train-examples")
        kw["train_per_font"] = args.renders_per_font
    return kw


def _train(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.labelmap.harness import METHODS, train
    from aloe.labelmap.tasks import TASKS, make_task

    if args.task not in TASKS:
        raise AloeError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.method not in METHODS:
        raise AloeError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    budget = None if args.budget is None else _int(args.budget, "--budget")
    classes = None if args.classes is None else _int(args.classes, "--classes", 2)
    for name in ("train_examples", "test_examples"):
        if getattr(args, name) is not None:
            setattr(args, name, _int(getattr(args, name), f"--{name.replace('_', '-')}"))
    from aloe.labelmap.harness import check_budget
    from aloe.labelmap.tasks import DEFAULT_CLASSES, TASK_WIDTH

    check_budget(args.method, classes or DEFAULT_CLASSES[args.task], TASK_WIDTH, budget, args.order)
    if args.code not in ("random", "hadamard"):
        raise AloeError(f"unknown ECOC code {args.code!r}; choose random or hadamard")
    if args.out is not None and args.out.is_dir():
        raise AloeError(f"--out {args.out} is a directory")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    task = make_task(args.task, classes, **_task_kwargs(args))
    result = train(task, args.method, budget, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   seed=args.seed, order=args.order, code=args.code, independent=args.independent,
                   progress=not args.json)
    if args.out is not None:
        from aloe.assets.cache import atomic_write_json

        atomic_write_json(args.out, result)
    if args.json:
        print_json(result)
    else:
        top5 = "-" if result["top5"] is None else f"{result['top5']:.4f}"
        print(f"{result['task']} {result['method']}: top1 {result['top1']:.4f}  top5 {top5}  "
              f"output params {result['output_params']:,} (one-hot {result['onehot_output_params']:,})  "
              f"N={result['n_classes']:,}  {result['train_examples_per_second']:.0f} train ex/s")
    return 0


def _map(args: argparse.Namespace) -> int:
    from aloe.cli import print_json
    from aloe.labelmap.maps import choose_moduli, information_theoretic_map, mach_map, map_report, number_theoretic_map

    if args.kind not in ("nt", "it", "mach"):
        raise AloeError(f"unknown map kind {args.kind!r}; choose one of nt, it, mach")
    n = _int(args.classes, "--classes", 2)
    units = _int(args.units, "--units", 2)
    moduli = choose_moduli(n, units, args.order)
    if args.kind == "nt":
        lmap = number_theoretic_map(n, moduli)
    elif args.kind == "it":
        lmap = information_theoretic_map(n, moduli, seed=args.seed)
    else:
        b = max(2, round(sum(moduli) / len(moduli)))
        lmap = mach_map(n, b, units // b, seed=args.seed)
    rep = map_report(lmap)
    rep["info"] = lmap.info
    if not args.full:
        rep.pop("mutual_information")
    if args.json:
        print_json(rep)
    else:
        sep = rep["min_separation"]
        sep = sep if sep is not None else f"<= {rep['min_separation_upper_bound']}"
        print(f"{rep['kind']} map: N={n:,}, {rep['n_heads']} heads {rep['sizes']} ({rep['n_units']} units)\n"
              f"  pairs separated by: min {sep}, mean {rep['mean_separation']:.3f} heads\n"
              f"  balance H/log k: min {min(rep['balance']):.4f}; pairwise MI (nats): max "
              f"{rep['max_mutual_information']:.4f}, mean {rep['mean_mutual_information']:.5f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labelmap", help="huge N-class classification with small multi-class heads")
    g = p.add_subparsers(dest="labelmap_command", metavar="ACTION")
    g.required = True

    t = g.add_parser("train", help="train one method on one task and report top-1/top-5 and output parameters")
    t.add_argument("--task", required=True, help="words | pairs | synthetic | chars")
    t.add_argument("--method", required=True, help="lm-nt | lm-it | onehot | ecoc | mach")
    t.add_argument("--budget", help="output-layer parameters (weights + biases); default: one-hot's / 50 for the "
                                    "head and code methods (N/50 units), a full softmax for onehot")
    t.add_argument("--classes", help="number of classes N (words: vocabulary size, default 10000; synthetic: "
                                     "default 10000; pairs: default 100000; chars: default 3755)")
    t.add_argument("--epochs", type=positive_int, default=1)
    t.add_argument("--batch-size", type=positive_int, default=256)
    t.add_argument("--lr", type=positive_float, default=2e-3)
    t.add_argument("--train-examples", help="words, pairs: subsample the training set; synthetic: examples generated")
    t.add_argument("--test-examples", help="words, pairs: subsample the test set; synthetic: test examples")
    t.add_argument("--renders-per-font", type=positive_int, default=8,
                   help="chars: augmented training renders per font")
    t.add_argument("--order", type=positive_int,
                   help="lm-nt/lm-it: the order r of the moduli (default: best separation)")
    t.add_argument("--code", default="random", help="ecoc: random | hadamard")
    t.add_argument("--independent", action="store_true", help="one independent network per head")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default: torch's)")
    t.add_argument("--out", type=Path, help="also write the JSON result to this file (atomically)")
    t.add_argument("--json", action="store_true", help="print JSON")
    t.set_defaults(func=_train)

    m = g.add_parser("map", help="build a label map and print its separation / balance / independence report")
    m.add_argument("--kind", default="nt", help="nt | it | mach")
    m.add_argument("--classes", required=True)
    m.add_argument("--units", required=True, help="total output units sum k_i")
    m.add_argument("--order", type=positive_int)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--full", action="store_true", help="include the pairwise mutual-information matrix")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_map)
