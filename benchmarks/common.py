"""Shared helpers of the benchmark scripts: JSON/markdown output and timing."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

from aloe.assets.cache import atomic_write_json, atomic_write_text  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Runs the measured command as its child and writes the child's peak RSS (KB) to argv[1]. A process's peak RSS
# starts at its parent's peak at fork time (Linux carries the forking mm's high-water mark across exec), so a
# large benchmark process would set a floor under every child it measures; this launcher is small when it forks.
_LAUNCHER = """import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 255)
"""


def run_measured(cmd: list[str], what: str, stderr=subprocess.DEVNULL) -> tuple[bytes, float, float]:
    """Run ``cmd`` from the repository (``src`` on the path): its stdout, wall seconds and peak RSS in MB (of the
    command alone, measured through a small launcher process); a failed run ends the benchmark with one line naming
    ``what``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak_kb"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(peak_file), *cmd], stdout=subprocess.PIPE,
                                stderr=stderr, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
        stdout = proc.stdout.read()
        status = proc.wait()
        seconds = time.perf_counter() - t0
        if status != 0 or not peak_file.exists():
            raise SystemExit(f"{what} failed")
        peak_kb = int(peak_file.read_text())
    return stdout, seconds, peak_kb / 1024


def save_png(fig, path: Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure to ``path`` through a temporary file renamed into place (a run killed while it
    draws leaves no half-written plot) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns`` = [(key, header)]; floats get 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def resumed_report_head(title: str, script: str, commands: list[list[str]]) -> list[str]:
    """The first lines of a resumable benchmark's markdown report: its title and every command that made it."""
    return [f"# {title}", "", "Produced on a shared 2-core CPU by (each run resumes the one before):", "",
            *(f"    python benchmarks/{script} {' '.join(c)}" for c in commands), ""]


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    atomic_write_json(jpath, payload)
    atomic_write_text(mpath, markdown)
    return jpath, mpath


def publish(name: str, payload: dict, markdown: str, as_json: bool) -> int:
    """Write the results and print them (JSON with ``--json``, else the markdown); the exit code."""
    write_results(name, payload, markdown)
    print(json.dumps(payload, indent=2) if as_json else markdown)
    return 0


def load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


WAN_DELAYS_MS = (2.5, 25.0)


def latency_projection(rows: list[dict], name_key: str, aloe_key: str, crypten_key: str, ms_per_unit: float,
                       digits: int, caption: str) -> list[str]:
    """Markdown lines of the projection ``time + rounds x one-way delay`` for each delay of ``WAN_DELAYS_MS``
    (``ms_per_unit``: milliseconds per unit of the time columns). A projection, not a measurement: this kernel
    has no ``netem`` to emulate latency."""
    lines = ["", caption, "",
             f"| {name_key.replace('_', ' ')} | " + " | ".join(f"aloe @{d} ms | CrypTen @{d} ms"
                                                               for d in WAN_DELAYS_MS) + " |",
             "|---|" + "---|---|" * len(WAN_DELAYS_MS)]
    for r in rows:
        cells = []
        for d in WAN_DELAYS_MS:
            cells += [f"{r[aloe_key] + r['aloe_rounds'] * d / ms_per_unit:.{digits}f}",
                      f"{r[crypten_key] + r['crypten_rounds'] * d / ms_per_unit:.{digits}f}"]
        lines.append(f"| {r[name_key]} | " + " | ".join(cells) + " |")
    return lines


def t_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% Student-t interval of ``values`` (nan bounds below two values)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)
