"""Attacks at the **full budget** (every movable id of the 49,152, every layer; `aloe attack`'s defaults) on chosen
frontier points, beside the quick-budget figures of ``benchmarks/privacy.py``. Each (profile, attack) result is saved
as soon as it is done, so an interrupted run resumes; the artifacts are the ones ``privacy.py`` built (same cache).

    python benchmarks/privacy_full.py [--profiles adapt-row-ae0.6 ...] [--attacks nn tfma ia vma learned]
        [--threads 1] [--json]
    python benchmarks/privacy_full.py --report-only

Writes benchmarks/results/privacy_full.json and privacy_full.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402
from aloe.attacks.common import Budget, Target  # noqa: E402
from aloe.attacks.suite import ATTACKS, run, texts_for  # noqa: E402
from aloe.obfuscation.secret import load_secret  # noqa: E402
from privacy import RESULTS, all_profiles, build, pct, stale_attacks  # noqa: E402

PATH = RESULTS / "privacy_full.json"
ROOT = Path(__file__).resolve().parents[1]
# ablations: name -> (attack, budget override, what it is)
ABLATIONS = {"learned-weights": ("learned", {"learned_state_ids": -1},
                                 "the learned matcher without its states block (weight features only)"),
             "decoded-monotone": ("decoded", {"decode_monotone": True},
                                  "the learned matcher + language-prior decoding that keeps a sweep's moves only "
                                  "where they raise the text's log-probability"),
             "decoded-beam": ("decoded", {"decode_beam": 8, "decode_sweeps": 2},
                              "the learned matcher + language-prior decoding by a beam search of 8 one-to-one "
                              "readings, the most frequent ids placed first, 2 passes"),
             "decoded-same-draw": ("decoded", {},
                                   "the learned matcher + language-prior decoding (8 parallel sweeps) run again on "
                                   "the draw of the profile the monotone and beam runs used, beside them"),
             "sda-decoded-16": ("sda-decoded", {"decode_sweeps": 16},
                                "SDA + language-prior decoding with twice the decoder's sweeps (16)"),
             "sda-decoded-monotone": ("sda-decoded", {"decode_monotone": True},
                                      "SDA + language-prior decoding that keeps a sweep's moves only where they "
                                      "raise the text's log-probability"),
             "sda-decoded-em": ("sda-decoded", {"decode_em": 50},
                                "SDA + decipherment by EM over a bigram view of the public model (50 iterations)"),
             "sda-decoded-sequential": ("sda-decoded", {"decode_sequential": True},
                                        "SDA + language-prior decoding one id at a time against its neighbours' "
                                        "latest choices, Gibbs sampling annealed from temperature 1 to 0 over 8 "
                                        "sweeps, two ids read as one token penalised more at every sweep"),
             "sda-decoded-beam": ("sda-decoded", {"decode_beam": 8, "decode_sweeps": 2},
                                  "SDA + language-prior decoding by a beam search of 8 one-to-one readings, the most "
                                  "frequent ids placed first, 2 passes (the second from the first's best reading)"),
             "sda-decoded-beam32": ("sda-decoded", {"decode_beam": 32, "decode_sweeps": 1},
                                    "SDA + language-prior decoding by a beam search of 32 one-to-one readings, the "
                                    "most frequent ids placed first, one pass"),
             "sda-decoded-swaps": ("sda-decoded", {"decode_swaps": 3},
                                   "SDA + language-prior decoding (8 parallel sweeps), then up to 3 sweeps of a "
                                   "search over one-to-one readings only: an id moves to a token no other id reads, "
                                   "or swaps tokens with the id that reads it, where the objective rises"),
             "sda-decoded-from-victim": ("sda-decoded", {"decode_from_victim": 3},
                                         "SDA + language-prior decoding (8 parallel sweeps), and, measured with the "
                                         "secret after the attack, 3 sweeps of the one-to-one search started from "
                                         "the victim's reachable reading (the attack's figures are sda-decoded's, "
                                         "on another run)"),
             "sda-decoded-completion": ("sda-decoded", {"decode_completion": 3},
                                        "SDA + language-prior decoding (8 parallel sweeps), and, measured with the "
                                        "secret after the attack, 3 sweeps of the one-to-one search that hold the "
                                        "victim's token wherever it is among the candidates and complete the other "
                                        "ids: the best one-to-one reading that reads every reachable victim token, "
                                        "as far as the search finds"),
             "sda-decoded-8k": ("sda-decoded", {"decode_stream": 8000},
                                "SDA + language-prior decoding (8 parallel sweeps) over the victim's prompts and "
                                "8,000 ids of its stream instead of 2,000: four times the traffic to vote on "
                                "each id"),
             "key-regression-from-vma": ("key-regression", {"keyreg_start": "vma"},
                                         "key regression started from VMA's reading (every layer, the "
                                         "budget's sampled columns) instead of the learned matcher's: no copy trained"),
             "key-regression-from-ia": ("key-regression", {"keyreg_start": "ia"},
                                        "key regression started from IA's reading instead of the learned "
                                        "matcher's: no copy trained"),
             "sda-decoded-em1": ("sda-decoded", {"decode_em": 1},
                                 "the same, one E-step: the bigram posterior with the per-token ranking as a fixed "
                                 "prior")}


def source_revision(root: Path = ROOT) -> str | None:
    """The commit of the checkout at ``root`` the attacks run from, with "+changes" where its code (``src/``,
    ``benchmarks/*.py``) differs from that commit; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                  "src", "benchmarks/*.py"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changes.strip() else "")


def ppl_ratios(quick: dict) -> dict[str, float]:
    """Each profile's perplexity ratio from ``privacy.json`` (the quick run's fidelity)."""
    return {n: e.get("fidelity", {}).get("ppl_ratio", float("nan")) for n, e in quick.get("profiles", {}).items()}


def coverage(state: dict, quick: dict) -> list[str]:
    """Which attack ran at the full budget on which point: % of the vocabulary (% of prompt tokens), "–" where it did
    not run; points sorted by perplexity ratio; the last column is the worst full-budget figure of the point."""
    ppl = ppl_ratios(quick)
    names = sorted(state["profiles"], key=lambda n: (ppl.get(n, float("inf")), n))
    rows = ["## Coverage", "",
            "% of the vocabulary (% of prompt tokens) at the full budget; – not run at the full budget; bold where"
            " either is over 5% (the goal is at most 5% of both).",
            "", "| profile | ppl ratio | " + " | ".join((*ATTACKS, *ABLATIONS)) + " | worst (full) |",
            "|---|---|" + "---|" * (len(ATTACKS) + len(ABLATIONS) + 1)]
    for n in names:
        runs = state["profiles"][n]["attacks"]
        cells = []
        for a in (*ATTACKS, *ABLATIONS):
            r = runs.get(a)
            if r is None:
                cells.append("–")
                continue
            over = max(r.get("token_recovery") or 0, r.get("prompt_token_recovery") or 0) > 0.05
            v = pct(r.get("token_recovery"))
            if r.get("prompt_token_recovery") is not None:
                v += f" ({pct(r['prompt_token_recovery'])})"
            cells.append(f"**{v}**" if over else v)
        vocab = max((r.get("token_recovery") or 0 for r in runs.values()), default=float("nan"))
        prompt = max((r.get("prompt_token_recovery") or 0 for r in runs.values()), default=float("nan"))
        rows.append(f"| {n} | {ppl.get(n, float('nan')):.2f} | " + " | ".join(cells) +
                    f" | {pct(vocab)} ({pct(prompt)}) |")
    return rows


def learned_frontier(state: dict, quick: dict) -> list[str]:
    """The learned matcher on every point it ran on, beside the best table attack (NN / IA / VMA) and the whitened
    nearest-neighbour baseline the matcher starts from (no training); points sorted by perplexity ratio."""
    ppl = ppl_ratios(quick)

    def cell(r: dict | None, key: str = "token_recovery", prompt: bool = True) -> str:
        if r is None or r.get(key) is None:
            return "–"
        return pct(r[key]) + (f" ({pct(r['prompt_token_recovery'])})" if prompt and r.get("prompt_token_recovery")
                              is not None else "")

    rows = ["## The learned matcher across the frontier", "",
            "% of the vocabulary (% of prompt tokens); the whitened baseline is the matcher's starting point before "
            "any training; the decoding column is its own run of the matcher, whose candidates are then decoded over "
            "the victim's traffic (the vocabulary figure changes only on the ids that occur).", "",
            "| point | ppl ratio | best of NN / IA / VMA | learned | its whitened baseline (no training) | "
            "learned, weights only | learned + language-prior decoding |", "|---|---|---|---|---|---|---|"]
    for n in sorted(state["profiles"], key=lambda n: (ppl.get(n, float("inf")), n)):
        runs = state["profiles"][n]["attacks"]
        if "learned" not in runs and "learned-weights" not in runs:
            continue
        table = max((runs[a]["token_recovery"] for a in ("nn", "ia", "vma") if a in runs), default=None)
        rows.append(f"| `{n}` | {ppl.get(n, float('nan')):.2f} | {pct(table)} | {cell(runs.get('learned'))} | "
                    f"{cell(runs.get('learned'), 'whitened_token_recovery', False)} | "
                    f"{cell(runs.get('learned-weights'))} | {cell(runs.get('decoded'))} |")
    return rows


def readings(state: dict) -> list[str]:
    """Where each decoder's objective puts four readings of the traffic it decoded (measured with the secret after
    the attack): nats of the public model's log-probability of the traffic (+ the rank prior where the search has
    one), and the share of the decoded occurrences each reads right."""
    rows = ["## What the decoder's objective prefers", "",
            "Each decoder run, measured with the secret after the attack: the decoder's objective (the public model's "
            "log-probability of the decoded traffic in nats, plus the rank prior the search fitted, that of the "
            "one-to-one search where it ran; the EM search has no rank prior, so its cells give the text term only) "
            "and, in brackets, the share of the decoded "
            "occurrences read right, for four readings: the base attack's first choices, the decoder's, the victim's "
            "token wherever it is among the candidates (the decoder's choice elsewhere: the most a decoder over these "
            "candidates can read, though not always one-to-one, since the decoder's choice can be another id's "
            "true token), and "
            "the victim's text. Where the reachable victim's reading scores below the decoder's, a better search of "
            "the same objective cannot read more.", "",
            "| profile | attack | occurrences | first choice | decoded | victim within candidates | victim's text |",
            "|---|---|---|---|---|---|---|"]

    def cell(r: dict) -> str:
        v = r["objective"] if r.get("objective") is not None else r["text_logprob"]
        return f"{v:,.0f} ({pct(r['occurrences_right'])})"

    for name, e in state["profiles"].items():
        for a, r in e["attacks"].items():
            rd = r.get("readings")
            if rd:
                rows.append(f"| {name} | {a} | {rd['occurrences']:,} | " + " | ".join(
                    cell(rd[k]) for k in ("first_choice", "decoded", "victim_within_candidates")) +
                    f" | {rd['victim']['text_logprob']:,.0f} |")
    searches = {"from_victim": "every id free", "victim_completion": "reachable victim tokens held"}
    started = [(name, a, how, r["readings"][key]) for name, e in state["profiles"].items()
               for a, r in e["attacks"].items() for key, how in searches.items() if key in r.get("readings", {})]
    if started:
        rows += ["", "### The one-to-one search started from the victim's reading", "",
                 "Measured with the secret after the attack: the one-to-one search (`refine_distinct`) started from "
                 "the victim's token wherever it is among the candidates (the decoder's choice elsewhere, made "
                 "one-to-one), under the decoder's rank prior: its objective (nats) and, in brackets, the share of "
                 "the decoded occurrences read right, at the start, after each sweep and for the reading it "
                 "returns (the best objective). If the search moves away from the victim's reading and the "
                 "objective rises, readings that are not the victim's score better, and a search of this objective "
                 "cannot be relied on to read the victim's text even where it is among the candidates. With the "
                 "reachable victim tokens held, the ids whose victim token is among their candidates keep it and "
                 "the search completes the others: the best one-to-one reading that reads all of them, as far as "
                 "the search finds.", "",
                 "| profile | attack | search | start | after each sweep | returned | ids moved or swapped per sweep |",
                 "|---|---|---|---|---|---|---|"]
        for name, a, how, fv in started:
            sweeps = ", ".join(f"{o:,.0f} ({pct(c)})" for o, c in zip(fv["objective_per_sweep"],
                                                                       fv["occurrences_right_per_sweep"])) or "–"
            shares = ", ".join(pct(m + w) for m, w in zip(fv["moved_per_sweep"], fv["swapped_per_sweep"])) or "–"
            rows.append(f"| {name} | {a} | {how} | {fv['start_objective']:,.0f} "
                        f"({pct(fv['occurrences_right_start'])}) | {sweeps} | {fv['best_objective']:,.0f} "
                        f"({pct(fv['occurrences_right'])}) | {shares} |")
    return rows


def write_report(state: dict) -> None:
    quick = json.loads((RESULTS / "privacy.json").read_text()) if (RESULTS / "privacy.json").is_file() else {}
    rows = ["| profile | attack | full: % vocabulary | full: % prompt tokens | quick: % vocabulary | "
            "quick: % prompt tokens | seconds (full) | commit |", "|---|---|---|---|---|---|---|---|"]
    for name, e in state["profiles"].items():
        q = quick.get("profiles", {}).get(name, {}).get("attacks", {})
        for a, r in e["attacks"].items():
            qa = q.get(a, {})
            rows.append(f"| {name} | {a} | {pct(r.get('token_recovery'))} | {pct(r.get('prompt_token_recovery'))} | "
                        f"{pct(qa.get('token_recovery'))} | {pct(qa.get('prompt_token_recovery'))} | "
                        f"{r.get('seconds', float('nan')):.0f} | {r.get('commit') or '–'} |")
    md = ["# AloePri attacks at the full budget (SmolLM2-135M-Instruct, all 49,152 ids)", "",
          *coverage(state, quick), "", *learned_frontier(state, quick), "", *readings(state), "",
          "Produced by (each run resumes the one before):", "",
          *(f"    python benchmarks/privacy_full.py {' '.join(c)}" for c in state.get("commands", [])), "",
          "The quick columns are the same point's figures from `benchmarks/results/privacy.json` (2,048 sampled ids, "
          "6 layers). The commit column names the code each figure was measured with (recorded since "
          "that column exists; – before).",
          "", "Budget: " + ", ".join(f"{k}={v}" for k, v in state["budget"].items()), "", *rows, ""]
    atomic_write_text(RESULTS / "privacy_full.md", "\n".join(md))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", default=["adapt-row-ae0.6"])
    ap.add_argument("--attacks", nargs="+", default=["nn", "tfma", "ia", "vma"], choices=[*ATTACKS, *ABLATIONS],
                    help=f"{', '.join(f'{k}: {v[2]}' for k, v in ABLATIONS.items())}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rerun", action="store_true",
                    help="run the chosen attacks again where they already have a result (the new one replaces it)")
    ap.add_argument("--report-only", action="store_true", help="rewrite privacy_full.md from privacy_full.json")
    args = ap.parse_args(argv)
    if args.report_only:
        if not PATH.is_file():
            ap.error(f"{PATH} does not exist: run some attacks first")
        write_report(json.loads(PATH.read_text()))
        return 0
    torch.set_num_threads(max(1, args.threads))
    profiles = all_profiles()
    unknown = [n for n in args.profiles if n not in profiles]
    if unknown:
        ap.error(f"unknown profile(s) {unknown}; choose from {list(profiles)}")
    from aloe.obfuscation.commands import resolve_model

    model = resolve_model("smollm2")
    budget = Budget()
    bdict = {k: v for k, v in asdict(budget).items() if k != "seed"}
    state = json.loads(PATH.read_text()) if PATH.is_file() else {"profiles": {}}
    stale = stale_attacks(state.get("budget") or {}, bdict)  # a changed knob drops only the attacks it affects
    stale |= {name for name, (base, _, _) in ABLATIONS.items() if base in stale}  # and the ablations built on them
    for e in state["profiles"].values():
        e["attacks"] = {a: r for a, r in e["attacks"].items() if a not in stale}
    command = sys.argv[1:] if argv is None else list(argv)
    commands = state.setdefault("commands", [state.pop("command")] if state.get("command") else [])
    state.pop("command", None)
    if command not in commands:
        commands.append(command)
    state["budget"] = bdict
    revision = source_revision()
    for name in args.profiles:
        prof = profiles[name]
        obf, secret = build(model, prof, not args.json)
        e = state["profiles"].setdefault(name, {"profile": prof.to_dict(), "attacks": {}})
        target, tau, texts = Target(model, obf, budget), load_secret(secret).tau, None
        for a in args.attacks:
            if a in e["attacks"] and not args.rerun:
                continue
            texts = texts or texts_for(target)
            t0 = time.perf_counter()
            base, override, _ = ABLATIONS.get(a, (a, {}, ""))
            tgt = Target(model, obf, replace(budget, **override)) if override else target
            e["attacks"][a] = dict(run(tgt, [base], tau, texts, progress=not args.json)[base],
                                   seconds=time.perf_counter() - t0, commit=revision)
            atomic_write_json(PATH, state)
            write_report(state)
            if not args.json:
                r = e["attacks"][a]
                print(f"{name} {a}: {pct(r['token_recovery'])}% of the vocabulary, "
                      f"{pct(r.get('prompt_token_recovery'))}% of prompt tokens ({r['seconds']:.0f} s)", flush=True)
    write_report(state)
    if args.json:
        print(json.dumps(state, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
