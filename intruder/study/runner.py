"""The study as one command: train every run of a grid, analyse every epoch, evaluate the λ intervention.

    DIR/sweep.json            the grid (refused if another one is asked for in the same DIR; see grid.py)
    DIR/base_eval.json        learning and forgetting of the untouched model, measured once for every run
    DIR/runs/<name>/          an ordinary `intruder train` run directory per configuration
    DIR/analysis/<name>/epoch-NN.json   find_intruders of each epoch's checkpoint against the base
    DIR/mitigation/<name>.json          accuracy and forgetting of the last LoRA epoch with intruders scaled by λ
    DIR/sweep.jsonl           one row per run and epoch, and per run and λ, rebuilt from the files above

Every file is written beside its place and renamed in, and each stage is skipped when its file exists, so a
sweep killed at any point continues with the same command: finished work is kept, an interrupted run resumes
from its last epoch. `shard=(i, n)` runs every n-th run, so n processes can share one DIR.

Under torchrun (`torchrun --nproc_per_node N -m intruder sweep ...`) process RANK runs shard (RANK + 1, N), each
of its runs whole in that one process (no DDP inside a run) on its own GPU, cuda:LOCAL_RANK. Rank 0 settles the
grid and evaluates the base model while the others wait, and collects the rows once every rank is done; DIR
must be a folder every process sees.
"""

from __future__ import annotations

import json
import statistics
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np

from .. import distributed
from ..analysis import IntruderReport, find_intruders
from ..errors import IntruderError
from ..outputs import write_text
from ..training import TrainConfig, evaluate_model, train
from ..training.trainer import resolve_device
from .grid import Grid, RunSpec

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the ε-curve every row carries
WAIT = timedelta(days=30)  # how long the ranks of a sweep may wait for the slowest: its shards differ in length


def sweep(out, grid: Grid, *, shard: tuple[int, int] | None = None, extend: bool = False, cache_dir=None,
          progress: bool = True) -> list[dict]:
    """Run (or continue) shard `shard` of `grid` in `out` (None: all of it, or under torchrun this rank's
    share); returns the rows of every run present in `out`, on every rank."""
    out = Path(out)
    shard = _shard(shard)
    with distributed.together("preparing the sweep"):  # the others wait for rank 0
        if distributed.rank() == 0:
            grid = settle_grid(out, grid, extend=extend)
            with distributed.alone():
                base_evaluation(out, grid)
    grid = distributed.broadcast_object(grid)
    with distributed.together("running its runs"), _reported(shard), distributed.alone():
        _run_shard(out, grid, grid.shard(*shard), cache_dir, progress and distributed.rank() == 0)
    return distributed.broadcast_object(collect(out) if distributed.rank() == 0 else None)


def _shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """`shard`, (1, 1) for None; under torchrun (rank + 1, world size), joining its processes."""
    if not distributed.launched():
        return shard or (1, 1)
    if shard is not None:
        raise IntruderError(f"shard {shard[0]}/{shard[1]} (--shard) under torchrun: torchrun splits the grid "
                            "already, process RANK running shard RANK+1/WORLD_SIZE; drop --shard, or run "
                            "without torchrun")
    distributed.init_from_env("gloo", timeout=WAIT)  # objects only: the runs never talk to each other
    return distributed.rank() + 1, distributed.world_size()


def _run_shard(out: Path, grid: Grid, runs: list[RunSpec], cache_dir, progress: bool) -> None:
    """Train and analyse every run, then the λ intervention on each LoRA run."""
    for spec in _bar(runs, progress):
        config = run_config(out, grid, spec)
        _train(config, progress)
        _analyse(out, spec, config, grid, cache_dir)
    for spec in runs:
        if spec.method == "lora":
            _mitigate(out, spec, run_config(out, grid, spec), grid, cache_dir)


@contextmanager
def _reported(shard: tuple[int, int]):
    """Under torchrun, say at once when this rank's runs fail: the error is raised on every rank only once the
    others have finished theirs (and kept them)."""
    try:
        yield
    except Exception as exc:
        if distributed.active():
            print(f"intruder: rank {distributed.rank()} (shard {shard[0]}/{shard[1]}) failed: {exc}; the other "
                  "ranks finish their runs first", file=sys.stderr)
        raise


def settle_grid(out: Path, grid: Grid, *, extend: bool) -> Grid:
    """The grid of `out`: `grid` for a new sweep, the saved one when equal, their union with `extend`."""
    saved_path = out / "sweep.json"
    if saved_path.is_file():
        saved = load_grid(out)
        if saved != grid:
            if not extend:
                raise IntruderError(f"{out} holds a sweep with another grid ({'; '.join(saved.differences(grid))}); "
                                    "run the same command to continue it, add --extend to add these runs to "
                                    "it, or choose another --out")
            grid = saved.extended(grid)
        else:
            return saved
    elif out.exists() and any(out.iterdir()):
        raise IntruderError(f"{out} is not empty and holds no sweep (no sweep.json); choose a new directory")
    write_text(saved_path, json.dumps(grid.to_dict(), indent=1) + "\n")
    return grid


def load_grid(out: Path) -> Grid:
    path = Path(out) / "sweep.json"
    try:
        return Grid.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise IntruderError(f"{out} holds no sweep (no sweep.json); run `intruder sweep --out {out}` first") from None
    except (ValueError, TypeError) as exc:
        raise IntruderError(f"{path} is not a sweep grid ({exc}); it was edited or damaged: restore it or "
                            "start a new --out") from exc


def run_config(out: Path, grid: Grid, spec: RunSpec) -> TrainConfig:
    options = grid.train | spec.train_options() | {"epochs": grid.epochs, "eval_before": False}
    if "targets" in options:
        options["targets"] = tuple(options["targets"])
    return TrainConfig.from_dict(options | {"out": str(out / "runs" / spec.name)})


def base_evaluation(out: Path, grid: Grid) -> dict:
    """Learning and forgetting of the untouched model, once per sweep (DIR/base_eval.json)."""
    path = out / "base_eval.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from ..training.modeling import load_model

    config = TrainConfig.from_dict(grid.train | {"out": ""})
    model, tokenizer, model_path = load_model(config.model, device=resolve_device(config.device))
    result = evaluate_model(model, tokenizer, config) | {"model_path": str(model_path)}
    write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def _train(config: TrainConfig, progress: bool) -> None:
    run = Path(config.out)
    if _finished(run, config.epochs):
        return
    resume = (run / "state.pt").is_file()
    # a run killed before its first epoch ended has nothing to keep: start it afresh
    train(config, resume=resume, overwrite=not resume and run.exists(), progress=progress)


def _finished(run: Path, epochs: int) -> bool:
    summary = run / "summary.json"
    if not summary.is_file():
        return False
    done = json.loads(summary.read_text(encoding="utf-8")).get("checkpoints", [])
    return len(done) >= epochs


def _analyse(out: Path, spec: RunSpec, config: TrainConfig, grid: Grid, cache_dir) -> None:
    """find_intruders of every epoch's checkpoint, each saved once."""
    run, folder = Path(config.out), out / "analysis" / spec.name
    model_path = _model_path(run)
    for epoch in range(1, grid.epochs + 1):
        target = folder / f"epoch-{epoch:02d}.json"
        if target.is_file():
            continue
        report = find_intruders(model_path, run / f"epoch-{epoch:02d}", threshold=grid.threshold,
                                top_k=grid.top_k, cache_dir=cache_dir, progress=False)
        folder.mkdir(parents=True, exist_ok=True)
        report.to_json(target)


def _mitigate(out: Path, spec: RunSpec, config: TrainConfig, grid: Grid, cache_dir) -> None:
    """Accuracy and forgetting of the last epoch with its flagged directions scaled by each λ (one model, its
    weights replaced per λ). Where W' = W_t (λ = 1, or no direction flagged) the run's own last evaluation
    is the answer, and is recorded as such."""
    path = out / "mitigation" / f"{spec.name}.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    todo = [lam for lam in grid.lams if _key(lam) not in done]
    if not todo:
        return
    run = Path(config.out)
    last = _evals(run)[grid.epochs]
    tuned = {"accuracy": last["accuracy"], "forget_loss": last["forget_loss"], "directions": 0, "matrices": 0}
    model = tokenizer = None
    for lam in todo:
        scaled = iter(_scaled(run, config.epochs, lam, grid, cache_dir)) if lam != 1 else iter(())
        first = next(scaled, None)
        if first is None:
            done[_key(lam)] = tuned | {"from": "the run's last evaluation (W' = W_t: nothing to scale)"}
        else:
            if model is None:
                from ..training.modeling import load_model

                model, tokenizer, _ = load_model(_model_path(run), device=resolve_device(config.device))
            counts = _load_scaled(model, run, config.epochs, first, scaled)
            result = evaluate_model(model, tokenizer, config)
            done[_key(lam)] = {"accuracy": result["accuracy"], "forget_loss": result["forget_loss"], **counts}
        write_text(path, json.dumps(done, indent=1) + "\n")


def _scaled(run: Path, epoch: int, lam: float, grid: Grid, cache_dir):
    """(name, W', flagged) for every matrix of the epoch's checkpoint with a flagged direction."""
    from ..analysis.mitigation import scaled_matrices

    return scaled_matrices(_model_path(run), run / f"epoch-{epoch:02d}", lam=lam,
                           threshold=grid.mitigation_threshold, top_k=grid.top_k, side="left", layers=None,
                           cache_dir=cache_dir, progress=False)


def _load_scaled(model, run: Path, epoch: int, first: tuple, rest) -> dict:
    """Put W_t (every adapted matrix, merged) into `model`, then W' over the matrices with flagged directions."""
    import itertools

    import torch

    from ..weights import open_weights

    params = dict(model.named_parameters())
    with open_weights(run / f"epoch-{epoch:02d}", base=_model_path(run)) as tuned, torch.no_grad():
        for name in tuned.changed_keys():
            params[name].copy_(tuned.get(name))
    directions = matrices = 0
    with torch.no_grad():
        for name, w, flagged in itertools.chain([first], rest):
            params[name].copy_(w)
            directions, matrices = directions + flagged, matrices + 1
    return {"directions": directions, "matrices": matrices}


# ---- rows ---------------------------------------------------------------------------------------------------


def collect(out) -> list[dict]:
    """Rows of every run in `out` (all shards), and write them to DIR/sweep.jsonl."""
    out = Path(out)
    grid = load_grid(out)
    base_path = out / "base_eval.json"
    base = json.loads(base_path.read_text(encoding="utf-8")) if base_path.is_file() else None
    rows = []
    for spec in grid.runs():
        run = out / "runs" / spec.name
        if (run / "config.json").is_file():
            rows += _run_rows(out, grid, spec, run, base)
    write_text(out / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _run_rows(out: Path, grid: Grid, spec: RunSpec, run: Path, base: dict | None) -> list[dict]:
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    evals, seconds = _evals(run), _seconds_by_epoch(run)
    before = base["forget_loss"] if base else None
    common = {"run": spec.name, "method": spec.method, "rank": spec.rank, "alpha": spec.alpha,
              "alpha_rule": spec.alpha_rule, "rslora": spec.rslora, "scale": spec.scale, "lr": spec.lr,
              "epochs": config["epochs"], "trainable_parameters": summary.get("trainable_parameters")}
    rows = []
    if base:
        rows.append(common | {"kind": "epoch", "epoch": 0, "accuracy": base["accuracy"], "forget_loss": before,
                              "n_questions": base.get("n_questions"),
                              "forgetting": 0.0, "intruders": 0, "seconds": 0.0} | _no_analysis())
    for epoch, record in sorted(evals.items()):
        if epoch == 0:
            continue
        analysis = out / "analysis" / spec.name / f"epoch-{epoch:02d}.json"
        stats = _analysis_stats(IntruderReport.from_json(analysis)) if analysis.is_file() else _no_analysis()
        rows.append(common | {"kind": "epoch", "epoch": epoch, "step": record["step"],
                              "accuracy": record["accuracy"], "forget_loss": record["forget_loss"],
                              "n_questions": record.get("n_questions"),
                              "forgetting": None if before is None else record["forget_loss"] - before,
                              "seconds": seconds.get(epoch)} | stats)
    mitigation = out / "mitigation" / f"{spec.name}.json"
    if mitigation.is_file():
        for lam, result in json.loads(mitigation.read_text(encoding="utf-8")).items():
            rows.append(common | {"kind": "lambda", "epoch": config["epochs"], "lam": float(lam),
                                  "lam_threshold": grid.mitigation_threshold} | result
                        | {"forgetting": None if before is None else result["forget_loss"] - before})
    return rows


def _analysis_stats(report: IntruderReport) -> dict:
    counts = report.counts_at(list(THRESHOLDS))
    ranks = [layer.delta_effective_rank for layer in report.layers]
    return {"intruders": report.total, "threshold": report.threshold, "top_k": report.top_k,
            "counts": {f"{t:g}": int(counts[t]) for t in THRESHOLDS},
            "min_max_cos": float(min(float(np.min(layer.max_cos)) for layer in report.layers)),
            "mean_erank": float(statistics.fmean(ranks)), "median_erank": float(statistics.median(ranks)),
            "matrices": len(report.layers)}


def _no_analysis() -> dict:
    return {"intruders": None, "counts": None, "min_max_cos": None, "mean_erank": None, "median_erank": None,
            "matrices": None}


def _evals(run: Path) -> dict[int, dict]:
    """The run's evaluation records by (whole) epoch."""
    records = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            records[int(round(record["epoch"]))] = record
    return records


def _seconds_by_epoch(run: Path) -> dict[int, float]:
    """Training seconds up to the end of each epoch, summed over sessions (a resumed run restarts its clock)."""
    total, session, ends = 0.0, 0.0, {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") != "train":
            continue
        if record["elapsed_s"] < session:  # a new session
            total += session
        session = record["elapsed_s"]
        ends[int(np.ceil(record["epoch"] - 1e-9))] = round(total + session, 1)
    return ends


def _model_path(run: Path) -> str:
    return json.loads((run / "config.json").read_text(encoding="utf-8"))["model_path"]


def _key(lam: float) -> str:
    return f"{lam:g}"


def _bar(runs: list[RunSpec], enabled: bool):
    if not enabled:
        return runs
    from tqdm.auto import tqdm

    return tqdm(runs, desc="sweep", unit="run", position=1, leave=True)
