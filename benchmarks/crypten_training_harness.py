"""CrypTen side of benchmarks/mpc_training.py. Runs inside the CrypTen virtual environment, not with aloe.

Usage: python crypten_training_harness.py DATA.pt OUT.json WORKLOAD[,WORKLOAD...] [WORKLOAD=REPS,...]
(each workload's step is timed REPS times, default 1, and the median reported)
Workloads: ``lr`` (one full-batch epoch of logistic regression on the 5,000 x 20 blobs, columns split between the
two parties, labels from party 1), ``b-avg`` / ``b-max`` (one training step of Network B at batch 128 on MNIST
images from party 0 and labels from party 1). Two parties plus CrypTen's trusted third party (provider TTP), each
its own process over gloo on loopback; momentum SGD (crypten.optim.SGD) as in aloe.
"""

import json
import statistics
import sys
import time
import types

import torch

_stub = types.ModuleType("torch.onnx._internal.registration")
_stub.registry = None
sys.modules["torch.onnx._internal.registration"] = _stub

import crypten  # noqa: E402
import crypten.communicator as comm  # noqa: E402
import crypten.mpc as mpc  # noqa: E402
import crypten.nn as cnn  # noqa: E402


def network_b(pool):
    p = cnn.MaxPool2d if pool == "max" else cnn.AvgPool2d
    return cnn.Sequential(cnn.Conv2d(1, 16, 5), cnn.ReLU(), p(2), cnn.Conv2d(16, 16, 5), cnn.ReLU(), p(2),
                          cnn.Flatten(), cnn.Linear(256, 100), cnn.ReLU(), cnn.Linear(100, 10))


def main():
    data_path, out_path, workloads = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    reps = {k: int(v) for k, v in (item.split("=") for item in sys.argv[4].split(",") if item)} \
        if len(sys.argv) > 4 else {}
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.communicator.verbose = True
    data = torch.load(data_path)

    def one_step(w):
        """One timed training step of workload ``w``: (seconds, communication stats)."""
        torch.manual_seed(0)
        if w == "lr":
            xl, xr, y = data["lr_xl"], data["lr_xr"], data["lr_y"]
            x = crypten.cat([crypten.cryptensor(xl, src=0), crypten.cryptensor(xr, src=1)], dim=1)
            target = crypten.cryptensor(y.unsqueeze(1), src=1)
            model = cnn.Sequential(cnn.Linear(x.shape[1], 1))
            loss_fn = cnn.BCELoss()
            lr = 0.1
        else:
            x = crypten.cryptensor(data["b_x"], src=0)
            target = crypten.cryptensor(torch.nn.functional.one_hot(data["b_y"], 10).float(), src=1)
            model = network_b(w.split("-")[1])
            loss_fn = cnn.CrossEntropyLoss()
            lr = 0.01
        model.encrypt()
        model.train()
        opt = crypten.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        comm.get().barrier()
        comm.get().reset_communication_stats()
        t0 = time.perf_counter()
        out = model(x)
        if w == "lr":
            out = out.sigmoid()
        loss = loss_fn(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds = time.perf_counter() - t0
        return seconds, comm.get().get_communication_stats()

    @mpc.run_multiprocess(world_size=2)
    def party():
        torch.set_num_threads(1)
        rank = comm.get().get_rank()
        results = {}
        for w in workloads:
            times = []
            for _ in range(reps.get(w, 1)):
                seconds, stats = one_step(w)
                times.append(seconds)
            results[w] = {"seconds": times, "rounds": stats["rounds"], "bytes": stats["bytes"]}
        return rank, results

    per_rank = dict(party())
    out = {}
    for w in workloads:
        r0, r1 = per_rank[0][w], per_rank[1][w]
        out[w] = {
            # each repetition's time is the slower rank's; the median over repetitions
            "seconds": statistics.median(max(a, b) for a, b in zip(r0["seconds"], r1["seconds"], strict=True)),
            "repetitions": len(r0["seconds"]),
            "rounds": r1["rounds"],
            # rank 1 never talks to the TTP: its counter (sends + receives) is the traffic between the two parties
            "online_bytes": r1["bytes"],
            # rank 0 also carries the TTP's requests and replies
            "rank0_bytes": r0["bytes"],
        }
    with open(out_path, "w") as fh:
        json.dump({"crypten": crypten.__version__, "torch": torch.__version__, "workloads": out}, fh, indent=2)


if __name__ == "__main__":
    main()
