import json

import pytest
import torch

from intruder import IntruderError, find_intruders, open_weights
from intruder.cli import main
from intruder.errors import WeightsNotFoundError
from intruder.training.data import load_mcq
from intruder.training.trainer import TrainConfig, train

TIMING = ("tokens_per_s", "elapsed_s")


def _config(tiny_lm, out, **overrides):
    options = dict(out=str(out), model=str(tiny_lm), epochs=2, batch_size=8, lr=5e-3, rank=4, alpha=8,
                   context=False, max_length=128)
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
    rows = [q.to_row() | {"split": ""} for q in load_mcq("sample")[:20]]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
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
