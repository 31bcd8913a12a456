"""CrypTen side of benchmarks/mpc_ops.py. Runs inside the CrypTen virtual environment, not with aloe.

Usage: python crypten_ops_harness.py OUT.json REPS OP[,OP...]. Two parties plus CrypTen's trusted third party
(provider TTP), each its own process over gloo on loopback; the same shapes and input distributions as aloe's bench.
"""

import json
import statistics
import sys
import time
import types

import torch

# torch 2.13 has no torch.onnx._internal.registration, which crypten.nn.onnx_converter imports; a stub loses only
# the ONNX model import, not the MPC engine
_stub = types.ModuleType("torch.onnx._internal.registration")
_stub.registry = None
sys.modules["torch.onnx._internal.registration"] = _stub

import crypten  # noqa: E402
import crypten.communicator as comm  # noqa: E402
import crypten.mpc as mpc  # noqa: E402

SHAPES: dict[str, list[list[int]]] = {}  # filled from the command line: the shapes aloe's side uses


def inputs(op):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES[op]]
    if op == "sigmoid":
        xs[0] = (xs[0] * 4).clamp(-12, 12)
    elif op == "softmax":
        xs[0] = xs[0] * 2
    elif op == "conv2d":
        xs[1] = xs[1] * 0.2
    return [x.float() for x in xs]


def reference(op, xs):
    x = xs[0].double()
    if op == "mul":
        return x * xs[1].double()
    if op == "matmul":
        return x @ xs[1].double()
    if op == "gt":
        return (x > xs[1].double()).double()
    if op == "relu":
        return x.clamp(min=0)
    if op == "sigmoid":
        return torch.sigmoid(x)
    if op == "softmax":
        return torch.softmax(x, -1)
    return torch.nn.functional.conv2d(x, xs[1].double())


def run(op, a, b):
    if op == "mul":
        return a * b
    if op == "matmul":
        return a.matmul(b)
    if op == "gt":
        return a.gt(b)
    if op == "relu":
        return a.relu()
    if op == "sigmoid":
        return a.sigmoid()
    if op == "softmax":
        return a.softmax(1)
    return a.conv2d(b)


def main():
    out_path, reps, ops = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    SHAPES.update(json.loads(sys.argv[4]))
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.communicator.verbose = True

    @mpc.run_multiprocess(world_size=2)
    def party():
        torch.set_num_threads(1)
        rank = comm.get().get_rank()
        results = {}
        for op in ops:
            xs = inputs(op)
            rows = []
            for rep in range(reps + 1):
                a = crypten.cryptensor(xs[0], src=0)
                b = crypten.cryptensor(xs[1], src=1) if len(xs) > 1 else None
                comm.get().barrier()
                comm.get().reset_communication_stats()
                t0, c0 = time.perf_counter(), time.process_time()
                y = run(op, a, b)
                ms = (time.perf_counter() - t0) * 1e3
                cpu_ms = (time.process_time() - c0) * 1e3
                stats = comm.get().get_communication_stats()
                value = y.get_plain_text()
                if rep == 0:
                    continue
                err = float((value.double() - reference(op, xs)).abs().max())
                rows.append({"ms": ms, "cpu_ms": cpu_ms, "rounds": stats["rounds"], "bytes": stats["bytes"],
                             "max_abs_error": err})
            results[op] = rows
        return rank, results

    per_rank = dict(party())
    out = {}
    for op in ops:
        r0, r1 = per_rank[0][op], per_rank[1][op]
        n = 1
        for d in SHAPES[op][0]:
            n *= d
        ms = [max(a["ms"], b["ms"]) for a, b in zip(r0, r1)]
        out[op] = {
            "ms": statistics.median(ms),
            "ms_all": ms,
            # CPU time of the two computing parties (the TTP process is not included)
            "cpu_ms": statistics.median(a["cpu_ms"] + b["cpu_ms"] for a, b in zip(r0, r1)),
            "rounds": r1[0]["rounds"],
            # rank 1 never talks to the TTP: its counter (sends + receives) is the online traffic of both parties
            "online_bits_per_element": 8 * statistics.median(r["bytes"] for r in r1) / n,
            # rank 0 also carries the TTP requests and replies
            "rank0_bits_per_element": 8 * statistics.median(r["bytes"] for r in r0) / n,
            "max_abs_error": max(r["max_abs_error"] for r in r0),
            "elements": n,
        }
    with open(out_path, "w") as fh:
        json.dump({"crypten": crypten.__version__, "torch": torch.__version__, "ops": out}, fh, indent=2)


if __name__ == "__main__":
    main()
