"""AloePri accuracy-vs-privacy table: every profile through the fidelity measure and every attack.

    python benchmarks/privacy.py --quick           # the reduced budget the committed results were measured with
    python benchmarks/privacy.py --profiles balanced --attacks vma behavioural

Artifacts are built once under ``$ALOE_CACHE/privacy/artifacts`` (the secret files beside them) and every finished
(profile, step) is saved to ``benchmarks/results/privacy.json`` at once, so an interrupted run resumes where it
stopped (a changed budget starts the affected entries again). Writes ``privacy.json``, ``privacy.md`` and
``privacy.png`` (perplexity ratio vs the worst attack's recovery, one point per profile).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aloe.assets.cache import atomic_write_json, atomic_write_text, cache_root  # noqa: E402
from aloe.attacks.commands import add_budget_flags, budget_from_args  # noqa: E402
from aloe.attacks.common import Target  # noqa: E402
from aloe.attacks.risk import profile_key, table_from_state  # noqa: E402
from aloe.attacks.suite import ATTACKS, run, texts_for  # noqa: E402
from aloe.attacks.theorem6 import theorem6  # noqa: E402
from aloe.obfuscation.profiles import PROFILES  # noqa: E402
from common import save_png  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# the sweep over alpha_e / alpha_h / lambda (name, base profile, overrides)
SWEEP = [
    ("balanced-ae0.03", "balanced", {"alpha_e": 0.03, "alpha_h": 0.02}),
    ("balanced-ae0.1", "balanced", {"alpha_e": 0.1, "alpha_h": 0.05, "gamma": 1e3}),
    ("balanced-ae1.0", "balanced", {"alpha_e": 1.0, "alpha_h": 0.2}),
    ("paper-lam0.1", "paper", {"lam": 0.1}),
    ("balanced-ae0.3", "balanced", {"alpha_e": 0.3, "alpha_h": 0.1, "gamma": 1e3}),
    ("balanced-light", "balanced", {"alpha_e": 0.01, "alpha_h": 0.005}),
    # the second wave: stronger noise, row-shaped noise, the non-isometric embedding key, noise + adaptation
    ("noise-ae0.6", "balanced", {"alpha_e": 0.6, "alpha_h": 0.25}),
    ("noise-row-ae0.6", "balanced", {"alpha_e": 0.6, "alpha_h": 0.25, "noise_shape": "row"}),
    ("shear1", "balanced", {"embed_shear": 1.0}),
    ("shear1-ae0.3", "balanced", {"embed_shear": 1.0, "alpha_e": 0.3, "alpha_h": 0.1}),
    ("adapt-ae0.6", "balanced", {"alpha_e": 0.6, "alpha_h": 0.25, "adapt_steps": 140, "adapt_lr": 2e-3,
                                 "adapt_rank": 16}),
    ("adapt-row-ae0.6", "balanced", {"alpha_e": 0.6, "alpha_h": 0.25, "noise_shape": "row", "adapt_steps": 200,
                                     "adapt_lr": 2e-3, "adapt_rank": 16}),
    ("noise-row-ae0.4", "balanced", {"alpha_e": 0.4, "alpha_h": 0.15, "noise_shape": "row"}),
]


def method_of(profile: dict) -> str:
    """The family a profile belongs to on the frontier plot."""
    if profile.get("keys") == "paper":
        return "paper keys + noise"
    if profile.get("adapt_steps", 0) > 0:
        return "noise + adaptation"
    if profile.get("embed_shear", 0) > 0:
        return "non-isometric embedding key"
    return "noise only (exact-norm keys)"
QUICK = dict(queries=2048, layers=6, columns=128, sequences=2, seq_len=16, isa_steps=20, isa_shortlist=64,
             ima_tokens=4096, ima_steps=200, tfma_tokens=20000, behaviour_rows=1024,
             behaviour_queries=128, learned_state_ids=2048)
REALISTIC = ("vma", "ia", "nn", "isa", "ima", "tfma", "behavioural", "anchored", "learned")


# the attacks each attack-specific budget knob affects; any other knob affects every attack
KNOB_ATTACKS = {"learned_": ("learned", "decoded", "key-regression"), "keyreg_": ("key-regression",),
                "behaviour_": ("behavioural",), "anchored_": ("anchored",),
                "isa_": ("isa",), "ima_": ("ima",), "tfma_": ("tfma", "sda", "decoded", "sda-decoded"),
                "decode_": ("decoded", "sda-decoded"), "sda_": ("sda", "sda-decoded")}


def stale_attacks(old: dict, new: dict) -> set[str]:
    """The attacks whose stored results were measured at another value of a budget knob. A knob the stored budget
    does not name (added since) stales nothing: its results predate it and used its default."""
    out: set[str] = set()
    for k, v in new.items():
        if k in old and old[k] != v:
            hit = [a for prefix, a in KNOB_ATTACKS.items() if k.startswith(prefix)]
            out.update(hit[0] if hit else (*ATTACKS, "vma_all_columns"))
    return out


def all_profiles() -> dict:
    out = {name: PROFILES[name] for name in ("exact", "balanced", "paper")}
    for name, base, kw in SWEEP:
        out[name] = PROFILES[base].with_overrides(name=name, **kw)
    return out


def build(model: Path, profile, progress: bool) -> tuple[Path, Path]:
    from aloe.obfuscation.commands import calibration_ids
    from aloe.obfuscation.model import obfuscate_checkpoint

    folder = cache_root() / "privacy" / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    out, secret = folder / profile.name, folder / f"{profile.name}.secret.json"
    calib = calibration_ids(model) if profile.keys == "paper" else None
    obfuscate_checkpoint(model, out, secret, profile, calibration_ids=calib, progress=progress)
    return out, secret


def merge_full_budget(state: dict) -> None:
    """Each profile's full-budget results from ``privacy_full.json`` (every id, every layer), as ``<attack>_full``
    attacks: the worst attack and the frontier count them, so a point is never shown safer than its strongest
    measurement."""
    path = RESULTS / "privacy_full.json"
    full = json.loads(path.read_text()).get("profiles", {}) if path.is_file() else {}
    for name, e in state["profiles"].items():
        attacks = e.get("attacks")
        if not attacks or e.get("mitigation"):
            continue
        for key in [k for k in attacks if k.endswith("_full")]:
            del attacks[key]
        for a, r in full.get(name, {}).get("attacks", {}).items():
            attacks[f"{a}_full"] = {k: r[k] for k in ("token_recovery", "prompt_token_recovery", "seconds") if k in r}


def worst(attacks: dict, field: str = "token_recovery") -> float:
    keys = (*REALISTIC, "vma_all_columns", *(k for k in attacks if k.endswith("_full")))
    vals = [attacks[a][field] for a in keys if a in attacks and field in attacks[a]]
    vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
    return max(vals) if vals else float("nan")


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def write_report(state: dict) -> None:
    rows = []
    head = ("| profile | keys | α_e | α_h | β | λ | ppl ratio | greedy agr. | VMA | VMA (all columns) | IA | NN | ISA "
            "| IMA | IMA (known plaintext) | TFMA | behavioural | anchored | learned | full budget | worst | "
            "Thm 6 max p_s |")
    rows.append(head)
    rows.append("|" + "|".join(["---"] * (head.count("|") - 1)) + "|")
    prompt_rows = []
    for name, e in state["profiles"].items():
        p, a, f = e["profile"], e.get("attacks", {}), e.get("fidelity", {})

        def g(k, field="token_recovery", a=a):
            return a.get(k, {}).get(field)

        kp = a.get("ima", {}).get("known_plaintext", {}).get("token_recovery")
        rows.append(f"| {name} | {p['keys']} | {p['alpha_e']} | {p['alpha_h']} | {p['beta']} | "
                    f"{p['lam'] if p['keys'] == 'paper' else '–'} | "
                    f"{f.get('ppl_ratio', float('nan')):.4f} | {pct(f.get('greedy_agreement'))} | "
                    + " | ".join(pct(g(k)) for k in ("vma", "vma_all_columns", "ia", "nn", "isa", "ima"))
                    + f" | {pct(kp)} | "
                    + f"{pct(g('tfma'))} | {pct(g('behavioural'))} | {pct(g('anchored'))} | {pct(g('learned'))} | "
                    + (", ".join(f"{k[:-5]} {pct(g(k))}" for k in sorted(a) if k.endswith("_full")) or "–")
                    + f" | {pct(worst(a))} | "
                    + f"{e.get('theorem6', {}).get('max_single_token_success', float('nan')):.3g} |")
        prompt_rows.append(f"| {name} | " + " | ".join(pct(g(k, 'prompt_token_recovery')) for k in ATTACKS) + " |")
    b = state["budget"]
    md = ["# AloePri privacy table (SmolLM2-135M-Instruct, full vocabulary of 49,152 ids)", "",
          "Produced on a shared 2-core CPU by (each run resumes the one before):", "",
          *[f"    python benchmarks/privacy.py {c}" for c in state.get("commands", [])], "",
          "Recovery (TTRSR) in % of tokens, candidate pool = the whole vocabulary; fixed special ids excluded.",
          "Worst = the largest of the attacks, VMA over all FFN columns included where it was run "
          "(`aloe attack vma --columns 1536`, `vma_full_columns_*.json`), and so are the full-budget results of "
          "`benchmarks/privacy_full.py` (every id, every layer; column 'full budget'); the known-plaintext IMA is "
          "listed apart.", "",
          "Budget: " + ", ".join(f"{k}={v}" for k, v in b.items()), "", *rows, "",
          "## Recovery on the tokens of real prompts (%)", "",
          "| profile | " + " | ".join(ATTACKS) + " |", "|" + "|".join(["---"] * (len(ATTACKS) + 1)) + "|",
          *prompt_rows, "", "## Per-attack details", "", "```json",
          json.dumps({n: e.get("attacks", {}) for n, e in state["profiles"].items()}, indent=1, sort_keys=True,
                     default=str)[:60000], "```", ""]
    atomic_write_text(RESULTS / "privacy.md", "\n".join(md))


def write_plot(state: dict) -> None:
    """The frontier: perplexity ratio against the worst attack's recovery (over the vocabulary, and over the tokens
    of real prompts), one curve per method, the paper's point and ``balanced`` marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    groups: dict[str, list] = {}
    for name, e in state["profiles"].items():
        if "fidelity" not in e or not e.get("attacks") or e.get("mitigation"):
            continue
        groups.setdefault(method_of(e["profile"]), []).append((name, e))
    for ax, field, label in ((axes[0], "token_recovery", "% of the full vocabulary"),
                             (axes[1], "prompt_token_recovery", "% of the tokens of real prompts")):
        for method, rows in sorted(groups.items()):
            pts = sorted((100 * worst(e["attacks"], field), e["fidelity"]["ppl_ratio"], name) for name, e in rows)
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=method)
            for x, y, name in pts:
                special = name in ("paper", "balanced", "private")
                ax.annotate(name, (x, y), fontsize=7 if not special else 8, xytext=(3, 3), textcoords="offset points",
                            fontweight="bold" if special else "normal")
        ax.axhline(1.10, ls="--", lw=0.8, color="grey")
        ax.axvline(5.0, ls=":", lw=0.8, color="grey")
        ax.set_yscale("log")
        ax.set_xlabel(f"worst attack's recovery ({label})")
    axes[0].set_ylabel("perplexity ratio (obfuscated / plain)")
    axes[0].legend(fontsize=7, loc="center right")
    fig.suptitle("AloePri on SmolLM2-135M: accuracy vs privacy (goal: below 1.10 and left of 5%)", fontsize=10)
    fig.tight_layout()
    save_png(fig, RESULTS / "privacy.png")


def publish(state: dict) -> None:
    """Fold in the all-columns VMA and the full-budget runs, then write the report, the plot and the package's
    table of measured risk (read by ``aloe obfuscate``)."""
    for name, e in state["profiles"].items():  # the all-FFN-columns VMA runs (`aloe attack vma --columns 1536`)
        full = RESULTS / f"vma_full_columns_{name}.json"
        if full.is_file() and e.get("attacks"):
            e["attacks"]["vma_all_columns"] = json.loads(full.read_text())["vma"]
    merge_full_budget(state)
    atomic_write_json(RESULTS / "privacy.json", state)
    write_report(state)
    write_plot(state)
    atomic_write_json(ROOT / "src" / "aloe" / "attacks" / "privacy_table.json",
                      table_from_state(state, measured_model()))


def measured_model() -> dict:
    """The model every profile here is measured on: its name and weight fingerprint (an artifact of another model
    does not carry these figures)."""
    from aloe.obfuscation.checkpoint import CheckpointReader
    from aloe.obfuscation.commands import resolve_model

    return {"name": "SmolLM2-135M-Instruct", "sha256": CheckpointReader(resolve_model("smollm2")).fingerprint()}


def mitigate(model: Path, prof, state: dict, budget, attacks: list[str], path: Path, show: bool) -> None:
    """balanced behind a client-held vocabulary: the same artifact, the server holding neither table."""
    from aloe.attacks.mitigation import received_rows_view, split_vocabulary
    from aloe.obfuscation.secret import load_secret

    obf, secret = build(model, prof, show)
    server, client = obf.parent / f"{prof.name}-split", obf.parent / f"{prof.name}-split.client.safetensors"
    if not server.is_dir():
        split_vocabulary(obf, server, client)
    name = f"{prof.name}+client-vocabulary"
    e = state["profiles"].setdefault(name, {})
    e["profile"], e["mitigation"] = prof.to_dict(), "client-held vocabulary"
    e["fidelity"] = dict(state["profiles"][prof.name]["fidelity"], note="identical logits (tested exactness)")
    e["theorem6"] = state["profiles"][prof.name].get("theorem6", {})
    done = e.setdefault("attacks", {})
    target = Target(model, server, budget)
    tau = load_secret(secret).tau
    texts = texts_for(target)
    # the server keeps every embedding vector the client sends: the prompt stream and the prompts themselves
    sent = tau[np.concatenate([texts.stream, *texts.prompts])]
    received_rows_view(target, obf, sent)
    target.prior_plain_ids = texts.prior
    e["received_rows"] = int(len(np.unique(sent)))
    for a in attacks:
        if a not in done:
            done[a] = run(target, [a], tau, texts, progress=show)[a]
            atomic_write_json(path, state)
            write_report(state)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced budget (overrides the budget flags)")
    ap.add_argument("--profiles", nargs="+", default=None, help="default: exact, balanced, paper and the sweep")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--fidelity-tokens", type=int, default=512)
    ap.add_argument("--fidelity-prompts", type=int, default=2)
    ap.add_argument("--fidelity-new-tokens", type=int, default=16)
    ap.add_argument("--mitigation", action="store_true",
                    help="also attack balanced deployed with the client-held vocabulary (aloe.attacks.mitigation)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (adaptation wants every core)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report, plot and package table from the saved results (no attack runs)")
    add_budget_flags(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    budget = budget_from_args(args)
    bdict = {k: v for k, v in asdict(budget).items() if k != "seed"}
    profiles = all_profiles()
    names = args.profiles or list(profiles)
    unknown = [n for n in names if n not in profiles]
    if unknown:
        ap.error(f"unknown profile(s) {unknown}; choose from {list(profiles)}")

    if args.report_only:
        if not (RESULTS / "privacy.json").is_file():
            ap.error(f"--report-only: {RESULTS / 'privacy.json'} does not exist yet")
        publish(json.loads((RESULTS / "privacy.json").read_text()))
        return 0

    from aloe.obfuscation.commands import resolve_model
    from aloe.obfuscation.fidelity import measure_fidelity
    from aloe.obfuscation.secret import load_secret

    model = resolve_model("smollm2")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "privacy.json"
    state = json.loads(path.read_text()) if path.is_file() else {"profiles": {}}
    old = state.get("budget") or {}
    stale = stale_attacks(old, bdict)
    for e in state["profiles"].values():
        for a in stale:
            e.get("attacks", {}).pop(a, None)
    state["budget"] = dict(old, **bdict)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    state.pop("command", None)
    if command not in state.setdefault("commands", []):
        state["commands"].append(command)
    show = not args.json
    steps = tqdm(total=len(names) * (2 + len(args.attacks)), desc="privacy", disable=not show)
    for name in names:
        prof = profiles[name]
        e = state["profiles"].setdefault(name, {})
        if profile_key(e.get("profile", {})) != profile_key(prof.to_dict()):  # parameters changed: measure again
            e.clear()
        e["profile"] = prof.to_dict()
        obf, secret = build(model, prof, show)
        target = Target(model, obf, budget)
        if "fidelity" not in e:
            steps.set_postfix_str(f"{name}: fidelity")
            e["fidelity"] = measure_fidelity(model, obf, secret, n_tokens=args.fidelity_tokens,
                                             n_prompts=args.fidelity_prompts, max_new_tokens=args.fidelity_new_tokens,
                                             progress=False)
            e["theorem6"] = theorem6(target.plain_embed, target.plain_head, prof.alpha_e, prof.alpha_h)
            atomic_write_json(path, state)
        steps.update(2)
        attacks = e.setdefault("attacks", {})
        tau = load_secret(secret).tau
        texts = None
        for a in args.attacks:
            if a not in attacks:
                steps.set_postfix_str(f"{name}: {a}")
                texts = texts or texts_for(target)
                t0 = time.perf_counter()
                attacks[a] = run(target, [a], tau, texts, progress=show)[a]
                attacks[a]["seconds"] = time.perf_counter() - t0
                atomic_write_json(path, state)
                write_report(state)
            steps.update(1)
    steps.close()
    if args.mitigation:
        mitigate(model, profiles["balanced"], state, budget, args.attacks, path, show)
    publish(state)
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
