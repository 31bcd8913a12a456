"""How far the key regression reaches on SmolLM2-135M-Instruct: from how weak a first reading it still reads the
vocabulary, and how much more noise the tables would need before even the right key stops reading them.

`key-regression` in the suite starts from the learned matcher's reading (59-99% of the ids right at the full
budget). Here the start is made with the secret, for measurement: a share ``START`` of the movable ids is given its
right plain token, every other id a plain token drawn uniformly from the movable ids (a draw that hits the right one
by chance counts as right; the recorded ``start_read`` is the share actually right). Random wrong readings are one
kind of error: a matcher's are near misses whose rows lie close to the right ones, and a weak table attack's collide
on a few ids (the starts from VMA's and IA's real readings are measured by ``privacy_full.py``). From that start the
attack's own rounds run unchanged (``aloe.attacks.key_regression.regress``, both tables, every movable id, the
profile's public noise shape; each round reads through the trimmed fit, the untrimmed least-squares fit and the
inverse fit and keeps the reading with the most distinct first choices), at most ``--rounds`` of them, stopping once
no first choice changes; each round's reading is scored with the secret as it ends, and the attack's answer is the
round with the most distinct first choices. ``--fits`` picks older versions of the attack (``both``: trimmed and
inverse; ``trimmed``: the trimmed fit alone) or ``untrimmed``, plain least squares alone: from the right reading
(``START`` 1) it fits the very key that ``SCALE`` below writes with, so its read is what the right key reads.

``SCALE`` multiplies the noise the artifact already carries, on both tables: with the key fitted by least squares on
the right pairs (what the secret gives), each obfuscated row becomes ``x K + SCALE * (y - x K)``, the row's own noise
draw made SCALE times larger (the fit absorbs the share of the noise that lies in the plain rows' span, 576 of
49,135 dimensions, about 1%). Such a table is not a model anyone would serve (the paper's noise already costs x214
perplexity): the point measures the noise the defence would need, started from the right reading (``START`` 1), the
best case for the server.

    python benchmarks/keyreg_limits.py [--profile paper] [--points 1:0.15 1:0.1 2:1 3:1 4:1] [--rounds 6]
        [--fits all|both|trimmed|untrimmed] [--rerun] [--threads 2] [--json]
    python benchmarks/keyreg_limits.py --report-only

Each point is saved when done (an interrupted run resumes). The artifacts are the ones ``privacy.py`` built (same
cache). Writes benchmarks/results/keyreg_limits.{json,md,png}.
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
from aloe.attacks.common import Budget, Target  # noqa: E402
from aloe.attacks.key_regression import FITS, regress  # noqa: E402
from aloe.attacks.scoring import IdGuess, score_ids  # noqa: E402
from aloe.attacks.suite import texts_for  # noqa: E402
from aloe.obfuscation.secret import load_secret  # noqa: E402
from common import RESULTS, resumed_report_head, save_png  # noqa: E402
from privacy import all_profiles, build  # noqa: E402
from privacy_full import source_revision  # noqa: E402

PATH = RESULTS / "keyreg_limits.json"
DEFAULT_POINTS = ["1:0.15", "1:0.1", "2:1", "3:1", "4:1"]


def parse_point(text: str) -> tuple[float, float]:
    """``SCALE:START`` -> (noise multiplier >= 1, share of the start read right in (0, 1])."""
    try:
        scale, start = (float(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"bad point {text!r}: expected SCALE:START, e.g. 1:0.1 or 4:1") from None
    if not scale >= 1 or not 0 < start <= 1:
        raise SystemExit(f"bad point {text!r}: the noise scale must be >= 1 and the start's share in (0, 1]")
    return scale, start


def make_start(truth: np.ndarray, pool: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """The right plain id on a random ``share`` of the rows, a uniform draw from ``pool`` on the others."""
    right = rng.random(len(truth)) < share
    return np.where(right, truth, rng.choice(pool, len(truth)))


def scale_noise(plain_rows: torch.Tensor, obf_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """``x K + scale * (y - x K)`` with K the least-squares key of the right pairs: each row's noise ``scale`` times
    larger (float32, as the artifact holds it). The scaled part is orthogonal to the plain rows' span, so least
    squares on the right pairs fits the same K again."""
    if scale == 1:
        return obf_rows
    X, Y = plain_rows.double(), obf_rows.double()
    fit = X @ torch.linalg.lstsq(X, Y).solution
    return (fit + scale * (Y - fit)).float()


FIT_LABELS = {"all": "trimmed + untrimmed + inverse", "both": "trimmed + inverse", "trimmed": "trimmed",
              "untrimmed": "untrimmed"}
READINGS = {"all": FITS, "both": ("trimmed", "inverse"), "trimmed": ("trimmed",), "untrimmed": ("untrimmed",)}


def measure(t: Target, tau: np.ndarray, prompts: list, scale: float, share: float, rounds: int,
            show: bool, fits: str = "all") -> dict:
    pool = t.movable_ids
    inv = np.empty_like(tau)
    inv[tau] = np.arange(len(tau))
    ids = tau[pool]
    truth = inv[ids]
    rows = torch.as_tensor(ids)
    sides = [(scale_noise(t.plain_embed[torch.as_tensor(truth)], t.obf_embed[rows], scale), t.plain_embed)]
    if t.head_held:
        sides.append((scale_noise(t.plain_head[torch.as_tensor(truth)], t.obf_head[rows], scale), t.plain_head))
    seed = secrets.randbits(64)   # the start's draw: no secret, recorded so the point can be redrawn
    start = make_start(truth, pool, share, np.random.default_rng(seed))
    read, seconds = [], []
    t0 = time.perf_counter()

    def on_round(guess: np.ndarray) -> None:
        nonlocal t0
        read.append(float((guess == truth).mean()))
        seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()

    row_shaped = t.profile.get("noise_shape", "entry") == "row"
    with tqdm(total=rounds, desc=f"key regression, noise x{scale:g}, start {100 * share:g}%", unit="round",
              disable=not show) as bar:
        cand, log = regress(sides, start, pool, t.budget.topk, row_shaped, rounds, progress=bar, on_round=on_round,
                            fits=READINGS[fits])
    res = score_ids(IdGuess(ids, cand), tau, prompts, t.fixed_ids)
    return {"scale": scale, "start": share, "start_read": float((start == truth).mean()), "seed": seed,
            "rounds_max": rounds, "read_per_round": read, "seconds_per_round": seconds, "sides": len(sides),
            "fits": fits, **{k: log[k] for k in ("rounds", "changed_per_round", "kept_per_round", "sigma_per_round",
                                                 "fit_per_round", "distinct_per_round", "best_round") if k in log},
            **{k: v for k, v in res.items() if "recovery" in k or k in ("prompt_tokens", "queries")}}


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def write_report(state: dict) -> None:
    rows = ["| profile | fit | noise x | start: % right | % read after each round (at most) | fit kept each round | "
            "% vocabulary (top 10) | "
            "% prompt tokens | sigma per coordinate, last round (embedding / head) | seconds per round (median) | "
            "commit |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(state["points"].values(),
                    key=lambda e: (e["profile"], e.get("fits", "trimmed"), e["scale"], -e["start"])):
        sig = " / ".join(f"{s:.3f}" for s in e["sigma_per_round"][-1])
        kept = " → ".join(e.get("fit_per_round", [])) or "–"
        fit = FIT_LABELS[e.get("fits", "trimmed")]
        rows.append(f"| `{e['profile']}` | {fit} | {e['scale']:g} | {pct(e['start_read'])} | "
                    f"{' → '.join(pct(r) for r in e['read_per_round'])} ({e['rounds_max']}) | {kept} | "
                    f"**{pct(e['token_recovery'])}** "
                    f"({pct(e['token_recovery_top10'])}) | {pct(e['prompt_token_recovery'])} | {sig} | "
                    f"{float(np.median(e['seconds_per_round'])):.0f} | {e.get('commit') or '–'} |")
    md = [*resumed_report_head("Key regression: the weakest start it grows from, and the noise that stops it "
                               "(SmolLM2-135M)", "keyreg_limits.py", state.get("commands", [])),
          "The start is made with the secret: the right plain token on a random share of the movable ids, a uniformly "
          "drawn one on the others. From it the attack's own rounds run (`key-regression`: a trimmed least-squares "
          "fit of each table's key, every row read back through it by its likelihood under the profile's noise "
          "shape, embedding and head added; with the inverse fit, each round also fits the map from the obfuscated "
          "rows back to the centred plain rows and reads by likelihood in the table's whitened space; the attack as "
          "it is also reads through the untrimmed least-squares key; with more than one reading, each round keeps "
          "the one with the most distinct first choices), at most the recorded number of rounds, stopping once "
          "nothing changes. The vocabulary and prompt figures are the attack's answer: with more than one fit, the "
          "round with the most distinct first choices; with one, the last round. Rows with the trimmed fit alone "
          "are the attack as it was before the inverse fit, rows with trimmed + inverse before the untrimmed "
          "reading. The untrimmed fit alone from the right reading (start 100%) fits the very key the scaled table "
          "is written with: its read is the right key's. The sigma column is a forward fit's (the trimmed one's "
          "when the inverse reading is kept). The commit column names the code each row was measured with "
          "(recorded since the inverse fit; '–': before it); the commands above ran with the default fits of their "
          "day (trimmed before the inverse fit, trimmed + inverse before 51103b3), as the fit column shows. "
          "'noise x' multiplies the artifact's own noise draw on both tables (see the script's docstring); at x1 the "
          "tables are the artifact's. One draw per row. Goal of the privacy issue: at most 5%.", "",
          *rows, "", "![key regression limits](keyreg_limits.png)", ""]
    atomic_write_text(RESULTS / "keyreg_limits.md", "\n".join(md))


def write_plot(state: dict) -> None:
    """Left: `paper`'s tables at their own noise, the read after each round from the weaker starts. Right: the read
    the attack returns from the right reading against the noise multiplier, one line per fit. Other profiles' points
    are in the report's table only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pts = [e for e in state["points"].values() if e["profile"] == "paper"]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), sharey=True)
    ax = axes[0]
    for e in sorted((e for e in pts if e["start"] < 1), key=lambda e: -e["start"]):
        ys = [100 * e["start_read"], *(100 * r for r in e["read_per_round"])]
        fits = e.get("fits", "trimmed")
        line, = ax.plot(range(len(ys)), ys, marker="o", ls="--" if fits == "trimmed" else "-",
                        label=f"start {100 * e['start_read']:.1f}%, {FIT_LABELS[fits]}")
        answer = e.get("best_round", len(e["read_per_round"]) - 1) + 1      # the round the attack returns
        ax.plot([answer], [100 * e["token_recovery"]], marker="*", ms=14, color=line.get_color(), ls="none")
    ax.set_xlabel("round (0: the start)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("the artifact's noise, weaker starts (star: the round returned)", fontsize=9)
    ax.set_ylabel("% of the vocabulary read")
    ax = axes[1]
    right = [e for e in pts if e["start"] == 1]
    for fits in FIT_LABELS:
        line = sorted((e for e in right if e.get("fits", "trimmed") == fits), key=lambda e: e["scale"])
        if line:
            hollow = fits == "all"                       # drawn over the right key's point it matches
            ax.plot([e["scale"] for e in line], [100 * e["token_recovery"] for e in line],
                    marker="s" if hollow else "o", ms=11 if hollow else 6, mfc="none" if hollow else None,
                    ls="--" if fits == "trimmed" else "-",
                    label=FIT_LABELS[fits] + (" (the right key)" if fits == "untrimmed" else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("noise (x the paper's), started from the right reading")
    ax.set_title("more noise: the read returned", fontsize=9)
    for ax in axes:
        ax.axhline(5.0, ls=":", lw=0.8, color="grey")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, RESULTS / "keyreg_limits.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="paper", help="a profile of benchmarks/privacy.py (its cached artifact)")
    ap.add_argument("--points", nargs="+", default=DEFAULT_POINTS, metavar="SCALE:START")
    ap.add_argument("--rounds", type=int, default=6, help="at most this many rounds of fit and read")
    ap.add_argument("--fits", choices=sorted(FIT_LABELS), default="all",
                    help="all: the attack's rounds (the trimmed, untrimmed and inverse fits' readings); both: trimmed "
                         "and inverse, the attack before the untrimmed reading; trimmed: the trimmed fit alone, the "
                         "attack before the inverse fit; untrimmed: plain least squares alone (from the right reading: "
                         "the read through the right key)")
    ap.add_argument("--rerun", action="store_true", help="measure the points again even where they are recorded")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and plot from the JSON")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    points = [parse_point(p) for p in args.points]
    profiles = all_profiles()
    if args.profile not in profiles:
        ap.error(f"unknown profile {args.profile!r}; choose one of {', '.join(sorted(profiles))}")
    state = json.loads(PATH.read_text()) if PATH.is_file() else {"points": {}}
    if not args.report_only:
        torch.set_num_threads(max(1, args.threads))
        from aloe.obfuscation.commands import resolve_model

        show = not args.json
        model = resolve_model("smollm2")
        obf, secret = build(model, profiles[args.profile], show)
        t = Target(model, obf, Budget())
        tau = load_secret(secret).tau
        prompts = texts_for(t).prompts
        command = sys.argv[1:] if argv is None else list(argv)
        if command not in state.setdefault("commands", []):
            state["commands"].append(command)
        for scale, share in points:
            fit = "" if args.fits == "trimmed" else f":{args.fits}"
            key = f"{args.profile}:{scale:g}:{share:g}:{args.rounds}{fit}"
            if key in state["points"] and not args.rerun:
                continue
            state["points"][key] = {"profile": args.profile, "commit": source_revision(),
                                    **measure(t, tau, prompts, scale, share, args.rounds, show, args.fits)}
            atomic_write_json(PATH, state)
            write_report(state)
            write_plot(state)
    if not state["points"]:
        raise SystemExit(f"no key regression limit measured yet ({PATH})")
    write_report(state)
    write_plot(state)
    print(json.dumps(state, indent=1) if args.json else (RESULTS / "keyreg_limits.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
