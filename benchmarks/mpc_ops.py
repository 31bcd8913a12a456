"""aloe's MPC engine vs CrypTen, op by op, side by side in one run.

Both run two computing parties plus a third party for correlated randomness (aloe: the dealer; CrypTen: its trusted
third party, provider TTP), each party its own process on loopback, same shapes and inputs: mul / matmul / gt /
relu / sigmoid on 100x100, softmax on 128x10, conv2d 32x1x28x28 with 16x1x5x5.

CrypTen 0.4.1 is installed into its own virtual environment under the aloe cache the first time (pip with
``--no-deps`` because its ``sklearn`` dependency no longer installs; torch and numpy come from this interpreter's
environment through a ``.pth`` file, so the same torch 2.13 runs both). ``torch.onnx._internal.registration`` does
not exist in torch 2.13; the harness registers a stub so ``import crypten`` works (only ONNX import is lost).

``--wan`` repeats both inside a network namespace created with ``unshare -n`` whose loopback is rate-limited by a
``tbf`` queue (100 Mbit/s). This kernel has no ``netem`` qdisc, so latency cannot be emulated; the report adds a
projection ``ms + rounds x one-way delay`` for 2.5 ms and 25 ms, labelled as a projection.

Usage: python benchmarks/mpc_ops.py [--quick] [--reps N] [--ops a,b] [--wan] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from aloe import AloeError  # noqa: E402
from aloe.assets.cache import atomic_write_json, atomic_write_text, cache_root  # noqa: E402
from aloe.mpc.bench import DEFAULT_SHAPES, OPS, run_suite  # noqa: E402
from common import latency_projection  # noqa: E402

CRYPTEN_PINS = [
    "crypten==0.4.1",
    "omegaconf==2.3.0",
    "antlr4-python3-runtime==4.9.3",
    "pyyaml==6.0.4",
    "onnx==1.23.2",
    "protobuf==7.36.2",
    "ml_dtypes==0.6.0",
    "pandas==3.1.1",
    "future==1.0.0",
    "pytz==2026.6",
]
# Morse-STF figures derived from its code (shared/reference/mpc.md, section 5): online bits per element, rounds
MORSE_TARGETS = {
    "gt": (1000, 4),
    "relu": (1130, 5),
    "sigmoid": (38, 1),
    "softmax": (6350, 32),
    "mul": (256, 1),
    "matmul": (None, 1),
    "conv2d": (None, 1),
}


def crypten_python() -> Path:
    """The CrypTen environment's interpreter, created on first use."""
    venv = cache_root() / "mpc-bench" / "crypten-venv"
    py = venv / "bin" / "python"
    stub = ("import sys,types;m=types.ModuleType('r');m.registry=None;"
            "sys.modules['torch.onnx._internal.registration']=m;")
    check = [str(py), "-c", stub + "import crypten"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    print(f"creating the CrypTen environment in {venv} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(py), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "aloe-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *CRYPTEN_PINS], check=True)
    if subprocess.run(check, capture_output=True).returncode != 0:
        raise AloeError("CrypTen installed but does not import")
    return py


def run_crypten(ops: list[str], reps: int) -> dict:
    py = crypten_python()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "crypten.json"
        shapes = json.dumps({op: DEFAULT_SHAPES[op] for op in ops})  # the same shapes as aloe's side
        proc = subprocess.run([str(py), str(HERE / "crypten_ops_harness.py"), str(out), str(reps), ",".join(ops),
                               shapes],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not out.exists():
            raise AloeError(f"CrypTen harness failed: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.read_text())


def measure(ops: list[str], reps: int) -> dict:
    aloe = {r["op"]: r for r in run_suite(ops, reps=reps)}
    crypten = run_crypten(ops, reps)
    rows = []
    for op in ops:
        a, c = aloe[op], crypten["ops"][op]
        target_bits, target_rounds = MORSE_TARGETS[op]
        rows.append({
            "op": op,
            "shape": a["shape"],
            "aloe_ms": a["ms"],
            "aloe_online_ms": a.get("online_ms"),
            "crypten_ms": c["ms"],
            "ratio_ms": a["ms"] / c["ms"],
            "aloe_cpu_ms": a["cpu_ms"],
            "crypten_cpu_ms_parties": c["cpu_ms"],
            "aloe_rounds": a["rounds"],
            "crypten_rounds": c["rounds"],
            "morse_rounds": target_rounds,
            "aloe_online_bits_per_element": a["online_bits_per_element"],
            "crypten_online_bits_per_element": c["online_bits_per_element"],
            "morse_online_bits_per_element": target_bits,
            "aloe_offline_bits_per_element": a["offline_bits_per_element"],
            "crypten_rank0_bits_per_element": c["rank0_bits_per_element"],
            "aloe_max_abs_error": a["max_abs_error"],
            "crypten_max_abs_error": c["max_abs_error"],
            "aloe_ms_all": a["ms_all"],
            "crypten_ms_all": c["ms_all"],
        })
    return {"crypten_version": crypten["crypten"], "torch": crypten["torch"], "reps": reps, "rows": rows}


def markdown(result: dict, title: str, wan: bool = False) -> str:
    lines = [f"### {title}", ""]
    head = ("| op | shape | aloe ms | aloe online ms | CrypTen ms | aloe/CrypTen | CPU ms aloe (3 procs) / CrypTen "
            "(2 parties) | rounds aloe / CrypTen / Morse | online bits/elt aloe / CrypTen / Morse | "
            "aloe offline bits/elt | max err aloe / CrypTen |")
    lines += [head, "|" + "---|" * 11]
    for r in result["rows"]:
        morse_bits = "-" if r["morse_online_bits_per_element"] is None else f"{r['morse_online_bits_per_element']:,}"
        online = "-" if r["aloe_online_ms"] is None else f"{r['aloe_online_ms']:.1f}"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['aloe_ms']:.1f} | {online} | {r['crypten_ms']:.1f} | "
            f"{r['ratio_ms']:.2f} | {r['aloe_cpu_ms']:.0f} / {r['crypten_cpu_ms_parties']:.0f} | "
            f"{r['aloe_rounds']} / {r['crypten_rounds']} / {r['morse_rounds']} | "
            f"{r['aloe_online_bits_per_element']:,.0f} / {r['crypten_online_bits_per_element']:,.0f} / {morse_bits} | "
            f"{r['aloe_offline_bits_per_element']:,.0f} | {r['aloe_max_abs_error']:.2g} / "
            f"{r['crypten_max_abs_error']:.2g} |"
        )
    if wan:
        lines += latency_projection(result["rows"], "op", "aloe_ms", "crypten_ms", 1.0, 0,
                                    "Projection with latency (no netem on this kernel): ms + rounds x one-way delay.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ops = [r["op"] for r in rows]
    x = range(len(ops))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar([i - 0.2 for i in x], [r["aloe_ms"] for r in rows], 0.4, label="aloe")
    axes[0].bar([i + 0.2 for i in x], [r["crypten_ms"] for r in rows], 0.4, label="CrypTen (TTP)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("wall ms (median)")
    axes[1].bar([i - 0.2 for i in x], [r["aloe_online_bits_per_element"] for r in rows], 0.4, label="aloe")
    axes[1].bar([i + 0.2 for i in x], [r["crypten_online_bits_per_element"] for r in rows], 0.4, label="CrypTen")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("online bits / element (both parties)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(ops)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--wan", action="store_true", help="also run inside a rate-limited network namespace")
    ap.add_argument("--inner", choices=["wan"], help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ops = [o for o in args.ops.split(",") if o]
    if any(o not in OPS for o in ops):
        raise SystemExit(f"unknown op in {args.ops}")
    reps = 3 if args.quick else args.reps
    out_dir = HERE / "results"
    if args.inner == "wan":  # running inside the namespace: print JSON only
        print(json.dumps(measure(ops, reps)))
        return 0
    lan = measure(ops, reps)
    report = {"lan": lan, "machine": f"{os.cpu_count()} CPU cores, loopback", "mode": "quick" if args.quick else "full",
              "channels": {"aloe": "TLS 1.3", "crypten": "plain TCP"}}
    md = ["# aloe MPC engine vs CrypTen (side by side, one run)", "",
          f"Command: `python benchmarks/mpc_ops.py{' --quick' if args.quick else ''}{' --wan' if args.wan else ''}`"
          f" ({reps} timed repetitions after a warm-up; medians). CrypTen {lan['crypten_version']} with provider TTP, "
          f"torch {lan['torch']}. Online bits: both parties summed (aloe: bytes on the L-R channel including frames; "
          "CrypTen: rank 1's counter, which counts its sends and receives). aloe ms: dealer starts with the "
          "parties; aloe online ms: the dealer's corrections were sent before the clock starts. Channels: aloe's "
          "are TLS 1.3 (its default; `benchmarks/mpc_tls.py` measures what TLS costs against plain channels), "
          "CrypTen's plain TCP (it has no TLS).", "",
          markdown(lan, "LAN (loopback)")]
    if args.wan:
        cmd = ("ip link set lo up && tc qdisc add dev lo root tbf rate 100mbit burst 1mbit latency 100ms && "
               f"{sys.executable} {Path(__file__).resolve()} --inner wan --reps {reps} --ops {','.join(ops)}")
        proc = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise AloeError(f"WAN run failed: {proc.stderr.strip().splitlines()[-1:]}")
        wan = json.loads(proc.stdout.strip().splitlines()[-1])
        report["wan_100mbit"] = wan
        md.append(markdown(wan, "WAN: 100 Mbit/s loopback (tbf) in a private network namespace", wan=True))
    atomic_write_json(out_dir / "mpc_ops.json", report)
    atomic_write_text(out_dir / "mpc_ops.md", "\n".join(md))
    plot(lan, out_dir / "mpc_ops.png", "aloe vs CrypTen, LAN")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
