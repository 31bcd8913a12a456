"""The measured risk of a profile, for an artifact to carry (``aloe.json``) and for ``aloe obfuscate`` to print.

``privacy_table.json`` beside this module is written by ``benchmarks/privacy.py``: for every measured profile, its
fidelity and the full-vocabulary recovery of each attack, with the budget it was measured at. A profile whose
parameters match none of the measured ones is reported as "not measured".
"""

from __future__ import annotations

import json
from pathlib import Path

TABLE = Path(__file__).with_name("privacy_table.json")
IGNORED = ("name", "description", "protects")


def profile_key(profile: dict) -> dict:
    """The parameters that define a profile; a parameter a stored row predates takes its default value."""
    from aloe.obfuscation.profiles import Profile

    full = Profile(name="").to_dict()
    full.update(profile)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in full.items() if k not in IGNORED}


def measured_risk(profile: dict, table: Path = TABLE, source_sha256: str | None = None) -> dict:
    """The measured recovery of a profile with exactly these parameters, or ``{"status": "not measured"}``. The
    figures hold for the model they were measured on: with ``source_sha256`` (the source model's weight
    fingerprint) another model gets ``not measured`` and the name of the model that was."""
    try:
        rows = json.loads(Path(table).read_text())
    except (OSError, ValueError):
        return {"status": "not measured"}
    model = rows.get("model") or {}
    if source_sha256 is not None and model.get("sha256") and model["sha256"] != source_sha256:
        return {"status": "not measured", "measured_on": model.get("name", "another model")}
    for name, row in rows.get("profiles", {}).items():
        if profile_key(row["profile"]) == profile_key(profile):
            return {"status": "measured", "measured_as": name, "measured_on": model.get("name"),
                    "recovery": row["recovery"], "ppl_ratio": row.get("ppl_ratio"), "budget": rows.get("budget"),
                    "source": rows.get("source")}
    return {"status": "not measured"}


def table_from_state(state: dict, model: dict | None = None) -> dict:
    """The compact table shipped with the package, from the benchmark's full state; ``model`` (``name``,
    ``sha256``: the weight fingerprint) is the model it was measured on."""
    out = {"source": "benchmarks/results/privacy.md", "budget": state.get("budget"), "profiles": {}}
    if model is not None:
        out["model"] = model
    for name, e in state.get("profiles", {}).items():
        if not e.get("attacks") or e.get("mitigation"):
            continue
        rec = {a: r["token_recovery"] for a, r in e["attacks"].items()}
        kp = e["attacks"].get("ima", {}).get("known_plaintext")
        if kp:
            rec["ima_known_plaintext"] = kp["token_recovery"]
        out["profiles"][name] = {"profile": e["profile"], "ppl_ratio": e.get("fidelity", {}).get("ppl_ratio"),
                                 "recovery": rec}
    return out
