"""How the analysis of one matrix grows with its shape, measured on this machine, and what that predicts.

    .venv/bin/python benchmarks/bench_scaling.py              # shapes 512² .. 4096 x 11008, ~5 minutes
    .venv/bin/python benchmarks/bench_scaling.py --quick      # three small shapes, under a minute
    .venv/bin/python benchmarks/bench_scaling.py --threads 2  # torch threads per analysis (default 1)

For each shape (m, n): a random float32 base W_0 (one `model.layers.0.mlp.up_proj.weight` in a safetensors
directory) and a random rank-8 PEFT adapter (`intruder.synthetic.random_adapter`); then, each in a fresh
process after a warm-up on a small matrix, `find_intruders` with an empty factor cache (cold: the base
decomposition and the analysis) and with the cache filled (warm), timing it and reading the process's peak
resident memory above its baseline (VmHWM, reset before the run); the best of `--repeat` runs of each, for
shapes up to 2048 x 5632. One thread by default: on a shared machine a single thread is disturbed least by
other work (two threads on two busy cores measured anything from 1x to 4x slower). Fits log-log growth laws,
cold ~ c (m n p)^b and warm ~ c (m n)^b, and extrapolates them to every matrix of 7B- and 70B-shaped models
split over 1, 8 and 64 ranks by the same plan `find_intruders` uses. Then two processes fill one cache with the
same entries at the same time, with and without the entry locks, counting the decompositions. Writes
benchmarks/out/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_analysis import _cpu, _status  # noqa: E402  (one CPU description for every benchmark)

OUT = Path(__file__).parent / "out"
SHAPES = [(512, 512), (1024, 1024), (1024, 2816), (2048, 2048), (2048, 5632), (4096, 4096), (4096, 11008)]
QUICK = [(256, 256), (256, 704), (512, 512)]
# every matrix the analysis visits in a Llama-2-7B- and a Llama-2/3-70B-shaped model (all seven projections)
MODELS = {"7B": [(4096, 4096)] * 4 * 32 + [(11008, 4096), (11008, 4096), (4096, 11008)] * 32,
          "70B": ([(8192, 8192)] * 2 + [(1024, 8192)] * 2 + [(28672, 8192)] * 2 + [(8192, 28672)]) * 80}
RANKS = (1, 8, 64)
RANK_R = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three small shapes and a small contention test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each analysis (default 1)")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per shape up to 2048 x 5632")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "BASE", "ADAPTER", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--refit", action="store_true", help="refit and predict from benchmarks/out/scaling.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child, threads=args.threads)))
        return
    if args.refit:
        _write(json.loads((OUT / "scaling.json").read_text()))
        return
    work = Path(tempfile.mkdtemp(prefix="intruder-scaling-"))
    load_before = os.getloadavg()
    rows = [_measure(shape, work, args.threads, args.repeat if shape[0] * shape[1] <= 2048 * 5632 else 1)
            for shape in (QUICK if args.quick else SHAPES)]
    record = {"cpu": _cpu(), "threads": args.threads, "rank_r": RANK_R, "load_average_before": load_before,
              "rows": rows, "contention": _contention(work, small=args.quick), "load_average_after": os.getloadavg()}
    _write(record)


def _write(record: dict) -> None:
    """Fit the laws to the measured rows, predict, print, and write benchmarks/out/scaling.json."""
    rows = record["rows"]
    record["laws"] = {mode: _fit(rows, mode) for mode in ("cold", "warm")}
    record["terms"], record["memory"], record["gpu_assumed"] = _fit_terms(rows), _fit_memory(rows), GPU
    record["predictions"] = _predictions(record["terms"], record["memory"])
    for mode, law in record["laws"].items():
        print(f"{mode}: seconds = {law['c']:.3g} x ({law['x']})^{law['b']:.3f}")
    print("terms: " + ", ".join(f"{k} {v:.3g}" for k, v in record["terms"].items()))
    memory = record["memory"]
    print(f"peak memory: MiB = {memory['per_mn']:.3g} m n + {memory['per_p2']:.3g} p² (fitted on cold runs)")
    for name, got in record["predictions"].items():
        for where in ("cpu_one_thread", "h100_assumed"):
            print(f"{name} {where}: " + ", ".join(f"{k} {v:.0f}" for k, v in got[where].items()))
        print(f"{name}: peak {got['peak_mib']:.0f} MiB per rank, cache {got['cache_gib']:.1f} GiB")
    OUT.mkdir(exist_ok=True)
    (OUT / "scaling.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {OUT / 'scaling.json'}")


def _measure(shape: tuple[int, int], work: Path, threads: int, repeat: int) -> dict:
    """Cold and warm seconds and peak memory of one (m, n) matrix, each in a fresh process, best of `repeat`."""
    from intruder.synthetic import random_adapter

    base = _base(work / f"base-{shape[0]}x{shape[1]}", shape)
    adapter = random_adapter(base, work / f"adapter-{shape[0]}x{shape[1]}", rank=RANK_R, alpha=2 * RANK_R)
    row = {"m": shape[0], "n": shape[1]}
    runs = []
    for i in range(repeat):
        cache = work / f"cache-{shape[0]}x{shape[1]}-{i}"
        runs.append({mode: _run_child(mode, base, adapter, cache, threads) for mode in ("cold", "warm")})
    for mode in ("cold", "warm"):
        row |= {f"{mode}_s": min(r[mode]["seconds"] for r in runs),
                f"{mode}_all_s": [r[mode]["seconds"] for r in runs],
                f"{mode}_peak_mib": max(r[mode]["peak_mib"] for r in runs)}
    print(f"{shape[0]:>6} x {shape[1]:<6} cold {row['cold_s']:8.3f} s {row['cold_peak_mib']:8.1f} MiB   "
          f"warm {row['warm_s']:8.3f} s {row['warm_peak_mib']:8.1f} MiB", flush=True)
    return row


def _base(path: Path, shape: tuple[int, int]) -> Path:
    """One random float32 matrix with a falling spectrum, as a one-tensor safetensors model directory."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    m, n = shape
    w = torch.randn(m, n, generator=g) / n**0.5
    w *= (torch.arange(1, n + 1, dtype=torch.float32) ** -0.3)[None, :]  # columns of falling size
    path.mkdir(parents=True, exist_ok=True)
    save_file({"model.layers.0.mlp.up_proj.weight": w.contiguous()}, path / "model.safetensors")
    return path


def _run_child(mode: str, base: Path, adapter: Path, cache: Path, threads: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(base), str(adapter), str(cache),
                           "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(mode: str, base: str, adapter: str, cache: str, *, threads: int) -> dict:
    """In a fresh process: warm up on a small matrix, then time one analysis and read its peak memory."""
    import torch

    from intruder import find_intruders
    from intruder.synthetic import random_adapter

    torch.set_num_threads(threads)
    small = Path(tempfile.mkdtemp())
    find_intruders(_base(small / "b", (300, 420)), random_adapter(small / "b", small / "a", rank=RANK_R),
                   cache_dir=small / "c", progress=False)
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    start = time.perf_counter()
    report = find_intruders(base, adapter, cache_dir=cache, progress=False)
    seconds = time.perf_counter() - start
    assert mode == "cold" or not list(Path(cache).rglob("*.lock"))
    return {"seconds": seconds, "peak_mib": (_status("VmHWM") - baseline) / 2**20, "intruders": report.total}


def _fit(rows: list[dict], mode: str) -> dict:
    """log seconds = log c + b log x, x = m n p (cold) or m n (warm), by least squares over the shapes with
    p >= 1024 (below that, a call's fixed costs weigh in), or all of them when fewer than three are."""
    rows = _big(rows)
    x = [r["m"] * r["n"] * (min(r["m"], r["n"]) if mode == "cold" else 1) for r in rows]
    b, log_c = np.polyfit(np.log(x), np.log([r[f"{mode}_s"] for r in rows]), 1)
    return {"x": "m n p" if mode == "cold" else "m n", "b": float(b), "c": float(math.exp(log_c))}


def _fit_terms(rows: list[dict]) -> dict:
    """The two costs separately, by least squares over the same shapes: the base decomposition (cold - warm)
    = a p² q + b p³ (Gram product, eigh), and the warm analysis = c (p q + p²) + d (reading W_0 and the
    cached basis, thin products; d: a call's fixed cost)."""
    rows = _big(rows)
    pq = [sorted((r["m"], r["n"])) for r in rows]
    (a, b), *_ = np.linalg.lstsq(np.array([[p * p * q, p**3] for p, q in pq], dtype=float),
                                 np.array([r["cold_s"] - r["warm_s"] for r in rows]), rcond=None)
    (c, d), *_ = np.linalg.lstsq(np.array([[p * q + p * p, 1.0] for p, q in pq], dtype=float),
                                 np.array([r["warm_s"] for r in rows]), rcond=None)
    return {"gram_s_per_p2q": float(a), "eigh_s_per_p3": float(b), "warm_s_per_pq_p2": float(c),
            "warm_fixed_s": float(d)}


def _big(rows: list[dict]) -> list[dict]:
    big = [r for r in rows if min(r["m"], r["n"]) >= 1024]
    return big if len(big) >= 3 else rows


def _fit_memory(rows: list[dict]) -> dict:
    """Peak MiB of a cold run = a m n + c p², by least squares (no intercept)."""
    design = np.array([[r["m"] * r["n"], min(r["m"], r["n"]) ** 2] for r in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(design, np.array([r["cold_peak_mib"] for r in rows]), rcond=None)
    return {"per_mn": float(coef[0]), "per_p2": float(coef[1])}


# NOT MEASURED: what one H100 is assumed to do, for the GPU column of docs/scaling.md. float64 Gram product at
# 30 TFLOP/s (half the FP64 tensor-core peak of 67), eigh with vectors (about 9 p³ flops) at an effective
# 1.5 TFLOP/s (cuSOLVER's syevd is far below peak), and the warm pass bound by reading W_0 (bf16, 2 bytes an
# element) and the cached float64 basis (8 bytes) at 5 GB/s from local NVMe or the page cache.
GPU = {"gram_flops": 30e12, "eigh_flops": 1.5e12, "read_bytes_per_s": 5e9}


def _cpu_seconds(shape, terms: dict, mode: str) -> float:
    p, q = sorted(shape)
    warm = terms["warm_s_per_pq_p2"] * (p * q + p * p) + terms["warm_fixed_s"]
    return warm + (terms["gram_s_per_p2q"] * p * p * q + terms["eigh_s_per_p3"] * p**3 if mode == "cold" else 0)


def _gpu_seconds(shape, mode: str) -> float:
    p, q = sorted(shape)
    warm = (2 * p * q + 8 * p * p) / GPU["read_bytes_per_s"]
    return warm + (2 * p * p * q / GPU["gram_flops"] + 9 * p**3 / GPU["eigh_flops"] if mode == "cold" else 0)


def _predict(shapes: list[tuple[int, int]], seconds) -> dict:
    """Per-rank seconds of the busiest rank under `plan`, cold and warm; seconds(shape, mode) per matrix."""
    from intruder.analysis.parallel import plan

    out = {}
    for mode in ("cold", "warm"):
        costs = [seconds(s, mode) for s in shapes]
        out[f"{mode}_total_s"] = sum(costs)
        for ranks in RANKS:
            out[f"{mode}_s_on_{ranks}"] = max(sum(costs[i] for i in share) for share in plan(costs, ranks))
    return out


def _predictions(terms: dict, memory: dict) -> dict:
    out = {}
    for name, shapes in MODELS.items():
        largest = max(shapes, key=lambda s: s[0] * s[1])
        out[name] = {"matrices": len(shapes),
                     "cpu_one_thread": _predict(shapes, lambda s, mode: _cpu_seconds(s, terms, mode)),
                     "h100_assumed": _predict(shapes, _gpu_seconds),
                     "peak_mib": memory["per_mn"] * largest[0] * largest[1] + memory["per_p2"] * min(largest) ** 2,
                     "cache_gib": sum(min(s) ** 2 * 8 for s in shapes) / 2**30}  # float64 bases, one per matrix
    return out


def _contention(work: Path, *, small: bool) -> dict:
    """Two processes (one thread each) fill one empty cache with the same entries at once: with the entry
    locks, then with locking disabled, counting the decompositions each made, and the wall time."""
    from intruder.synthetic import random_adapter, random_base

    base = random_base(work / "contention-base", n_layers=1, hidden=256 if small else 1024,
                       intermediate=704 if small else 2816)
    adapter = random_adapter(base, work / "contention-adapter", rank=RANK_R)
    out = {"matrices": 7, "shapes": "hidden 256, intermediate 704" if small else "hidden 1024, intermediate 2816"}
    single = _race(base, adapter, work / "contention-single", locks=True, processes=1)
    out["one_process"] = single
    for locks in (True, False):
        out["locks" if locks else "no_locks"] = _race(base, adapter, work / f"contention-{locks}", locks=locks,
                                                      processes=2)
    for key in ("one_process", "locks", "no_locks"):
        r = out[key]
        print(f"contention, {key:11s}: {r['decompositions']} decompositions in total {r['per_process']}, "
              f"{r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} CPU s")
    return out


def _race(base: Path, adapter: Path, cache: Path, *, locks: bool, processes: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(processes + 1)
    procs = [ctx.Process(target=_racer, args=(str(base), str(adapter), str(cache), locks, barrier, queue))
             for _ in range(processes)]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    start = time.perf_counter()
    got = [queue.get(timeout=600) for _ in procs]
    seconds = time.perf_counter() - start
    for p in procs:
        p.join()
    return {"decompositions": sum(n for n, _ in got), "per_process": [n for n, _ in got], "seconds": seconds,
            "cpu_seconds": sum(t for _, t in got)}


def _racer(base: str, adapter: str, cache: str, locks: bool, barrier, queue) -> None:
    """One process of `_race`: count its base decompositions (by wrapping the function the analysis calls)."""
    import torch

    from intruder import find_intruders
    from intruder.analysis import cachelock, projection

    torch.set_num_threads(1)
    calls, real = [], projection.base_factors

    def counted(w):
        calls.append(tuple(w.shape))
        return real(w)

    projection.base_factors = counted
    if not locks:
        cachelock.acquire = lambda lock: True  # as on a file system where no lock file can be made
    barrier.wait(timeout=120)
    start = time.process_time()
    find_intruders(base, adapter, cache_dir=cache, progress=False, distributed=False)
    queue.put((len(calls), time.process_time() - start))


if __name__ == "__main__":
    main()
