"""`torchrun --nproc_per_node 2 -m intruder train`: two Gloo processes on the CPU train as one process with the
same global batch, and only rank 0 writes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from intruder import open_weights
from intruder.cli import main
from intruder.training.trainer import TrainConfig, train
from tests.conftest import sample_questions_file

TIMING = ("tokens_per_s", "elapsed_s")

# Runs `intruder` like `python -m intruder`, recording what this rank writes under $WATCHED (audit hooks see every
# open for writing, rename, mkdir and removal) into $WRITES.rankN.json; with $STOP_AT=k, Ctrl-C at the k-th step;
# with $FAIL_RANK=r, rank r fails to measure forgetting.
LAUNCHER = '''
import atexit, json, os, sys

watched, rank, writes = os.path.realpath(os.environ["WATCHED"]), os.environ["RANK"], []
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def record(*paths):
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(watched):
            writes.append(os.fsdecode(path))


def hook(event, args):
    if event == "open" and (any(c in str(args[1] or "") for c in "wax+") or (args[2] or 0) & WRITING):
        record(args[0])
    elif event in ("os.rename", "os.replace"):
        record(args[0], args[1])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        record(args[0])


sys.addaudithook(hook)
atexit.register(lambda: open(os.environ["WRITES"] + f".rank{rank}.json", "w").write(json.dumps(writes)))
if os.environ.get("STOP_AT"):
    import intruder.training.trainer as trainer

    real, calls = trainer._optimizer_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(os.environ["STOP_AT"]):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    trainer._optimizer_step = interrupted
if os.environ.get("FAIL_RANK") == rank:
    import intruder.training.trainer as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    trainer.text_loss = broken
from intruder.cli import main

sys.exit(main(sys.argv[1:]))
'''


def torchrun(tmp_path, args: list[str], *, watched, stop_at: int | None = None, fail_rank: int | None = None
             ) -> tuple[int, list, str]:
    """(return code, every rank's writes under `watched`, stderr) of `torchrun --nproc_per_node 2 intruder ARGS`."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    writes = tmp_path / f"writes-{len(list(tmp_path.glob('writes-*')))}"
    env = os.environ | {"WATCHED": str(watched), "WRITES": str(writes), "OMP_NUM_THREADS": "1"}
    if stop_at:
        env["STOP_AT"] = str(stop_at)
    if fail_rank is not None:
        env["FAIL_RANK"] = str(fail_rank)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(launcher), *args], env=env, capture_output=True, text=True, timeout=300)
    ranks = [json.loads(writes.with_name(f"{writes.name}.rank{r}.json").read_text()) for r in (0, 1)]
    return done.returncode, ranks, done.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """49 questions: 37 to train on (the last micro-batch of an epoch holds one, so rank 1 has none of it)."""
    return sample_questions_file(tmp_path_factory.mktemp("data") / "mine.jsonl", 49)


def _options(tiny_lm, data, **overrides) -> dict:
    options = dict(model=str(tiny_lm), data=str(data), test_fraction=0.25, epochs=2, batch_size=2, grad_accum=2,
                   lr=5e-3, rank=4, alpha=8, context=False, max_length=192, forget_texts=5, device="cpu")
    return options | overrides


def _argv(out, options: dict) -> list[str]:
    argv = ["train", "--out", str(out), "--quiet"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return argv


def _records(run, kind=None):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]


@pytest.fixture(scope="module")
def lora_two(tiny_lm, data, tmp_path_factory):
    """A LoRA run of 2 epochs by 2 processes with batch size 2 and accumulation 2: a global batch of 8."""
    tmp = tmp_path_factory.mktemp("two")
    code, writes, err = torchrun(tmp, _argv(tmp / "run", _options(tiny_lm, data)), watched=tmp / "run")
    assert code == 0, err
    return tmp / "run", writes


def test_two_processes_train_as_one_process_with_the_same_global_batch(lora_two, tiny_lm, data, tmp_path):
    run, writes = lora_two
    options = _options(tiny_lm, data, batch_size=4)  # 4 per micro-batch × 1 process × 2 micro-batches
    train(TrainConfig(out=str(tmp_path / "one"), **options), progress=False)
    one, two = _records(tmp_path / "one", "train"), _records(run, "train")
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(one) == 10  # 5 steps per epoch
    torch.testing.assert_close([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5, atol=0)
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    for a, b in zip(_records(run, "eval"), _records(tmp_path / "one", "eval")):
        assert (a["accuracy"], a["n_questions"], a["forget_tokens"]) == (b["accuracy"], 12, b["forget_tokens"])
        assert a["forget_loss"] == pytest.approx(b["forget_loss"], rel=1e-6)
    ours, theirs = (open_weights(r / "epoch-02" / "adapter_model.safetensors") for r in (run, tmp_path / "one"))
    for name in theirs.keys():
        torch.testing.assert_close(ours.get(name), theirs.get(name), rtol=1e-4, atol=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["config"]["world_size"]) == (2, 8, 2)
    assert writes[1] == [] and writes[0]  # rank 0 wrote everything, rank 1 nothing
    assert len(_records(run)) == len(_records(tmp_path / "one"))  # every record once


def test_the_adapter_of_two_processes_loads_in_peft(lora_two, tiny_lm):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run, _ = lora_two
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), run / "epoch-02")
    saved = open_weights(run / "epoch-02" / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved.keys()) == 28
    for name in saved.keys():
        assert torch.equal(loaded[name], saved.get(name))


def test_resume_under_torchrun_continues_exactly(lora_two, tiny_lm, data, tmp_path, capsys):
    whole, _ = lora_two
    out, options = tmp_path / "run", _options(tiny_lm, data)
    code, _, _ = torchrun(tmp_path, _argv(out, options), watched=out, stop_at=7)  # in the second epoch
    assert code != 0 and sorted(p.name for p in out.glob("epoch-*")) == ["epoch-01"]
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2  # one process: another global batch
    assert "trained by 2 process(es), this is 1" in capsys.readouterr().err
    code, writes, err = torchrun(tmp_path, ["train", "--out", str(out), "--resume", "--quiet"], watched=out)
    assert code == 0, err
    assert writes[1] == []
    for epoch in ("epoch-01", "epoch-02"):
        assert (out / epoch / "adapter_model.safetensors").read_bytes() == (
            whole / epoch / "adapter_model.safetensors").read_bytes()
    untimed = [[{k: v for k, v in r.items() if k not in TIMING} for r in _records(run)] for run in (out, whole)]
    assert untimed[0] == untimed[1]


def test_full_fine_tuning_under_torchrun(tiny_lm, data, tmp_path):
    options = _options(tiny_lm, data, method="full", lr=1e-3, epochs=1, grad_accum=1)
    code, writes, err = torchrun(tmp_path, _argv(tmp_path / "two", options), watched=tmp_path / "two")
    assert code == 0, err
    train(TrainConfig(out=str(tmp_path / "one"), **options | {"batch_size": 4}), progress=False)
    one, two = (_records(tmp_path / run, "train") for run in ("one", "two"))
    torch.testing.assert_close([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5, atol=0)
    ours, theirs = (open_weights(tmp_path / run / "epoch-01") for run in ("two", "one"))
    for name in theirs.keys():
        torch.testing.assert_close(ours.get(name), theirs.get(name), rtol=1e-4, atol=1e-6)
    assert writes[1] == []


def test_an_error_on_one_rank_is_raised_on_both_and_leaves_out_as_it_was(tiny_lm, data, tmp_path):
    out = tmp_path / "run"
    code, writes, err = torchrun(tmp_path, _argv(out, _options(tiny_lm, data)), watched=out, fail_rank=1)
    message = "intruder: error: rank 1 failed while evaluating: RuntimeError: out of memory"
    assert code != 0 and err.count(message) == 2, err  # said by both ranks, which exit: nothing hangs
    assert not out.exists() and writes[0] and writes[1] == []  # rank 0 removed the run it had begun
