"""Per-operation measurements with the three parties: wall time, rounds, online and offline bits, error.

Inputs are synthetic benchmark data drawn from a fixed public seed (they are not secrets): L owns ``x``, R owns the
second operand. The error is measured on the value revealed to L against the exact float64 result.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from aloe import AloeError
from aloe.mpc import functions as fn
from aloe.mpc.party import Party, run_local, run_processes
from aloe.mpc.tensor import SharedTensor

OPS = ("mul", "matmul", "gt", "relu", "sigmoid", "softmax", "conv2d")
DEFAULT_SHAPES = {
    "mul": ((100, 100), (100, 100)),
    "matmul": ((100, 100), (100, 100)),
    "gt": ((100, 100), (100, 100)),
    "relu": ((100, 100),),
    "sigmoid": ((100, 100),),
    "softmax": ((128, 10),),
    "conv2d": ((32, 1, 28, 28), (16, 1, 5, 5)),
}
SIGMOID_INPUT_BOUND = fn.SIGMOID_FIT_RANGE


def parse_shape(op: str, text: str | None) -> tuple[tuple[int, ...], ...]:
    """``"100x100"`` or, for two operands, ``"32x1x28x28,16x1x5x5"``; default: the issue's shapes."""
    if op not in OPS:
        raise AloeError(f"unknown op {op!r} (choose from {', '.join(OPS)})")
    if not text:
        return DEFAULT_SHAPES[op]
    try:
        shapes = tuple(tuple(int(d) for d in part.lower().split("x")) for part in text.split(","))
    except ValueError:
        raise AloeError(f"bad shape {text!r}: write e.g. 100x100 or 32x1x28x28,16x1x5x5") from None
    if any(d <= 0 for s in shapes for d in s):
        raise AloeError(f"bad shape {text!r}: sizes must be positive")
    need = len(DEFAULT_SHAPES[op])
    if len(shapes) == 1 and need == 2 and op != "conv2d":
        shapes = (shapes[0], shapes[0] if op != "matmul" else shapes[0][::-1])
    if len(shapes) != need:
        raise AloeError(f"{op} takes {need} shape(s)" + (" (input and weight)" if op == "conv2d" else ""))
    if op == "matmul" and shapes[0][-1] != shapes[1][0]:
        raise AloeError("matmul shapes do not chain")
    if op == "conv2d" and (len(shapes[0]) != 4 or len(shapes[1]) != 4 or shapes[0][1] != shapes[1][1]):
        raise AloeError("conv2d takes NCHW input and OIHW weight with matching channels")
    if op == "mul" and shapes[0] != shapes[1]:
        raise AloeError("mul takes two equal shapes")
    return shapes


def make_inputs(op: str, shapes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    if op == "sigmoid":
        xs[0] = (xs[0] * 4).clamp(-SIGMOID_INPUT_BOUND, SIGMOID_INPUT_BOUND)
    elif op == "softmax":
        xs[0] = xs[0] * 2
    elif op == "conv2d":
        xs[1] = xs[1] * 0.2
    return xs


def reference(op: str, xs: list[torch.Tensor]) -> torch.Tensor:
    x = xs[0]
    if op == "mul":
        return x * xs[1]
    if op == "matmul":
        return x @ xs[1]
    if op == "gt":
        return (x > xs[1]).double()
    if op == "relu":
        return x.clamp(min=0)
    if op == "sigmoid":
        return torch.sigmoid(x)
    if op == "softmax":
        return torch.softmax(x, -1)
    return torch.nn.functional.conv2d(x, xs[1])


def _run_op(op: str, a: SharedTensor, b: SharedTensor | None, softmax_steps: int):
    if op == "mul":
        return a * b
    if op == "matmul":
        return a @ b
    if op == "gt":
        return a > b
    if op == "relu":
        return a.relu()
    if op == "sigmoid":
        return a.sigmoid()
    if op == "softmax":
        return a.softmax(steps=softmax_steps)
    return a.conv2d(b)


def bench_program(party: Party, op: str, shapes, reps: int, seed: int, together: bool) -> dict | None:
    """Run ``op`` ``reps + 1`` times (the first is a warm-up) and measure each.

    ``together``: the dealer starts with L and R (its work is inside the timed span, like a trusted third party
    answering requests); otherwise the dealer does its part first and L and R start once every correction has been
    sent ("preprocessed": only the online phase, including the parties' own PRF expansion, is timed)."""
    torch.set_num_threads(1)
    xs = make_inputs(op, shapes, seed)
    steps = fn.softmax_steps(16.0)
    rows = []
    for rep in range(reps + 1):
        a = SharedTensor.from_private(party, xs[0] if party.role == "L" else None, "L", shapes[0])
        b = None
        if len(shapes) > 1:
            b = SharedTensor.from_private(party, xs[1] if party.role == "R" else None, "R", shapes[1])
        if together or not party.is_dealer:
            party.dealer_sync()  # preprocessed: L and R wait here until the dealer has sent everything
        party.sync()
        before = party.stats.snapshot()
        t0, c0 = time.perf_counter(), time.process_time()
        out = _run_op(op, a, b, steps)
        ms = (time.perf_counter() - t0) * 1e3
        cpu_ms = (time.process_time() - c0) * 1e3
        after = party.stats.snapshot()
        if party.is_dealer and not together:
            party.dealer_sync()
        value = out.reveal(to="L")
        if rep == 0:
            continue
        row = {k: after[k] - before[k] for k in after}
        row["depth_before"], row["depth_after"] = before["depth"], after["depth"]
        row["ms"] = ms
        row["cpu_ms"] = cpu_ms
        if party.role == "L":
            row["max_abs_error"] = float((value.double() - reference(op, xs)).abs().max().item())
        rows.append(row)
    # rounds: the longest message chain of the op, from the common start to the last party's finish
    rounds = []
    if not party.is_dealer:
        (other,) = party.exchange([(torch.tensor([[r["depth_before"], r["depth_after"]] for r in rows]), 0)])
        for r, o in zip(rows, other.tolist(), strict=True):
            rounds.append(max(r["depth_after"], o[1]) - max(r["depth_before"], o[0]))
    return {"rows": rows, "softmax_steps": steps, "rounds": rounds}


def summarize(op: str, shapes, results: dict) -> dict:
    n = math.prod(shapes[0])
    rows = {r: results[r]["rows"] for r in ("L", "R", "D")}
    reps = len(rows["L"])
    online = [8 * (rows["L"][i]["online_bytes_sent"] + rows["R"][i]["online_bytes_sent"]) for i in range(reps)]
    offline = [8 * rows["D"][i]["offline_bytes_sent"] for i in range(reps)]
    rounds = [results["L"]["rounds"][i] for i in range(reps)]
    ms = [max(rows["L"][i]["ms"], rows["R"][i]["ms"]) for i in range(reps)]
    cpu = [sum(rows[r][i]["cpu_ms"] for r in ("L", "R", "D")) for i in range(reps)]
    out = {
        "op": op,
        "shape": "," .join("x".join(str(d) for d in s) for s in shapes),
        "elements": n,
        "reps": reps,
        "ms": statistics.median(ms),
        "ms_all": ms,
        "rounds": max(rounds),
        "cpu_ms": statistics.median(cpu),
        "online_bits": statistics.median(online),
        "offline_bits": statistics.median(offline),
        "online_bits_per_element": statistics.median(online) / n,
        "offline_bits_per_element": statistics.median(offline) / n,
        "max_abs_error": max(r["max_abs_error"] for r in rows["L"]),
    }
    if op == "softmax":
        out["softmax_steps"] = results["L"]["softmax_steps"]
    if op == "sigmoid":
        out["input_bound"] = SIGMOID_INPUT_BOUND
    return out


def run_bench(op: str, shape: str | None = None, *, reps: int = 5, processes: bool = True, seed: int = 0,
              together: bool = True, frac_bits: int = 14, timeout: float = 60.0, certs: str | None = None,
              insecure_loopback: bool = False) -> dict:
    """Measure one op with three parties (OS processes on loopback over TLS, unless ``insecure_loopback``; or
    threads with ``processes=False``)."""
    shapes = parse_shape(op, shape)
    if processes:
        results = run_processes(bench_program, op, shapes, reps, seed, together, frac_bits=frac_bits,
                                timeout=timeout, certs=certs, insecure_loopback=insecure_loopback)
    else:
        results = run_local(bench_program, op, shapes, reps, seed, together, frac_bits=frac_bits, timeout=timeout)
    out = summarize(op, shapes, results)
    out["parties"] = "processes" if processes else "threads"
    out["dealer"] = "synchronized" if together else "preprocessed"
    out["frac_bits"] = frac_bits
    return out


def suite_program(party: Party, jobs: list) -> list:
    """Several :func:`bench_program` runs in one launch of the three parties: ``jobs`` holds
    ``(op, shapes, reps, seed, together)`` tuples."""
    return [bench_program(party, *job) for job in jobs]


def run_suite(ops: list[str], *, reps: int = 5, seed: int = 0, frac_bits: int = 14, timeout: float = 120.0,
              preprocessed: bool = True, insecure_loopback: bool = False) -> list[dict]:
    """Measure several ops (default shapes) in one launch of three processes: each op with the dealer synchronized
    (``ms``) and, with ``preprocessed``, again with the dealer's part done first (``online_ms``)."""
    jobs = []
    for op in ops:
        shapes = parse_shape(op, None)
        jobs.append((op, shapes, reps, seed, True))
        if preprocessed:
            jobs.append((op, shapes, reps, seed, False))
    results = run_processes(suite_program, jobs, frac_bits=frac_bits, timeout=timeout,
                            insecure_loopback=insecure_loopback)
    out = []
    for i, (op, shapes, *_rest, together) in enumerate(jobs):
        one = summarize(op, shapes, {r: results[r][i] for r in ("L", "R", "D")})
        if together:
            one["parties"], one["dealer"], one["frac_bits"] = "processes", "synchronized", frac_bits
            out.append(one)
        else:
            out[-1]["online_ms"] = one["ms"]
            out[-1]["online_ms_all"] = one["ms_all"]
    return out


def summarize_party(role: str, op: str, shapes, result: dict) -> dict:
    """One party's own view of :func:`bench_program` (used when the parties run on separate hosts)."""
    n = math.prod(shapes[0])
    rows = result["rows"]
    out = {
        "op": op,
        "role": role,
        "shape": ",".join("x".join(str(d) for d in s) for s in shapes),
        "elements": n,
        "reps": len(rows),
        "ms": statistics.median(r["ms"] for r in rows),
        "online_bits_sent_per_element": statistics.median(8 * r["online_bytes_sent"] for r in rows) / n,
        "offline_bits_per_element": statistics.median(
            8 * (r["offline_bytes_sent"] if role == "D" else r["offline_bytes_received"]) for r in rows) / n,
    }
    if result["rounds"]:
        out["rounds"] = max(result["rounds"])
    if role == "L":
        out["max_abs_error"] = max(r["max_abs_error"] for r in rows)
    return out
