import json
import math
import re

import pytest
import torch

from intruder import IntruderError, find_intruders, open_weights
from intruder.cli import main
from intruder.errors import WeightsNotFoundError
from intruder.training.data import load_mcq
from intruder.training.trainer import TrainConfig, train
from tests.conftest import sample_questions_file

TIMING = ("tokens_per_s", "elapsed_s")


def _config(tiny_lm, out, **overrides):
    options = dict(out=str(out), model=str(tiny_lm), epochs=2, batch_size=8, lr=5e-3, rank=4, alpha=8,
                   context=False, max_length=192)  # the tiny tokenizer needs 188 for the longest options
    return TrainConfig(**(options | overrides))


def _records(run, kind=None):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_lora_run_writes_checkpoints_metrics_and_summary(tiny_lm, tmp_path):
    summary = train(_config(tiny_lm, tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    assert summary["checkpoints"] == ["epoch-01", "epoch-02"]
    evals, steps = _records(run, "eval"), _records(run, "train")
    assert [e["epoch"] for e in evals] == [0, 1, 2]
    assert len(steps) == summary["steps"] > 0 and steps[-1]["epoch"] == 2.0
    assert set(steps[0]) == {"kind", "step", "epoch", "loss", "lr", "tokens_per_s", "elapsed_s"}
    assert set(evals[0]) >= {"accuracy", "n_questions", "forget_loss", "perplexity", "forget_tokens"}
    per_epoch = len(steps) // 2
    assert sum(s["loss"] for s in steps[per_epoch:]) < sum(s["loss"] for s in steps[:per_epoch])  # it learns
    saved = json.loads((run / "summary.json").read_text())
    assert saved["forgetting"] == pytest.approx(evals[-1]["forget_loss"] - evals[0]["forget_loss"])
    assert saved["config"]["model_path"] == str(tiny_lm) and saved["versions"]["torch"] == torch.__version__
    report = find_intruders(saved["config"]["model_path"], run / "epoch-02", top_k=4, cache_dir=False,
                            progress=False)
    assert len(report) == 14  # every adapted projection of the 2-layer model


def test_learning_rate_warms_up_then_decays(tiny_lm, tmp_path):
    train(_config(tiny_lm, tmp_path / "run", epochs=4, warmup=0.25, schedule="linear"), progress=False)
    lrs = [s["lr"] for s in _records(tmp_path / "run", "train")]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and max(lrs) <= 5e-3
    assert lrs[:peak] == sorted(lrs[:peak]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_continues_an_interrupted_run_exactly(tiny_lm, tmp_path, monkeypatch, method):
    settings = dict(epochs=2, method=method, dropout=0.1, lr=5e-3 if method == "lora" else 1e-3)
    train(_config(tiny_lm, tmp_path / "whole", **settings), progress=False)
    per_epoch = sum(r["epoch"] <= 1 for r in _records(tmp_path / "whole", "train"))
    import intruder.training.trainer as trainer

    real_step, calls = trainer._optimizer_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == per_epoch + 3:  # inside the second epoch
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    broken = _config(tiny_lm, tmp_path / "broken", **settings)
    monkeypatch.setattr(trainer, "_optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(broken, progress=False)
    monkeypatch.setattr(trainer, "_optimizer_step", real_step)
    assert sorted(p.name for p in (tmp_path / "broken").glob("epoch-*")) == ["epoch-01"]
    train(broken, resume=True, progress=False)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    for epoch in ("epoch-01", "epoch-02"):
        whole, resumed = (tmp_path / run / epoch / weights for run in ("whole", "broken"))
        assert whole.read_bytes() == resumed.read_bytes()
    assert _untimed(_records(tmp_path / "whole")) == _untimed(_records(tmp_path / "broken"))


def test_full_fine_tuning_changes_only_linear_weights(tiny_lm, tmp_path):
    train(_config(tiny_lm, tmp_path / "full", method="full", epochs=1, lr=1e-3), progress=False)
    base, tuned = open_weights(tiny_lm), open_weights(tmp_path / "full" / "epoch-01")
    changed = {k for k in base.keys() if not torch.equal(base.get(k), tuned.get(k))}
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    assert len(changed) == 14
    report = find_intruders(tiny_lm, tmp_path / "full" / "epoch-01", top_k=4, cache_dir=False, progress=False)
    assert all(layer.update == "dense" for layer in report.layers)


def test_answer_text_loss_and_user_data(tiny_lm, tmp_path):
    data = sample_questions_file(tmp_path / "mine.jsonl", 20)
    summary = train(_config(tiny_lm, tmp_path / "run", data=str(data), loss="answer", scoring="mean-loglik",
                            test_fraction=0.25, epochs=1), progress=False)
    assert summary["n_train"] == 15 and summary["n_test"] == 5
    assert all(s["loss"] > 0 for s in _records(tmp_path / "run", "train"))


def test_output_directory_rules(tiny_lm, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_lm, out, epochs=1), progress=False)
    with pytest.raises(IntruderError, match="holds another training run; pass --resume .* --overwrite"):
        train(_config(tiny_lm, out, epochs=1), progress=False)
    with pytest.raises(IntruderError, match=r"other settings \(rank differ\)"):
        train(_config(tiny_lm, out, epochs=1, rank=2), resume=True, progress=False)
    train(_config(tiny_lm, out, epochs=1, rank=2), overwrite=True, progress=False)
    assert json.loads((out / "config.json").read_text())["rank"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(IntruderError, match="not empty and holds no training run"):
        train(_config(tiny_lm, tmp_path / "other"), overwrite=True, progress=False)
    with pytest.raises(IntruderError, match="no finished epoch to resume"):
        train(_config(tiny_lm, tmp_path / "fresh"), resume=True, progress=False)


def test_interrupted_checkpoint_leaves_no_broken_directory(tiny_lm, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("intruder.training.lora.write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_lm, tmp_path / "run", epochs=1), progress=False)
    assert not list((tmp_path / "run").glob("*epoch-01*")) and not (tmp_path / "run" / "state.pt").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"rank": 0}, "rank=0"),
    ({"rank": 33}, "rank 33 exceeds layer"),
    ({"targets": ("qkv",)}, "'qkv' matches no .* one of:"),
    ({"method": "dora"}, "method='dora'"),
    ({"epochs": 0}, "epochs=0"),
    ({"lr": -1.0}, "need lr > 0"),
])
def test_bad_settings_are_refused(tiny_lm, tmp_path, overrides, message):
    with pytest.raises(IntruderError, match=message):
        train(_config(tiny_lm, tmp_path / "run", **overrides), progress=False)


def test_missing_model_and_data(tmp_path, tiny_lm):
    with pytest.raises(WeightsNotFoundError, match="no such directory, .gguf file or hub id"):
        train(_config(tmp_path / "nope", tmp_path / "run"), progress=False)
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        train(_config(tmp_path, tmp_path / "run"), progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(IntruderError, match="holds no questions"):
        train(_config(tiny_lm, tmp_path / "run2", data=str(tmp_path / "empty.jsonl")), progress=False)


def test_cli_train_and_resume(tiny_lm, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_lm), "--out", str(out), "--epochs", "1", "--rank", "2", "--no-context",
            "--lr", "1e-3", "--targets", "q_proj", "v_proj", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out questions" in printed and "epoch-01" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["targets"] == ["q_proj", "v_proj"] and config["context"] is False
    assert main(args) == 2
    assert "holds another training run" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # settings come from config.json
    assert main(["train", "--out", str(out), "--resume", "--rank", "4"]) == 2
    assert "rank differ" in capsys.readouterr().err


def test_gradient_accumulation_matches_one_large_batch(tiny_lm, tmp_path):
    train(_config(tiny_lm, tmp_path / "large", epochs=1, batch_size=8), progress=False)
    train(_config(tiny_lm, tmp_path / "accum", epochs=1, batch_size=4, grad_accum=2), progress=False)
    large, accum = (open_weights(tmp_path / run / "epoch-01" / "adapter_model.safetensors")
                    for run in ("large", "accum"))
    for name in large.keys():
        torch.testing.assert_close(accum.get(name), large.get(name), rtol=1e-4, atol=1e-6)
    steps = [[r["step"] for r in _records(tmp_path / run, "train")] for run in ("large", "accum")]
    assert steps[0] == steps[1]  # one optimizer step per 8 questions either way


def _snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fail(*args, **kwargs):
    raise RuntimeError("out of memory")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_overwrite_checks_data_model_and_settings_before_touching_the_run(tiny_lm, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_lm, out, epochs=1), progress=False)
    before = _snapshot(out)
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        train(_config(tiny_lm, out, data=str(tmp_path / "typo.jsonl")), overwrite=True, progress=False)
    with pytest.raises(WeightsNotFoundError, match="no such directory"):
        train(_config(tmp_path / "no-model", out), overwrite=True, progress=False)
    with pytest.raises(IntruderError, match="max_length=1 tokens would cut into the options"):
        train(_config(tiny_lm, out, max_length=1), overwrite=True, progress=False)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_that_fails_before_its_first_epoch_leaves_out_as_it_was(tiny_lm, tmp_path, monkeypatch):
    import intruder.training.trainer as trainer

    out = tmp_path / "run"
    train(_config(tiny_lm, out, epochs=1), progress=False)
    before = _snapshot(out)
    monkeypatch.setattr(trainer, "_optimizer_step", _fail)
    with pytest.raises(RuntimeError, match="out of memory"):  # the replaced run comes back
        train(_config(tiny_lm, out, epochs=1, rank=2), overwrite=True, progress=False)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.setattr(trainer, "_optimizer_step", _interrupt)
    with pytest.raises(KeyboardInterrupt):  # no empty folders left where there were none
        train(_config(tiny_lm, tmp_path / "new" / "deeper" / "run", epochs=1), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "empty").mkdir()  # the user's empty folder stays, empty
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_lm, tmp_path / "empty", epochs=1), progress=False)
    assert list((tmp_path / "empty").iterdir()) == []


def test_cli_train_refuses_a_bad_out_or_device_before_loading_anything(tiny_lm, tmp_path, monkeypatch, capsys):
    import intruder.training.trainer as trainer

    monkeypatch.setattr(trainer, "load_model", _fail)  # every refusal comes before the model is loaded
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch
    (tmp_path / "notes").write_text("mine")
    command = ["train", "--model", str(tiny_lm), "--epochs", "1", "--quiet"]
    for extra, message in [
        (["--out", str(tmp_path / "notes")], "notes is a file, not a directory"),
        (["--out", str(tmp_path / "notes" / "run")], "notes is a file, not a directory"),
        (["--out", str(tmp_path / "run"), "--device", "foo"], "device='foo' is not a torch device"),
        (["--out", str(tmp_path / "run"), "--device", "cuda"], "device='cuda' but this torch"),
    ]:
        assert main(command + extra) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr("intruder.outputs.os.access", lambda *args, **kwargs: False)  # as a folder of another user
    assert main(command + ["--out", str(tmp_path / "run")]) == 2
    assert "no permission to write in" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_resume_of_a_run_without_its_config_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.pt").write_bytes(b"state")
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.json'} does not exist" in err and "--overwrite" in err
    (run / "config.json").write_text("{broken")
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    assert f"{run / 'config.json'} cannot be read" in capsys.readouterr().err


def test_resume_finds_the_run_by_its_folder_however_out_is_written(tiny_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", str(tiny_lm), "--out", "run", "--epochs", "1", "--rank", "2", "--no-context",
                 "--targets", "q_proj", "--forget-texts", "4", "--quiet"]) == 0
    for out in ("./run", "run/", str(tmp_path / "run")):
        assert main(["train", "--out", out, "--resume", "--quiet"]) == 0, capsys.readouterr().err
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--out", "../run", "--resume", "--quiet"]) == 0, capsys.readouterr().err
    (tmp_path / "run").rename(tmp_path / "moved")  # a moved run: the folder given holds it
    assert main(["train", "--out", "../moved", "--resume", "--quiet"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "moved" / "config.json").read_text())["out"] == "../moved"
    assert main(["train", "--out", "../moved", "--resume", "--rank", "4"]) == 2  # other settings still differ
    assert "rank differ" in capsys.readouterr().err


def test_ctrl_c_in_train_says_what_was_kept_and_how_to_resume(tiny_lm, tmp_path, monkeypatch, capsys):
    import intruder.training.trainer as trainer

    real_checkpoint = trainer._checkpoint

    def interrupted(model, config, out, epoch, model_path):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_checkpoint(model, config, out, epoch, model_path)

    out = tmp_path / "run"
    command = ["train", "--model", str(tiny_lm), "--epochs", "2", "--rank", "2", "--no-context", "--targets",
               "q_proj", "--forget-texts", "4", "--quiet", "--out"]
    monkeypatch.setattr(trainer, "_checkpoint", interrupted)
    assert main(command + [str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted. Kept: epoch-01 of 2 epochs in" in err and "Traceback" not in err
    assert f"To continue, run:\n  intruder train --out {out} --resume" in err
    monkeypatch.setattr(trainer, "_checkpoint", real_checkpoint)
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0  # the command it printed
    assert (out / "epoch-02").is_dir()
    monkeypatch.setattr(trainer, "_optimizer_step", _interrupt)  # Ctrl-C before the first epoch ends
    assert main(command + [str(tmp_path / "second")]) == 130
    err = capsys.readouterr().err
    assert "Kept: nothing new: no epoch had finished" in err and "run the same command again" in err
    assert not (tmp_path / "second").exists()
    assert main(command + [str(out), "--overwrite"]) == 130  # the run it would replace comes back
    err = capsys.readouterr().err
    assert "no epoch had finished" in err and "--resume" not in err and (out / "epoch-02").is_dir()


def test_a_max_length_that_cuts_the_options_is_refused_and_truncation_is_said(tiny_lm, tmp_path):
    with pytest.raises(IntruderError, match=r"max_length=1 tokens would cut into the options or the answer cue "
                                            r"'Đáp án:' of \d+ of \d+ prompts") as refused:
        train(_config(tiny_lm, tmp_path / "run", max_length=1), progress=False)
    assert not (tmp_path / "run").exists()
    need = int(re.search(r"max_length >= (\d+) \(--max-length \1\)", str(refused.value)).group(1))
    with pytest.warns(UserWarning, match=rf"\d+ of \d+ prompts are longer than max_length={need} tokens"):
        summary = train(_config(tiny_lm, tmp_path / "run", max_length=need, epochs=1), progress=False)
    assert summary["checkpoints"] == ["epoch-01"]
    with pytest.raises(IntruderError, match=rf"use max_length >= {need} "):
        train(_config(tiny_lm, tmp_path / "short", max_length=need - 1), progress=False)


# ---- what the optimizer does, step by step, against values computed by hand ------------------------------------


@pytest.fixture
def optimizer_steps():
    """Every optimizer step taken while the test runs: the lr and weight decay it used, each parameter before and
    after it, and the gradient it was given (after accumulation and clipping)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    steps = []

    def before(optimizer, args, kwargs):
        (group,) = optimizer.param_groups
        steps.append({"lr": group["lr"], "weight_decay": group["weight_decay"], "eps": group["eps"],
                      "before": [p.detach().clone() for p in group["params"]],
                      "grad": [p.grad.detach().clone() for p in group["params"]]})

    def after(optimizer, args, kwargs):
        steps[-1]["after"] = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]

    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    yield steps
    for handle in handles:
        handle.remove()


def _questions_file(path, n_train: int, n_test: int = 2):
    """A data file of the first bundled questions with an explicit split: n_train to train on, n_test held out."""
    rows = [q.to_row() | {"split": "train" if i < n_train else "test"}
            for i, q in enumerate(load_mcq("sample")[:n_train + n_test])]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _letter_gradients(model, tokenizer, questions, trainable):
    """Per question, by hand: the gradient of its answer letter's cross-entropy, from the model run on its prompt
    alone (no padding, no batching); and the losses. -> ([per question: [grad per parameter]], [loss])."""
    from intruder.training.evaluate import encode_prompts, letter_token_ids

    letters = letter_token_ids(tokenizer)
    prompts = encode_prompts(tokenizer, [q.prompt(context=False) for q in questions], 192)
    grads, losses = [], []
    for prompt, q in zip(prompts, questions):
        model.zero_grad(set_to_none=True)
        logits = model(torch.tensor([prompt])).logits[0, -1]
        loss = torch.nn.functional.cross_entropy(logits[None].double(), torch.tensor([letters[q.answer_index]]))
        loss.backward()
        grads.append([p.grad.double().clone() for p in trainable])
        losses.append(loss.item())
    return grads, losses


@pytest.mark.parametrize("batch_size, grad_accum", [(3, 2), (2, 3)], ids=["3+2", "2+2+1"])
def test_gradient_accumulation_weights_every_question_alike_over_unequal_micro_batches(
        tiny_lm, tmp_path, optimizer_steps, batch_size, grad_accum):
    """Five questions in one optimizer step, as micro-batches of unequal size: the accumulated gradient is that of
    the mean loss over the five questions (each weighs 1/5), computed by hand, not the mean of micro-batch means."""
    from itertools import combinations

    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _questions_file(tmp_path / "data.jsonl", n_train=5)
    summary = train(_config(tiny_lm, tmp_path / "run", data=str(data), method="full", epochs=1, lr=1e-3,
                            batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=1e9, forget_texts=1,
                            eval_before=False), progress=False)
    assert summary["steps"] == 1 and len(optimizer_steps) == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    head = model.get_output_embeddings()
    trainable = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    grads, losses = _letter_gradients(model, AutoTokenizer.from_pretrained(tiny_lm), load_mcq(data, split="train"),
                                      trainable)
    expected = [sum(g[i] for g in grads) / 5 for i in range(len(trainable))]  # every question weighs 1/5
    seen = optimizer_steps[0]["grad"]
    assert [tuple(g.shape) for g in seen] == [tuple(p.shape) for p in trainable]
    scale = max(float(e.abs().max()) for e in expected)
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)
    # the test tells the weightings apart: for any split of the five into micro-batches of these sizes, the mean of
    # the micro-batches' mean gradients is far from the mean over questions
    sizes = [batch_size] * (5 // batch_size) + ([5 % batch_size] if 5 % batch_size else [])
    for first in combinations(range(5), sizes[0]):
        rest = [i for i in range(5) if i not in first]
        parts = [list(first), rest[:sizes[1]], rest[sizes[1]:]][:len(sizes)]
        per_batch = [sum(sum(grads[j][i] for j in part) / len(part) for part in parts) / len(parts)
                     for i in range(len(trainable))]
        assert max(float((a - b).abs().max()) for a, b in zip(per_batch, expected)) > 1e-2 * scale
    (record,) = _records(tmp_path / "run", "train")
    assert record["loss"] == pytest.approx(sum(losses) / 5, rel=1e-4)  # the mean over questions, too


def test_cli_full_fine_tuning_step_is_adamw_by_hand(tiny_lm, tmp_path, optimizer_steps, capsys):
    """One optimizer step of `intruder train --method full --train-embeddings --weight-decay --max-grad-norm` with
    the default learning rate: every parameter moves exactly as AdamW's first step says, computed here by hand,
    p' = p (1 − lr·wd) − lr · g / (|g| + eps), with g the gradient clipped to the given norm."""
    from intruder.training.config import DEFAULT_LR

    data = _questions_file(tmp_path / "data.jsonl", n_train=6)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_lm), "--data", str(data), "--out", str(out), "--method", "full",
                 "--train-embeddings", "--weight-decay", "0.5", "--max-grad-norm", "0.05", "--epochs", "1",
                 "--batch-size", "8", "--no-context", "--max-length", "192", "--forget-texts", "1", "--quiet"]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == DEFAULT_LR["full"] == 2e-5 and config["weight_decay"] == 0.5
    assert config["max_grad_norm"] == 0.05 and config["train_embeddings"] is True
    (step,) = optimizer_steps
    assert step["lr"] == 2e-5 and step["weight_decay"] == 0.5  # one step: no warm-up, the peak lr
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in step["grad"]]))
    assert float(norm) == pytest.approx(0.05, rel=1e-4)  # clipped to --max-grad-norm (the raw norm is larger)
    vocab = json.loads((tiny_lm / "config.json").read_text())["vocab_size"]
    assert (vocab, 32) in [tuple(p.shape) for p in step["before"]]  # the (tied) embedding is trained
    lr, wd, eps = 2e-5, 0.5, step["eps"]
    for p, g, new in zip(step["before"], step["grad"], step["after"]):
        p, g = p.double(), g.double()
        expected = p * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(new.double(), expected, rtol=1e-6, atol=1e-9)
    base, tuned = open_weights(tiny_lm), open_weights(out / "epoch-01")
    assert not torch.equal(base.get("model.embed_tokens.weight"), tuned.get("model.embed_tokens.weight"))


def _multiplier(schedule: str, warmup_fraction: float, total: int, step: int) -> float:
    """The documented schedule, written out: a linear warm-up over round(warmup · total) steps to the peak lr (step
    i of the warm-up at (i + 1) / (warmup + 1)), then cosine or linear decay towards 0 at the end, or constant."""
    warmup = round(warmup_fraction * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    return (1 + math.cos(math.pi * done)) / 2 if schedule == "cosine" else 1 - done


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_multipliers_follow_the_formula_step_by_step(tmp_path, schedule):
    from intruder.training.trainer import _lr_lambda

    for total in (1, 2, 5, 10, 37):
        for warmup in (0.0, 0.1, 0.3, 0.5):
            factor = _lr_lambda(TrainConfig(out=str(tmp_path), warmup=warmup, schedule=schedule), total)
            got = [factor(step) for step in range(total)]
            assert got == pytest.approx([_multiplier(schedule, warmup, total, s) for s in range(total)], abs=1e-15)
            assert all(0 < f <= 1 for f in got)
    factor = _lr_lambda(TrainConfig(out=str(tmp_path), warmup=0.25, schedule=schedule), 8)  # 2 warm-up steps
    assert [factor(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


@pytest.mark.parametrize("options, schedule, warmup", [
    ([], "cosine", 0.1),  # the defaults
    (["--schedule", "linear", "--warmup", "0.25"], "linear", 0.25),
    (["--schedule", "constant", "--warmup", "0.25"], "constant", 0.25),
])
def test_cli_train_uses_each_schedule_at_the_default_lora_lr(tiny_lm, tmp_path, optimizer_steps, capsys, options,
                                                             schedule, warmup):
    """The lr every optimizer step of a LoRA run actually used, against the schedule's formula at the default peak
    lr (2e-4 for LoRA): 8 questions, batch 1, 2 epochs, 16 steps."""
    data = _questions_file(tmp_path / "data.jsonl", n_train=8)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_lm), "--data", str(data), "--out", str(out), "--epochs", "2",
                 "--batch-size", "1", "--rank", "2", "--targets", "q_proj", "--no-context", "--max-length", "192",
                 "--forget-texts", "1", "--quiet", *options]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 2e-4 and config["schedule"] == schedule and config["warmup"] == warmup
    used = [step["lr"] for step in optimizer_steps]
    assert len(used) == 16
    assert used == pytest.approx([2e-4 * _multiplier(schedule, warmup, 16, s) for s in range(16)], rel=1e-12)


def test_each_step_logs_the_lr_it_used(tiny_lm, tmp_path, optimizer_steps):
    data = _questions_file(tmp_path / "data.jsonl", n_train=8)
    train(_config(tiny_lm, tmp_path / "run", data=str(data), epochs=1, batch_size=2, forget_texts=1,
                  eval_before=False), progress=False)
    logged = [r["lr"] for r in _records(tmp_path / "run", "train")]
    assert logged == [step["lr"] for step in optimizer_steps]
