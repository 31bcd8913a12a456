"""Where one secure Network B training step spends its time, per layer and per party.

Runs one step of Network B at batch 128 (the ``b-avg`` / ``b-max`` workload of ``benchmarks/mpc_training.py``) with
the three parties as OS processes, and times every layer's forward and backward pass (``[i]``: the layer's index in
the secure model), the softmax loss and the update on each party: wall seconds (which include waiting for the other
parties) and CPU seconds of that process (which do not). The parties' CPU seconds summed over a component is what
the component costs the machine; on a 2-core machine shared by three processes, that sum bounds the wall time from
below (at half of it).

Usage: python benchmarks/mpc_step_profile.py [--pool avg|max] [--sign-bits 31] [--drelu gmodule|prefix] [--quick]
[--json]
``--quick`` runs a batch of 16 instead of 128.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from aloe.mpc.nn import data as D  # noqa: E402
from aloe.mpc.nn import train as T  # noqa: E402
from aloe.mpc.party import run_processes  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

ROLES = ("L", "R", "D")


def _timed(fn, times: dict, key_of):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        key = key_of(args)
        wall, cpu = times.get(key, (0.0, 0.0))
        times[key] = (wall + time.perf_counter() - t0, cpu + time.process_time() - c0)
        return out
    return wrapper


def profiled_program(party, cfg: T.TrainConfig, lay) -> dict:
    """``train_program`` with timers around each layer (this process only: the patches die with it)."""
    from aloe.mpc.nn import layers as L
    from aloe.mpc.nn import optim as O

    times: dict = {}
    for cls in (L.Dense, L.Conv2d, L.ReLU, L.MaxPool2d, L.AvgPool2d, L.Flatten):
        for meth in ("forward", "backward"):
            def key_of(args, c=cls.__name__, m=meth):
                return f"{args[0].index:02d} {c}.{m}"

            setattr(cls, meth, _timed(getattr(cls, meth), times, key_of))
    O.SGD.step = _timed(O.SGD.step, times, lambda args: "99 SGD.step")
    T.softmax_ce_grad = _timed(T.softmax_ce_grad, times, lambda args: "50 softmax loss")
    T._share_batch = _timed(T._share_batch, times, lambda args: "00 share batch")
    secure_model = T.secure_model

    def indexed(*args, **kwargs):
        net = secure_model(*args, **kwargs)
        for i, layer in enumerate(net.layers):
            layer.index = i
        return net

    T.secure_model = indexed
    res = T.train_program(party, cfg, lay, None)
    return {"times": times, "train_seconds": (res or {}).get("train_seconds")}


def measure(pool: str, batch: int, sign_bits: int = T.DEFAULT_SIGN_BITS, drelu: str = T.DEFAULT_DRELU) -> dict:
    cfg = T.TrainConfig(model="b", pool=pool, limit=batch, batch=batch, epochs=1, lr=0.01, sign_bits=sign_bits,
                        drelu=drelu,
                        checkpoint_dir=tempfile.mkdtemp(prefix="aloe-profile-"), timeout=600.0)
    lay = D.layout(cfg.model, cfg.dataset, cfg.limit, cfg.blobs)
    res, stats = run_processes(profiled_program, cfg, lay, timeout=600.0, return_stats=True)
    def order(k: str) -> tuple:  # the step's order: sharing, forward, loss, backward (last layer first), update
        i = int(k[:2])
        if k.endswith("forward"):
            return (1, i)
        if k.endswith("backward"):
            return (3, -i)
        return {0: (0, 0), 50: (2, 0)}.get(i, (4, 0))

    keys = sorted(res["L"]["times"], key=order)
    rows = []
    for k in keys:
        name = k[3:]
        row = {"component": name if not name.endswith(("forward", "backward")) else f"{name} [{int(k[:2])}]"}
        for r in ROLES:
            wall, cpu = res[r]["times"].get(k, (0.0, 0.0))
            row[f"{r}_wall"], row[f"{r}_cpu"] = wall, cpu
        row["cpu_sum"] = sum(row[f"{r}_cpu"] for r in ROLES)
        rows.append(row)
    return {"pool": pool, "batch": batch, "sign_bits": sign_bits, "drelu": drelu,
            "train_seconds": res["L"]["train_seconds"],
            "rounds": stats["L"]["depth"],
            "online_bytes": stats["L"]["online_bytes_sent"] + stats["R"]["online_bytes_sent"], "rows": rows,
            "load_average": os.getloadavg()[0]}


def markdown(r: dict) -> str:
    lines = [f"Network B step, batch {r['batch']}, {r['pool']}-pool, sign read from bit {r['sign_bits']} "
             f"({r['drelu']} DReLU): "
             f"L's training loop {r['train_seconds']:.2f} s "
             f"(load average {r['load_average']:.1f} on {os.cpu_count()} cores).", "",
             "| component | L wall | L CPU | R wall | R CPU | dealer wall | dealer CPU | CPU, 3 parties |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if row["cpu_sum"] < 0.005 and row["L_wall"] < 0.005:
            continue
        cells = " | ".join(f"{row[f'{p}_{k}']:.2f}" for p in ROLES for k in ("wall", "cpu"))
        lines.append(f"| {row['component']} | {cells} | {row['cpu_sum']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in r["rows"] if row["cpu_sum"] >= 0.005]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for role in ROLES:
        vals = [row[f"{role}_cpu"] for row in rows]
        ax.barh(range(len(rows)), vals, left=left, label={"D": "dealer"}.get(role, role))
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([row["component"] for row in rows])
    ax.invert_yaxis()
    ax.set_xlabel("CPU seconds")
    ax.set_title(f"Network B step (batch {r['batch']}, {r['pool']}-pool): CPU per component and party")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", choices=["avg", "max"], default="avg")
    ap.add_argument("--sign-bits", type=int, default=T.DEFAULT_SIGN_BITS,
                    help=f"the ReLU/max-pool compare's sign bit (default {T.DEFAULT_SIGN_BITS}; 63: the full compare)")
    ap.add_argument("--drelu", choices=["gmodule", "prefix"], default=T.DEFAULT_DRELU,
                    help=f"how ReLU and max-pool compute the sign (default {T.DEFAULT_DRELU})")
    ap.add_argument("--quick", action="store_true", help="batch 16 instead of 128")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = measure(args.pool, 16 if args.quick else 128, args.sign_bits, args.drelu)
    cmd = ("python benchmarks/mpc_step_profile.py" + (" --quick" if args.quick else "") + f" --pool {args.pool}"
           + ("" if args.sign_bits == T.DEFAULT_SIGN_BITS else f" --sign-bits {args.sign_bits}")
           + ("" if args.drelu == T.DEFAULT_DRELU else f" --drelu {args.drelu}"))
    md = f"# Secure Network B step: time per layer and party\n\nCommand: `{cmd}`\n\n" + markdown(result)
    write_results("mpc_step_profile", {**result, "command": cmd}, md)
    plot(result, RESULTS / "mpc_step_profile.png")
    print(json.dumps(result, indent=2) if args.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
