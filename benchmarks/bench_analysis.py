"""Speed, exactness and memory of find_intruders against the brute-force reference, in one run.

    .venv/bin/python benchmarks/bench_analysis.py            # Gemma 3 270M, r=8 adapter on all projections
    .venv/bin/python benchmarks/bench_analysis.py --base DIR --rank 16

Steps, all on the same machine in the same run:
1. the brute-force reference: for every adapted matrix, read W_0, merge W_t = W_0 + s·B A, and take two full
   float64 thin SVDs (the paper's Algorithm 1);
2. find_intruders with an empty factor cache (cold), then again with the cache filled (warm);
3. peak memory of a warm and a cold analysis, each in a fresh process.
Prints the times, the ratios and whether every per-matrix count agrees; writes benchmarks/out/analysis.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from intruder import find_intruders, open_weights
from intruder.analysis._reference import brute_force
from intruder.synthetic import random_adapter

OUT = Path(__file__).parent / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model directory (default: Gemma 3 270M from its PyPI package)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--strength", type=float, default=3.0, help="adapter size, see synthetic.random_adapter")
    parser.add_argument("--memory-child", nargs=2, metavar=("ADAPTER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = Path(args.base) if args.base else _gemma()
    if args.memory_child:
        _memory_child(base, *args.memory_child)
        return
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="intruder-bench-"))
    adapter = random_adapter(base, work / "adapter", rank=args.rank, alpha=2 * args.rank, strength=args.strength)
    print(f"base {base}\nadapter r={args.rank} at {adapter}; torch threads {torch.get_num_threads()}")

    reference, t_ref = _timed(lambda: _brute_force_all(base, adapter))
    print(f"brute force (2 float64 SVDs per matrix): {t_ref:.1f} s, {sum(reference.values())} intruders")
    cold, t_cold = _timed(lambda: find_intruders(base, adapter, cache_dir=work / "cache", progress=False))
    warm, t_warm = _timed(lambda: find_intruders(base, adapter, cache_dir=work / "cache", progress=False))
    _, t_warm2 = _timed(lambda: find_intruders(base, adapter, cache_dir=work / "cache", progress=False))
    t_warm = min(t_warm, t_warm2)
    same = all(reference[lr.name] == lr.n_intruders for lr in cold.layers + warm.layers)
    print(f"find_intruders cold: {t_cold:.2f} s  ({t_ref / t_cold:.1f}x faster)")
    print(f"find_intruders warm: {t_warm:.2f} s  ({t_ref / t_warm:.1f}x faster)")
    print(f"{len(cold.layers)} matrices, {cold.total} intruders; every per-matrix count equals brute force: {same}")

    memory = {mode: _memory(base, adapter, work / ("cache" if mode == "warm" else "cache-cold")) for mode in
              ("warm", "cold")}
    for mode, m in memory.items():
        print(f"peak memory {mode}: {m['peak_mib']:.1f} MiB above baseline; bound 3 x largest matrix (float64) "
              f"+ its factors = {m['bound_mib']:.1f} MiB -> {'within' if m['within'] else 'OVER'}")
    result = {"base": str(base), "rank": args.rank, "matrices": len(cold.layers), "intruders": cold.total,
              "counts_equal": same, "brute_force_s": t_ref, "cold_s": t_cold, "warm_s": t_warm,
              "speedup_cold": t_ref / t_cold, "speedup_warm": t_ref / t_warm, "memory": memory,
              "threads": torch.get_num_threads(), "cpu": _cpu()}
    (OUT / "analysis.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT / 'analysis.json'}")


def _brute_force_all(base: Path, adapter: Path) -> dict[str, int]:
    counts = {}
    with open_weights(base) as w0s, open_weights(adapter, base=w0s) as tuned:
        for name in [n for n in w0s.keys() if n in tuned.changed_keys()]:
            w0 = w0s.get(name).to(torch.float64)
            update = tuned.low_rank_update(name)
            max_cos, _ = brute_force(w0, w0 + update.left @ update.right, k=10, side="left")
            counts[name] = int((max_cos < 0.5).sum())
    return counts


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _memory(base: Path, adapter: Path, cache: Path) -> dict:
    """Run one analysis in a fresh process and return its peak memory above its own baseline."""
    done = subprocess.run([sys.executable, __file__, "--base", str(base), "--memory-child", str(adapter), str(cache)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_child(base: Path, adapter: str, cache: str) -> None:
    with open_weights(base) as weights:
        largest = max((n for n in weights.keys() if len(weights.shape(n)) == 2 and "proj" in n),
                      key=lambda n: weights.shape(n)[0] * weights.shape(n)[1])
        shape = weights.shape(largest)
    # warm up every code path (imports, BLAS and LAPACK kernels, the cache) on one matrix of the same model
    first = sorted(open_weights(adapter, base=base).changed_keys())[0]
    find_intruders(base, adapter, layers=[first], cache_dir=tempfile.mkdtemp(), progress=False)
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    find_intruders(base, adapter, cache_dir=cache, progress=False)
    peak = _status("VmHWM")
    matrix = shape[0] * shape[1] * 8
    factors = min(shape) ** 2 * 8 + min(shape) * 8
    bound = 3 * matrix + factors
    print(json.dumps({"peak_mib": (peak - baseline) / 2**20, "bound_mib": bound / 2**20, "largest": largest,
                      "shape": list(shape), "within": peak - baseline < bound}))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} cpus"


def _gemma() -> Path:
    from intruder.weights.models import gemma_270m_dir

    return gemma_270m_dir()


if __name__ == "__main__":
    main()
