"""Gemma 3 270M with noise on its tables: what the noise costs (fidelity) against what the post-norm attack still
reads, one point per noise level, to look for a usable noisy point and to see how far the attack reaches.

Each point: ``aloe obfuscate`` of Gemma 3 270M with the `balanced` profile (the exact-norm keys that keep Gemma 3's
sandwich norms stock) and ``--alpha-e A --alpha-h H [--noise-shape S]``, a fresh secret from the OS CSPRNG in a
temporary folder (removed with the artifact when the point is done; no secret is stored in the results); then
``aloe fidelity`` (perplexity ratio and top-1 agreement on the Lee corpus, 1,020 tokens; greedy agreement over 8 chat
prompts x 64 new tokens) and ``aloe attack post-norm`` at the full budget (every one of the 255,760 movable ids, the
suite's 8 chat prompts + 8 Lee test documents). The attack reads each slot's owner off the post-norm weights, which
carry no noise, and each embedding row's per-coordinate magnitudes off the slots.

    python benchmarks/gemma3_frontier.py [--points 0.01:0.003 0.03:0.01 0.1:0.03 1:0.3] [--threads 2] [--rerun]
        [--json]
    python benchmarks/gemma3_frontier.py --report-only

A point is ``ALPHA_E:ALPHA_H`` or ``ALPHA_E:ALPHA_H:SHAPE`` (``entry``, the default, one sigma per table as
`balanced-ae0.3`; or ``row``, each row's own RMS as `private`). Each point is saved when done (an interrupted run
resumes). The earlier runs of ``benchmarks/results/gemma3_post_norm.json`` with a fidelity figure are shown beside
them. Writes benchmarks/results/gemma3_frontier.{json,md,png}. About 10-15 minutes a point on 2 cores (~10 GB peak).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from common import RESULTS, resumed_report_head, save_png  # noqa: E402
from privacy_full import source_revision  # noqa: E402

PATH = RESULTS / "gemma3_frontier.json"
EARLIER = RESULTS / "gemma3_post_norm.json"
DEFAULT_POINTS = ["0.01:0.003", "0.03:0.01", "0.1:0.03", "1:0.3"]
GOAL = dict(ppl_ratio=1.10, greedy=0.80, recovery=0.05)


def parse_point(spec: str) -> tuple[float, float, str]:
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        a_e, a_h = float(parts[0]), float(parts[1])
    except ValueError:
        raise SystemExit(f"bad point {spec!r}: ALPHA_E:ALPHA_H or ALPHA_E:ALPHA_H:SHAPE") from None
    shape = parts[2] if len(parts) == 3 else "entry"
    if shape not in ("entry", "row") or not (a_e >= 0 and a_h >= 0):
        raise SystemExit(f"bad point {spec!r}: noise levels >= 0, shape entry or row")
    return a_e, a_h, shape


def point_key(a_e: float, a_h: float, shape: str) -> str:
    return f"{a_e:g}:{a_h:g}:{shape}"


def measure(model: Path, a_e: float, a_h: float, shape: str, show: bool) -> dict:
    from aloe.attacks.common import Budget, Target
    from aloe.attacks.suite import run, texts_for
    from aloe.obfuscation.fidelity import measure_fidelity
    from aloe.obfuscation.model import obfuscate_checkpoint
    from aloe.obfuscation.profiles import PROFILES
    from aloe.obfuscation.secret import load_secret

    profile = PROFILES["balanced"].with_overrides(name=f"balanced-ae{a_e:g}-ah{a_h:g}-{shape}", alpha_e=a_e,
                                                  alpha_h=a_h, noise_shape=shape)
    tmp = Path(tempfile.mkdtemp(prefix="aloe-gemma3-"))
    try:
        t0 = time.perf_counter()
        obfuscate_checkpoint(model, tmp / "obf", tmp / "secret.json", profile, seed_from_os=True, progress=show)
        seconds_obfuscate = time.perf_counter() - t0
        fid = measure_fidelity(model, tmp / "obf", tmp / "secret.json", progress=show)
        target = Target(model, tmp / "obf", Budget())
        res = run(target, ["post-norm"], load_secret(tmp / "secret.json").tau, texts_for(target), progress=show)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(alpha_e=a_e, alpha_h=a_h, noise_shape=shape, fidelity=fid, attack=res["post-norm"],
                seconds_obfuscate=seconds_obfuscate)


def earlier_points() -> list[dict]:
    """The runs of gemma3_post_norm.json that carry a fidelity figure, as points of this frontier."""
    if not EARLIER.is_file():
        return []
    out = []
    for r in json.loads(EARLIER.read_text()).get("runs", []):
        if "fidelity" in r:
            out.append(dict(label=r["profile"], fidelity=r["fidelity"], attack=r["result"]["post-norm"],
                            commands=r["commands"]))
    return out


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def log10_ratio(fid: dict) -> float:
    """log10 of the perplexity ratio, finite where the ratio itself overflows (``log_ppl_ratio``, nats per token)."""
    import math

    return (fid["log_ppl_ratio"] if "log_ppl_ratio" in fid else math.log(fid["ppl_ratio"])) / math.log(10)


def ratio(fid: dict) -> str:
    r = fid.get("ppl_ratio")
    return f"{r:,.3f}" if r is not None and r < 1e6 else f"10^{log10_ratio(fid):,.0f}"


def write_report(state: dict) -> None:
    rows = ["| alpha_e | alpha_h | noise shape | ppl ratio | top-1 agree | greedy agree (prompts exact) | post-norm: "
            "% vocabulary (top-10) | % prompt tokens | usable (ppl <= 1.10, greedy >= 0.80) | attack <= 5% |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(state["points"], key=lambda k: (float(k.split(":")[0]), k)):
        p = state["points"][key]
        f, a = p["fidelity"], p["attack"]
        usable = log10_ratio(f) <= math.log10(GOAL["ppl_ratio"]) and f["greedy_agreement"] >= GOAL["greedy"]
        rows.append(f"| {p['alpha_e']:g} | {p['alpha_h']:g} | {p['noise_shape']} | {ratio(f)} | "
                    f"{f['top1_agreement']:.3f} | {f['greedy_agreement']:.3f} ({f['greedy_exact_prompts']}/"
                    f"{f['greedy_prompts']}) | **{pct(a['token_recovery'])}** ({pct(a['token_recovery_top10'])}) | "
                    f"{pct(a['prompt_token_recovery'])} | {'yes' if usable else 'no'} | "
                    f"{'yes' if max(a['token_recovery'], a['prompt_token_recovery']) <= GOAL['recovery'] else 'no'} |")
    for p in earlier_points():
        f, a = p["fidelity"], p["attack"]
        rows.append(f"| {p['label']} (gemma3_post_norm.json) | | | {ratio(f)} | "
                    f"{f['top1_agreement']:.3f} | "
                    f"{f['greedy_agreement']:.3f} ({f['greedy_exact_prompts']}/{f['greedy_prompts']}) | "
                    f"**{pct(a['token_recovery'])}** ({pct(a['token_recovery_top10'])}) | "
                    f"{pct(a['prompt_token_recovery'])} | no | no |")
    md = [*resumed_report_head("Gemma 3 270M: noise on the tables against the post-norm attack", "gemma3_frontier.py",
                               state["commands"]),
          f"Source revision of the last point: {state.get('source_revision', '?')}.", "",
          "Each point is a fresh `aloe obfuscate` (profile `balanced`, the given noise, a fresh secret), `aloe "
          "fidelity` (Lee corpus, 1,020 tokens; 8 chat prompts x 64 greedy tokens) and `aloe attack post-norm` at the "
          "full budget (255,760 movable ids; the suite's prompts). Goal of `private`: ppl ratio <= 1.10, greedy >= "
          "0.80, the attack <= 5% of the vocabulary and of the prompt tokens. One draw per point.", "", *rows, ""]
    atomic_write_text(RESULTS / "gemma3_frontier.md", "\n".join(md))


def write_plot(state: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [state["points"][k] for k in state["points"]] + earlier_points()
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # entry-shaped noise is the swept curve; row-shaped points (a few levels) are drawn as markers, not joined
    for shape, colour, style, offset in (("entry", "tab:blue", "o-", -12), ("row", "tab:orange", "D", 6)):
        mine = sorted((p for p in state["points"].values() if p["noise_shape"] == shape),
                      key=lambda p: log10_ratio(p["fidelity"]))
        if not mine:
            continue
        ax.plot([log10_ratio(p["fidelity"]) for p in mine], [100 * p["attack"]["token_recovery"] for p in mine],
                style, color=colour, label=f"noise on both tables ({shape}-shaped)")
        near = [p for p in mine if log10_ratio(p["fidelity"]) < 0.01]   # one label for the crowded start
        if near:
            lo, hi = min(p["alpha_e"] for p in near), max(p["alpha_e"] for p in near)
            ax.annotate(f"alpha_e {lo:g}-{hi:g}" if lo != hi else f"alpha_e {lo:g}",
                        (0, 100 * min(p["attack"]["token_recovery"] for p in near)), textcoords="offset points",
                        xytext=(4, offset), fontsize=7, color=colour)
        for p in mine:
            if log10_ratio(p["fidelity"]) >= 0.01:
                ax.annotate(f"{p['alpha_e']:g}/{p['alpha_h']:g}", (log10_ratio(p["fidelity"]),
                                                                   100 * p["attack"]["token_recovery"]),
                            textcoords="offset points", xytext=(4, offset), fontsize=7, color=colour)
    for p in earlier_points():
        ax.plot([log10_ratio(p["fidelity"])], [100 * p["attack"]["token_recovery"]], "s", color="grey",
                label="earlier run (gemma3_post_norm.json)")
    ax.axvline(math.log10(GOAL["ppl_ratio"]), color="green", ls=":", lw=1)
    ax.axhline(100 * GOAL["recovery"], color="green", ls=":", lw=1, label="goal of `private`")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=-0.002)
    ax.set_xlabel("log10 of the perplexity ratio (obfuscated / plain), Lee corpus")
    ax.set_ylabel("post-norm attack: % of the vocabulary read")
    ax.set_ylim(-3, 103)
    ax.set_title("Gemma 3 270M: table noise against the post-norm attack")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_png(fig, RESULTS / "gemma3_frontier.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="ALPHA_E:ALPHA_H[:SHAPE] (entry or row)")
    ap.add_argument("--rerun", action="store_true", help="measure the listed points again")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and plot from the JSON")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    points = [parse_point(p) for p in args.points]
    state = json.loads(PATH.read_text()) if PATH.is_file() else {"points": {}, "commands": []}
    if args.report_only:
        if not state["points"]:
            ap.error(f"no results yet: {PATH}")
    else:
        import torch

        from aloe.assets.gemma3 import gemma3_path

        torch.set_num_threads(max(1, args.threads))
        show = not args.json
        model = gemma3_path(progress=show)
        command = sys.argv[1:] if argv is None else list(argv)
        if command not in state["commands"]:
            state["commands"].append(command)
        for a_e, a_h, shape in tqdm(points, desc="noise points", disable=not show):
            key = point_key(a_e, a_h, shape)
            if key in state["points"] and not args.rerun:
                continue
            state["points"][key] = measure(model, a_e, a_h, shape, show)
            state["source_revision"] = source_revision()
            atomic_write_json(PATH, state)
            write_report(state)
            write_plot(state)
    write_report(state)
    write_plot(state)
    print(json.dumps(state, indent=1) if args.json else (RESULTS / "gemma3_frontier.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
