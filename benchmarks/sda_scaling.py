"""SDA (ciphertext-only sequence decipherment) against what the server has: how much text of the victim's kind it
trains on, how much of the victim's traffic it has observed, and how large a translator it trains. SmolLM2-135M's
tokenizer and vocabulary (49,152 ids, its special ids fixed), the Lee news text.

SDA reads no weight: what it attacks is the fixed permutation tau of token-id serving, the same for every profile, so
each point draws a fresh uniformly random tau (the special ids fixed, as `aloe obfuscate` keeps them) instead of
building an obfuscated model. The text is split once, as in `aloe attack` (`aloe.attacks.suite.corpus_texts`): the
victim's stream is the first 20,000 tokens of the Lee background text, the server's corpus is drawn from the rest
(about 55,000 tokens), the scored prompts are the suite's 8 chat prompts and 8 Lee test documents, sent with the
stream. A point ``T:P:D`` observes the first T tokens of the stream, trains on the first P tokens of the server's
part (``all``: all of it) and uses a translator of width D (3 layers). The (20000, 20000, 128) point is the suite's
`sda` at the full budget.

    python benchmarks/sda_scaling.py [--points 20000:20000:128 20000:all:128 ...] [--steps 2000] [--threads 2]
        [--json]
    python benchmarks/sda_scaling.py --report-only

Each point is saved when done (an interrupted run resumes). Writes benchmarks/results/sda_scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.attacks import sda  # noqa: E402
from aloe.attacks.scoring import score_ids  # noqa: E402
from aloe.attacks.suite import doc_tokens, real_prompts  # noqa: E402
from common import RESULTS, resumed_report_head, save_png  # noqa: E402

PATH = RESULTS / "sda_scaling.json"
STREAM = 20_000        # the victim's part of the Lee background text (the suite's stream)
DEFAULT_POINTS = ["20000:5000:128", "20000:10000:128", "20000:20000:128", "20000:all:128",
                  "5000:all:128", "10000:all:128", "20000:all:256"]


def parse_point(text: str) -> tuple[int, int | None, int]:
    """``T:P:D`` -> (traffic tokens, corpus tokens or None for all, translator width)."""
    try:
        t, p, d = text.split(":")
        point = int(t), None if p == "all" else int(p), int(d)
    except ValueError:
        raise SystemExit(f"bad point {text!r}: expected TRAFFIC:CORPUS:WIDTH, e.g. 20000:all:128") from None
    if not 0 < point[0] <= STREAM or (point[1] is not None and point[1] < sda.LENGTH) or point[2] < 8 \
            or point[2] % 4:
        raise SystemExit(f"bad point {text!r}: traffic 1..{STREAM} tokens, corpus >= {sda.LENGTH} tokens or 'all', "
                         "width a multiple of 4 (4 heads), at least 8")
    return point


def texts(model: Path) -> dict:
    """The plain ids of every role, the vocabulary size and the fixed ids."""
    from transformers import AutoTokenizer

    from aloe.assets.corpus import load_corpus
    from aloe.obfuscation.model import special_token_ids

    tok = AutoTokenizer.from_pretrained(str(model))
    config = json.loads((model / "config.json").read_text())
    lee = doc_tokens(tok, load_corpus("lee"), 10**7)
    if len(lee) < 2 * STREAM:
        raise SystemExit(f"the Lee background text has {len(lee)} tokens; this benchmark needs {2 * STREAM}")
    return {"prompts": real_prompts(tok), "stream": lee[:STREAM], "corpus": lee[STREAM:],
            "vocab": int(config["vocab_size"]),
            "fixed": np.array(sorted(special_token_ids(model, config)), dtype=np.int64)}


def random_tau(n: int, fixed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of the ids that moves no fixed id (what `aloe obfuscate` draws)."""
    tau = np.arange(n)
    movable = np.setdiff1d(tau, fixed)
    tau[movable] = movable[rng.permutation(len(movable))]
    return tau


def measure(data: dict, traffic: int, corpus: int | None, width: int, steps: int, ranks: int, show: bool) -> dict:
    rng = np.random.default_rng(secrets.randbits(128))   # tau and the server's draws: fresh for every point
    tau = random_tau(data["vocab"], data["fixed"], rng)
    prior = data["corpus"] if corpus is None else data["corpus"][:corpus]
    prompts = data["prompts"]
    sent = [tau[data["stream"][:traffic]], *(tau[p] for p in prompts)]
    t0 = time.perf_counter()
    with tqdm(total=steps, desc=f"SDA {traffic}:{corpus or 'all'}:{width}", unit="step", disable=not show) as bar:
        guess = sda.attack(sent, prior, data["vocab"], data["fixed"], ranks, steps, 10, rng, bar, width)
    seconds = time.perf_counter() - t0
    res = score_ids(guess, tau, prompts, data["fixed"])
    toks = np.concatenate(prompts)
    toks = toks[~np.isin(toks, data["fixed"])]
    return {"traffic_tokens": traffic, "corpus_tokens": int(len(prior)), "width": width, "steps": steps,
            "ranks": ranks, "seconds": seconds,
            # a token the server's corpus lacks is no class of the translator: the reading's ceiling
            "prompt_tokens_in_corpus": float(np.isin(toks, prior).mean()),
            **{k: v for k, v in res.items() if "recovery" in k or k in ("prompt_tokens", "queries")}}


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def write_report(state: dict) -> None:
    rows = ["| traffic observed (tokens) | server's corpus (tokens) | translator width | % prompt tokens read | "
            "top 10 | % of prompt tokens in the corpus (ceiling) | % vocabulary | seconds |",
            "|---|---|---|---|---|---|---|---|"]
    pts = sorted(state["points"].values(), key=lambda e: (e["width"], e["traffic_tokens"], e["corpus_tokens"]))
    for e in pts:
        rows.append(f"| {e['traffic_tokens']:,} | {e['corpus_tokens']:,} | {e['width']} | "
                    f"**{pct(e['prompt_token_recovery'])}** | {pct(e['prompt_token_recovery_top10'])} | "
                    f"{pct(e['prompt_tokens_in_corpus'])} | {pct(e['token_recovery'])} | {e['seconds']:.0f} |")
    md = [*resumed_report_head("SDA against the server's corpus, the observed traffic and the translator (SmolLM2 "
                               "tokenizer)", "sda_scaling.py", state.get("commands", [])),
          "Ciphertext only: the server reads the obfuscated ids of the victim's stream (the first tokens of the Lee "
          "background text) and of the 16 scored prompts, and trains SDA's translator on its own text of the same "
          "kind (the rest of the Lee background text, disjoint from the stream). Each row is one draw of tau and "
          "of the server's training. Recovery is the share of the prompts' tokens (special ids excluded) whose "
          "obfuscated id SDA maps to the right plain token, first choice and top 10; the ceiling is the share of "
          "those tokens that occur in the server's corpus at all. Goal of the privacy issue: at most 5%.", "",
          *rows, "", "![SDA scaling](sda_scaling.png)", ""]
    atomic_write_text(RESULTS / "sda_scaling.md", "\n".join(md))


def write_plot(state: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = list(state["points"].values())
    full_traffic = max((e["traffic_tokens"] for e in pts), default=STREAM)
    full_corpus = max((e["corpus_tokens"] for e in pts), default=0)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), sharey=True)
    for ax, (xkey, fixed_key, fixed_val, label) in zip(axes, (
            ("corpus_tokens", "traffic_tokens", full_traffic, f"traffic {full_traffic:,} tokens"),
            ("traffic_tokens", "corpus_tokens", full_corpus, f"corpus {full_corpus:,} tokens"))):
        for width, marker in zip(sorted({e["width"] for e in pts}), "os^D"):
            line = sorted((e for e in pts if e[fixed_key] == fixed_val and e["width"] == width), key=lambda e: e[xkey])
            if not line:
                continue
            ax.plot([e[xkey] for e in line], [100 * e["prompt_token_recovery"] for e in line], marker=marker,
                    label=f"width {width}, first choice")
            ax.plot([e[xkey] for e in line], [100 * e["prompt_token_recovery_top10"] for e in line], marker=marker,
                    ls="--", alpha=0.6, label=f"width {width}, top 10")
            if width == min(e["width"] for e in pts):
                ax.plot([e[xkey] for e in line], [100 * e["prompt_tokens_in_corpus"] for e in line], ls=":",
                        color="grey", label="in the server's corpus (ceiling)")
        ax.axhline(5.0, ls=":", lw=0.8, color="grey")
        ax.set_xlabel(f"{xkey.replace('_', ' ')} ({label})")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("% of prompt tokens read (ciphertext only)")
    fig.suptitle("SDA on token-id traffic: what more text and more traffic give the server", fontsize=9)
    fig.tight_layout()
    save_png(fig, RESULTS / "sda_scaling.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", nargs="+", default=DEFAULT_POINTS, metavar="TRAFFIC:CORPUS:WIDTH")
    ap.add_argument("--steps", type=int, default=2000, help="translator training steps (the suite's full budget)")
    ap.add_argument("--ranks", type=int, default=1024, help="ids coded by their frequency rank")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and plot from the JSON")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.ranks < 1:
        ap.error("--steps and --ranks must be >= 1")
    points = [parse_point(p) for p in args.points]
    state = json.loads(PATH.read_text()) if PATH.is_file() else {"points": {}}
    if not args.report_only:
        torch.set_num_threads(max(1, args.threads))
        from aloe.obfuscation.commands import resolve_model

        show = not args.json
        data = texts(resolve_model("smollm2"))
        command = sys.argv[1:] if argv is None else list(argv)
        if command not in state.setdefault("commands", []):
            state["commands"].append(command)
        for traffic, corpus, width in points:
            key = f"{traffic}:{corpus or 'all'}:{width}:{args.steps}:{args.ranks}"
            if key in state["points"]:
                continue
            state["points"][key] = measure(data, traffic, corpus, width, args.steps, args.ranks, show)
            atomic_write_json(PATH, state)
            write_report(state)
            write_plot(state)
    if not state["points"]:
        raise SystemExit(f"no SDA scaling result yet ({PATH})")
    write_report(state)
    write_plot(state)
    print(json.dumps(state, indent=1) if args.json else (RESULTS / "sda_scaling.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
