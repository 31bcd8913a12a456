"""What bounds the conversion speed on the real SmolLM2-135M: the ``exact`` profile converted to float32 in a child
process with every stage timed (time.perf_counter wrappers, exclusive: a stage's time excludes the stages it calls),
the key GEMMs' FLOP rate against the fp32 GEMM rate measured in the same run, and the child's peak RSS against twice
the largest tensor.

    python benchmarks/conversion_profile.py [--threads N] [--json]

The plain SmolLM2 folder comes from the cache (``aloe assets build smollm2`` builds it). The output is written to a
temporary folder and deleted. Writes benchmarks/results/conversion_profile.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import publish, run_measured
from obfuscation_fidelity import conversion_flops, gemm_gflops

# (key, label) in the order of the table; "other" is what no wrapper claims
STAGES = [
    ("fingerprint", "source fingerprint (SHA-256 of the weight files)"),
    ("special_ids", "special token ids (tokenizer load)"),
    ("config_check", "output config loaded in transformers first (its config class imported)"),
    ("rope", "RoPE frequencies (the model's config read)"),
    ("plan", "plan: tau, INIT of the keys, factored float32 keys (draws excluded)"),
    ("draws", "secret draws (AES-CTR stream: normals, uniforms, permutations, Haar QR)"),
    ("read", "reading input tensors (safetensors + finiteness check)"),
    ("key_gemm", "key GEMMs (Float32Keys read / write / write_t)"),
    ("vocab", "vocabulary tables (row gather + GEMM with the key)"),
    ("write", "writing shards (cast, append, assemble)"),
    ("other", "other (transform glue: gathers, gamma folding, per-head A products, biases, side files)"),
]


class StageTimer:
    """Exclusive wall time per stage: a stage entered inside another is subtracted from the outer one."""

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k, _ in STAGES}
        self.cpu_seconds = {k: 0.0 for k, _ in STAGES}
        self.calls = {k: 0 for k, _ in STAGES}
        self.flops = {"key_gemm": 0, "vocab": 0}
        # how far each stage raised the peak RSS (the high-water mark, checked at every stage boundary)
        self.peak_raised_mb = {k: 0.0 for k, _ in STAGES}
        self.hwm = peak_rss_mb()
        self.peak_stage = None
        self.stack: list[list] = []   # [stage, start, cpu start, nested wall, nested cpu]

    def _high_water(self, stage: str) -> None:
        hwm = peak_rss_mb()
        if hwm > self.hwm:
            self.peak_raised_mb[stage] += hwm - self.hwm
            self.hwm, self.peak_stage = hwm, stage

    def enter(self, stage: str) -> None:
        self._high_water(self.stack[-1][0] if self.stack else "other")
        self.stack.append([stage, time.perf_counter(), time.process_time(), 0.0, 0.0])

    def leave(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        stage, start, cpu_start, nested, nested_cpu = self.stack.pop()
        self._high_water(stage)
        self.seconds[stage] += wall - start - nested
        self.cpu_seconds[stage] += cpu - cpu_start - nested_cpu
        self.calls[stage] += 1
        if self.stack:
            self.stack[-1][3] += wall - start
            self.stack[-1][4] += cpu - cpu_start

    def wrap(self, stage: str, fn, count_flops: bool = False):
        def timed(*args, **kwargs):
            self.enter(stage)
            try:
                if not count_flops:
                    return fn(*args, **kwargs)
                with FlopCounterMode(display=False) as fc:
                    out = fn(*args, **kwargs)
                self.flops[stage] += fc.get_total_flops()
                return out
            finally:
                self.leave()
        return timed

    def wrap_generator(self, stage: str, fn):
        """``fn`` returns a generator: time (and count the FLOPs of) each step of it."""
        def timed(*args, **kwargs):
            gen = fn(*args, **kwargs)
            while True:
                self.enter(stage)
                try:
                    with FlopCounterMode(display=False) as fc:
                        item = next(gen)
                except StopIteration:
                    return
                finally:
                    self.leave()
                self.flops[stage] += fc.get_total_flops()
                yield item
        return timed


def instrument(timer: StageTimer) -> None:
    from aloe.obfuscation import model
    from aloe.obfuscation.checkpoint import CheckpointReader, ShardWriter
    from aloe.obfuscation.keys import Float32Keys
    from aloe.obfuscation.rng import SecureRandom

    CheckpointReader.fingerprint = timer.wrap("fingerprint", CheckpointReader.fingerprint)
    CheckpointReader.tensor = timer.wrap("read", CheckpointReader.tensor)
    model.special_token_ids = timer.wrap("special_ids", model.special_token_ids)
    model.make_plan = timer.wrap("plan", model.make_plan)
    model.rope_inv_freq = timer.wrap("rope", model.rope_inv_freq)
    model.check_output_config = timer.wrap("config_check", model.check_output_config)
    Float32Keys.__init__ = timer.wrap("plan", Float32Keys.__init__)
    for name in ("uniform", "normal", "permutation", "orthogonal"):
        setattr(SecureRandom, name, timer.wrap("draws", getattr(SecureRandom, name)))
    for name in ("read", "write", "write_t"):
        setattr(Float32Keys, name, timer.wrap("key_gemm", getattr(Float32Keys, name), count_flops=True))
    model.table_rows_f32 = timer.wrap_generator("vocab", model.table_rows_f32)
    for name in ("add", "add_rows", "_flush", "close"):
        setattr(ShardWriter, name, timer.wrap("write", getattr(ShardWriter, name)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(src: str, out: str, threads: int) -> None:
    """The instrumented conversion; prints one JSON line."""
    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (imported before the baseline: the conversion loads the tokenizer with it)

    from aloe.obfuscation.model import obfuscate_checkpoint
    from aloe.obfuscation.profiles import PROFILES

    timer = StageTimer()
    instrument(timer)
    out_dir = Path(out)
    baseline_rss, baseline_peak = rss_mb(), peak_rss_mb()
    timer.hwm = baseline_peak
    t0, c0 = time.perf_counter(), time.process_time()
    summary = obfuscate_checkpoint(Path(src), out_dir, out_dir.with_name(out_dir.name + ".secret"),
                                   PROFILES["exact"], dtype="float32", progress=False)
    total, cpu_total = time.perf_counter() - t0, time.process_time() - c0
    timer._high_water("other")
    timer.seconds["other"] = total - sum(v for k, v in timer.seconds.items() if k != "other")
    timer.cpu_seconds["other"] = cpu_total - sum(v for k, v in timer.cpu_seconds.items() if k != "other")
    print(json.dumps({"seconds": total, "cpu_seconds": cpu_total, "stages": timer.seconds,
                      "cpu_stages": timer.cpu_seconds, "peak_raised_mb": timer.peak_raised_mb,
                      "peak_stage": timer.peak_stage, "calls": timer.calls, "flops": timer.flops,
                      "d_out": summary["obfuscated_hidden_size"], "threads": torch.get_num_threads(),
                      "baseline_rss_mb": baseline_rss, "peak_before_conversion_mb": baseline_peak,
                      "out_bytes": sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))}))


def tensor_sizes(src: Path, d_out: int) -> dict:
    """The largest input tensor (stored dtype) and the largest output tensor (float32), in MB."""
    from safetensors import safe_open

    largest_in, largest_out = 0, 0
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for name in f.keys():
            s = f.get_slice(name)
            shape, dtype = s.get_shape(), s.get_dtype()
            n = 1
            for x in shape:
                n *= x
            size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[dtype]
            largest_in = max(largest_in, n * size)
            if len(shape) == 2:   # every matrix keeps one side and widens the hidden one to d'
                largest_out = max(largest_out, 4 * max(shape) * d_out)
    return {"largest_in_tensor_mb": largest_in / 2 ** 20, "largest_out_tensor_mb": largest_out / 2 ** 20}


def gemm_rates() -> tuple[float, float]:
    """The fp32 GEMM rate (``gemm_gflops``) by wall time, and by CPU time: the wall rate times the call's wall over
    its CPU seconds, i.e. the rate a core gives while it runs (the figure to compare CPU seconds with; with one
    thread, a loaded machine slows the wall rate but not this one)."""
    w0, c0 = time.perf_counter(), time.process_time()
    wall_rate = gemm_gflops(torch.float32)
    return wall_rate, wall_rate * (time.perf_counter() - w0) / (time.process_time() - c0)


_FIRST_CALL_CHILD = """
import json, sys, time
from pathlib import Path
import transformers
from transformers import AutoTokenizer
from aloe.obfuscation.architectures import rope_inv_freq, rotary_class_inv_freq
from aloe.obfuscation.model import _fast_tokenizer_special_ids
src, vocab, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
if how == "special:tokenizers":
    out = sorted(_fast_tokenizer_special_ids(src, vocab))
elif how == "special:transformers":
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = {int(i) for i in tok.all_special_ids} | {int(i) for i in tok.added_tokens_decoder}
    out = sorted(ids | set(range(len(tok), vocab)))
elif how == "rope:config":
    out = rope_inv_freq(src, "llama").tolist()
else:
    out = rotary_class_inv_freq(transformers.AutoConfig.from_pretrained(str(src)), "llama").tolist()
print(json.dumps({"seconds": time.perf_counter() - t, "out": out}))
"""


def first_calls_side_by_side(src: Path, vocab_size: int, pair: tuple[str, str], repeats: int = 3) -> dict:
    """Two ways of one step of the conversion, each the first call of a fresh process that has imported
    transformers and aloe, as the conversion's is; alternating, medians."""
    times: dict[str, list[float]] = {how: [] for how in pair}
    outs: dict[str, list] = {}
    for _ in range(repeats):
        for how in pair:
            res = subprocess.run([sys.executable, "-c", _FIRST_CALL_CHILD, str(src), str(vocab_size), how],
                                 check=True, capture_output=True, text=True).stdout
            got = json.loads(res.strip().splitlines()[-1])
            times[how].append(got["seconds"])
            outs[how] = got["out"]
    new, old = (float(np.median(times[how])) for how in pair)
    return {"repeats": repeats, "new": pair[0], "old": pair[1], "new_seconds": new, "old_seconds": old,
            "ratio": new / old, "same_result": outs[pair[0]] == outs[pair[1]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.threads)
        return 0

    from aloe.assets.smollm2 import smollm2_path

    threads = max(1, args.threads)
    torch.set_num_threads(threads)
    src = smollm2_path()
    cfg = json.loads((src / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="aloe-conversion-profile-"))
    try:
        gemm_before, gemm_cpu_before = gemm_rates()
        env_threads = {k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        old_env = {k: os.environ.get(k) for k in env_threads}
        os.environ.update(env_threads)   # numpy's BLAS in the child (float64 key INIT) gets the same thread count
        try:
            stdout, wall, peak_mb = run_measured(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(src), str(work / "obf"),
                 "--threads", str(threads)], "the instrumented conversion", stderr=None)
        finally:
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        gemm_after, gemm_cpu_after = gemm_rates()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run = json.loads(stdout.decode().strip().splitlines()[-1])
    special = first_calls_side_by_side(src, int(cfg["vocab_size"]), ("special:tokenizers", "special:transformers"))
    rope = first_calls_side_by_side(src, int(cfg["vocab_size"]), ("rope:config", "rope:class"))
    gemm, gemm_cpu = (gemm_before + gemm_after) / 2, (gemm_cpu_before + gemm_cpu_after) / 2
    total = run["seconds"]
    stages = [{"stage": label, "key": k, "seconds": run["stages"][k], "share": run["stages"][k] / total,
               "cpu_seconds": run["cpu_stages"][k], "peak_rss_raised_mb": run["peak_raised_mb"][k],
               "calls": run["calls"][k] if k != "other" else None} for k, label in STAGES]
    key_gflops = run["flops"]["key_gemm"] / 1e9
    vocab_gflops = run["flops"]["vocab"] / 1e9
    formula_gflop = conversion_flops(cfg, run["d_out"]) / 1e9
    sizes = tensor_sizes(src, run["d_out"])
    largest = max(sizes["largest_in_tensor_mb"], sizes["largest_out_tensor_mb"])
    rates = {
        "gemm_fp32_gflops": gemm, "gemm_fp32_gflops_before": gemm_before, "gemm_fp32_gflops_after": gemm_after,
        "key_gemm_gflop": key_gflops, "key_gemm_seconds": run["stages"]["key_gemm"],
        "key_gemm_gflops_per_s": key_gflops / run["stages"]["key_gemm"],
        "vocab_gflop": vocab_gflops, "vocab_seconds": run["stages"]["vocab"],
        "vocab_gflops_per_s": vocab_gflops / run["stages"]["vocab"],
        "formula_gflop": formula_gflop, "formula_gflops_per_s_whole_conversion": formula_gflop / total,
    }
    cpu = {"gemm_fp32_gflops": gemm_cpu, "gemm_fp32_gflops_before": gemm_cpu_before,
           "gemm_fp32_gflops_after": gemm_cpu_after, "key_gemm_seconds": run["cpu_stages"]["key_gemm"],
           "vocab_seconds": run["cpu_stages"]["vocab"], "conversion_seconds": run["cpu_seconds"]}
    cpu["key_gemm_gflops_per_s"] = key_gflops / cpu["key_gemm_seconds"]
    cpu["vocab_gflops_per_s"] = vocab_gflops / cpu["vocab_seconds"]
    cpu["formula_gflops_per_s_whole_conversion"] = formula_gflop / cpu["conversion_seconds"]
    for k in ("key_gemm", "vocab"):
        cpu[f"{k}_vs_fp32_gemm"] = cpu[f"{k}_gflops_per_s"] / gemm_cpu
    cpu["whole_conversion_vs_fp32_gemm"] = cpu["formula_gflops_per_s_whole_conversion"] / gemm_cpu
    rates["cpu_time"] = cpu
    rates["key_gemm_vs_fp32_gemm"] = rates["key_gemm_gflops_per_s"] / gemm
    rates["vocab_vs_fp32_gemm"] = rates["vocab_gflops_per_s"] / gemm
    rates["whole_conversion_vs_fp32_gemm"] = rates["formula_gflops_per_s_whole_conversion"] / gemm
    memory = dict(sizes, peak_rss_mb=peak_mb, baseline_rss_mb=run["baseline_rss_mb"], peak_stage=run["peak_stage"],
                  peak_before_conversion_mb=run["peak_before_conversion_mb"], two_x_largest_mb=2 * largest)
    memory["excess_over_baseline_mb"] = peak_mb - run["baseline_rss_mb"]
    memory["peak_over_largest"] = peak_mb / largest
    memory["excess_over_largest"] = memory["excess_over_baseline_mb"] / largest
    payload = {
        "command": f"python benchmarks/conversion_profile.py --threads {threads}",
        "model": "SmolLM2-135M-Instruct", "profile": "exact", "output_dtype": "float32", "threads": threads,
        "child_threads": run["threads"], "d": cfg["hidden_size"], "d_out": run["d_out"],
        "layers": cfg["num_hidden_layers"], "vocab": cfg["vocab_size"],
        "load_average_1min_at_end": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "conversion_seconds": total, "conversion_cpu_seconds": run["cpu_seconds"], "process_wall_seconds": wall,
        "out_gb": run["out_bytes"] / 2 ** 30,
        "stages": stages, "rates": rates, "memory": memory, "special_ids": special,
        "rope": rope,
    }
    md = "\n".join([
        "# Conversion profile (SmolLM2-135M-Instruct, exact profile, float32 out)\n",
        f"`obfuscate_checkpoint` in a child process with {threads} thread(s) (torch and numpy's BLAS), every stage "
        "timed by `time.perf_counter` wrappers; times are exclusive (a stage's time excludes the stages it calls) "
        "and `other` is the conversion's time that no wrapper claims. GEMM FLOPs are counted by "
        "`torch.utils.flop_counter` around each key product and each vocabulary block. The fp32 GEMM rate "
        "(1024^3, same thread count) is measured before and after the conversion in the same run. "
        f"1-minute load average at the end: {payload['load_average_1min_at_end']:.2f} on "
        f"{os.cpu_count()} CPUs. Produced by `{payload['command']}`.\n",
        f"Conversion {total:.2f} s (process wall {wall:.2f} s, imports included); d = {cfg['hidden_size']} -> "
        f"d' = {run['d_out']}, {cfg['num_hidden_layers']} layers, vocabulary {cfg['vocab_size']}.\n",
        "## Time by stage\n",
        "| stage | seconds | share | CPU seconds | peak RSS raised MB | calls |", "|---|---|---|---|---|---|",
        *[f"| {r['stage']} | {r['seconds']:.3f} | {100 * r['share']:.1f}% | {r['cpu_seconds']:.3f} | "
          f"{r['peak_rss_raised_mb']:.0f} | {'' if r['calls'] is None else r['calls']} |" for r in stages],
        f"| total | {total:.3f} | 100% | {run['cpu_seconds']:.3f} | "
        f"{sum(r['peak_rss_raised_mb'] for r in stages):.0f} | |",
        "",
        "`CPU seconds`: the process's CPU time in the stage (wall above CPU is waiting: for the disk, or for a CPU on "
        "a loaded machine). `peak RSS raised`: how far the process's peak RSS rose during the stage (checked at "
        "every stage boundary).",
        "",
        "Two steps, each done two ways side by side (each way the first call in a fresh process that has "
        f"imported transformers and aloe, as in the conversion; {special['repeats']} alternating runs, medians):\n",
        "| step | as the conversion does it | seconds | the earlier way | seconds | ratio | same result |",
        "|---|---|---|---|---|---|---|",
        f"| special ids | the `tokenizers` library alone | {special['new_seconds']:.3f} | transformers' "
        f"AutoTokenizer | {special['old_seconds']:.3f} | {special['ratio']:.2f} | "
        f"{'yes' if special['same_result'] else 'NO'} |",
        f"| RoPE frequencies | the config's RoPE parameters | {rope['new_seconds']:.3f} | the model's rotary class "
        f"(modeling module imported) | {rope['old_seconds']:.3f} | {rope['ratio']:.2f} | "
        f"{'yes' if rope['same_result'] else 'NO'} |",
        "",
        "## GEMM rate\n",
        "| what | GFLOP | seconds | GFLOP/s | vs fp32 GEMM |", "|---|---|---|---|---|",
        f"| key GEMMs (counted) | {key_gflops:.2f} | {rates['key_gemm_seconds']:.3f} | "
        f"{rates['key_gemm_gflops_per_s']:.2f} | {rates['key_gemm_vs_fp32_gemm']:.3f} |",
        f"| vocabulary tables (counted) | {vocab_gflops:.2f} | {rates['vocab_seconds']:.3f} | "
        f"{rates['vocab_gflops_per_s']:.2f} | {rates['vocab_vs_fp32_gemm']:.3f} |",
        f"| whole conversion (key-product formula of conversion_scaling) | {formula_gflop:.2f} | {total:.3f} | "
        f"{rates['formula_gflops_per_s_whole_conversion']:.2f} | {rates['whole_conversion_vs_fp32_gemm']:.3f} |",
        f"| fp32 GEMM 1024^3 (before / after) | | | {gemm_before:.2f} / {gemm_after:.2f} | 1 |",
        "",
        "The same by CPU time (CPU seconds of the stage; the GEMM rate a core gives while it runs: its wall rate "
        "times wall over CPU seconds of the measurement). With one thread these do not depend on the machine's "
        "load.\n",
        "| what | GFLOP | CPU seconds | GFLOP/s | vs fp32 GEMM |", "|---|---|---|---|---|",
        f"| key GEMMs (counted) | {key_gflops:.2f} | {cpu['key_gemm_seconds']:.3f} | "
        f"{cpu['key_gemm_gflops_per_s']:.2f} | {cpu['key_gemm_vs_fp32_gemm']:.3f} |",
        f"| vocabulary tables (counted) | {vocab_gflops:.2f} | {cpu['vocab_seconds']:.3f} | "
        f"{cpu['vocab_gflops_per_s']:.2f} | {cpu['vocab_vs_fp32_gemm']:.3f} |",
        f"| whole conversion (key-product formula) | {formula_gflop:.2f} | {cpu['conversion_seconds']:.3f} | "
        f"{cpu['formula_gflops_per_s_whole_conversion']:.2f} | {cpu['whole_conversion_vs_fp32_gemm']:.3f} |",
        f"| fp32 GEMM 1024^3 (before / after) | | | {gemm_cpu_before:.2f} / {gemm_cpu_after:.2f} | 1 |",
        "",
        "## Memory\n",
        "| peak RSS MB | RSS before the conversion MB | excess MB | largest tensor in MB | largest tensor out MB "
        "(fp32) | 2x largest MB | peak / largest | excess / largest |",
        "|---|---|---|---|---|---|---|---|",
        f"| {peak_mb:.0f} | {run['baseline_rss_mb']:.0f} | {memory['excess_over_baseline_mb']:.0f} | "
        f"{sizes['largest_in_tensor_mb']:.1f} | {sizes['largest_out_tensor_mb']:.1f} | {2 * largest:.1f} | "
        f"{memory['peak_over_largest']:.2f} | {memory['excess_over_largest']:.2f} |",
        "",
        "`RSS before the conversion`: the child after importing torch, transformers and aloe, the constant the "
        f"conversion starts from; `excess` is the peak above it. The peak was last raised in: "
        f"{dict(STAGES).get(run['peak_stage'], run['peak_stage'])}.\n",
    ])
    return publish("conversion_profile", payload, md, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
