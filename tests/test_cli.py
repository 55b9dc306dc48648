"""`intruder analyze` end to end, on files, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from intruder.cli import main
from intruder.synthetic import planted, random_adapter
from tests.conftest import save_model_dir


def models(tmp_path):
    w0, wt, _, _ = planted(48, 64, n_intruders=2)
    base = save_model_dir(tmp_path / "base", {"model.layers.0.mlp.up_proj.weight": w0.float()})
    tuned = save_model_dir(tmp_path / "tuned", {"model.layers.0.mlp.up_proj.weight": wt.float()})
    return base, tuned


def test_analyze_prints_a_table_and_writes_json(tmp_path, capsys):
    base, tuned = models(tmp_path)
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "r.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in out and "total: 2 intruders" in out
    assert json.loads((tmp_path / "r.json").read_text())["total"] == 2


def test_analyze_an_adapter_with_options(tmp_path, capsys):
    base, _ = models(tmp_path)
    adapter = random_adapter(base, tmp_path / "adapter", rank=4, strength=5.0, targets=("up_proj",))
    code = main(["analyze", str(base), str(adapter), "--top-k", "5", "--side", "both", "--threshold", "0.3",
                 "--layers", "up_proj", "--out", str(tmp_path / "r.csv"), "--quiet", "--workers", "1"])
    assert code == 0
    assert "k=5, ε=0.3, side=both" in capsys.readouterr().out
    assert (tmp_path / "r.csv").read_text().startswith("name,")


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    base, tuned = models(tmp_path)
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "r.txt")]) == 2


def test_the_installed_console_script_runs(tmp_path):
    """`intruder`, the command pip installed next to this Python (not `python -m intruder.cli`), end to end."""
    script = Path(sys.executable).parent / ("intruder.exe" if os.name == "nt" else "intruder")
    assert script.is_file(), f"no console script at {script}: install the package (pip install -e '.[test]')"
    base, tuned = models(tmp_path)
    done = subprocess.run([str(script), "analyze", str(base), str(tuned), "--quiet", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["name", "shape", "intr", "min", "cos", "ΔW", "erank", "indices"]
    row = lines[1].split()
    assert row[:3] == ["model.layers.0.mlp.up_proj.weight", "48x64", "2"] and row[-2:] == ["0", "1"]
    assert float(row[3]) == pytest.approx(0.25, abs=1e-3)  # the planted intruders' max |cos|
    assert lines[2] == "total: 2 intruders in 1 matrices (k=10, ε=0.5, side=left)"
    assert lines[3] == f"wrote {tmp_path / 'r.json'}"
    assert json.loads((tmp_path / "r.json").read_text())["total"] == 2
    failed = subprocess.run([str(script), "analyze", str(tmp_path / "missing"), str(tuned)], capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.startswith("intruder: error: ") and not failed.stdout


def test_device_cache_dir_and_no_cache(tmp_path, monkeypatch, capsys):
    import intruder.analysis.projection as projection
    import intruder.analysis.spectra as spectra

    base, tuned = models(tmp_path)
    default_cache = Path(os.environ["INTRUDER_CACHE"])
    decompositions, real = [], spectra.base_factors

    def counted(w):
        decompositions.append(tuple(w.shape))
        return real(w)

    monkeypatch.setattr(spectra, "base_factors", counted)
    monkeypatch.setattr(projection, "base_factors", counted)

    def analyze(*options) -> dict:
        out = tmp_path / "r.json"
        assert main(["analyze", str(base), str(tuned), "--quiet", "--out", str(out), *options]) == 0
        assert "total: 2 intruders" in capsys.readouterr().out
        return json.loads(out.read_text())

    mine = tmp_path / "my-cache"
    first = analyze("--cache-dir", str(mine), "--device", "cpu")
    assert first["meta"]["device"] == "cpu" and first["meta"]["cache"] == str(mine)
    assert len(list((mine / "factors").rglob("*.safetensors"))) == 1 and len(decompositions) == 1
    assert not default_cache.exists() or not list(default_cache.rglob("*.safetensors"))  # nothing elsewhere
    again = analyze("--cache-dir", str(mine))
    assert len(decompositions) == 1  # the entry in --cache-dir was read: no decomposition
    assert again["layers"][0]["max_cos_left"] == first["layers"][0]["max_cos_left"]
    no_cache = analyze("--no-cache", "--cache-dir", str(tmp_path / "unused"))
    assert len(decompositions) == 2 and no_cache["meta"]["cache"] is None  # the warm entry was not read...
    assert not (tmp_path / "unused").exists()  # ...and nothing was written
    assert not default_cache.exists() or not list(default_cache.rglob("*.safetensors"))
    analyze()  # neither option: the default cache ($INTRUDER_CACHE here)
    assert len(list((default_cache / "factors").rglob("*.safetensors"))) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_gives_the_cpu_answer(tmp_path, capsys):
    base, tuned = models(tmp_path)
    results = {}
    for device in ("cpu", "cuda"):
        assert main(["analyze", str(base), str(tuned), "--quiet", "--no-cache", "--device", device,
                     "--out", str(tmp_path / f"{device}.json")]) == 0
        results[device] = json.loads((tmp_path / f"{device}.json").read_text())
    assert results["cuda"]["meta"]["device"].startswith("cuda")
    assert results["cuda"]["total"] == results["cpu"]["total"] == 2
    for key in ("max_cos_left", "max_cos_right", "singular_values"):
        np.testing.assert_allclose(results["cuda"]["layers"][0][key], results["cpu"]["layers"][0][key], atol=1e-8)


def _must_not_run(*args, **kwargs):
    raise AssertionError("the analysis ran although --out cannot be written")


def test_analyze_out_is_renamed_in_never_written_in_place(tmp_path, monkeypatch):
    base, tuned = models(tmp_path)
    for name in ("r.json", "r.csv"):
        out = tmp_path / name
        out.write_text("old")
        os.link(out, tmp_path / f"before-{name}")  # a second name for the old file
        assert main(["analyze", str(base), str(tuned), "--out", str(out), "--quiet"]) == 0
        assert (tmp_path / f"before-{name}").read_text() == "old"  # the old file was left whole
        assert out.read_text() != "old"
    done = (tmp_path / "r.json").read_text()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr("intruder.outputs.os.fsync", interrupted)  # Ctrl-C while the new file is being written
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "r.json"), "--quiet", "--no-cache",
                 "--threshold", "0.3"]) == 130
    assert (tmp_path / "r.json").read_text() == done and not list(tmp_path.glob(".r.json*"))


def test_analyze_refuses_an_out_it_cannot_write_before_analysing(tmp_path, monkeypatch, capsys):
    base, tuned = models(tmp_path)
    monkeypatch.setattr("intruder.analysis.find_intruders", _must_not_run)
    (tmp_path / "taken.json").mkdir()
    (tmp_path / "notes").write_text("mine")
    for out, message in [(tmp_path / "taken.json", "is a directory"),
                         (tmp_path / "notes" / "r.json", "notes is a file, not a directory")]:
        assert main(["analyze", str(base), str(tuned), "--out", str(out), "--quiet"]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr("intruder.outputs.os.access", lambda *args, **kwargs: False)  # as a folder of another user
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "new" / "r.json"), "--quiet"]) == 2
    assert "no permission to write in" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "mine" and not (tmp_path / "new").exists()


@pytest.mark.parametrize("option, message", [
    (["--layers", "("], "layers='(' is not a valid regular expression"),
    (["--device", "foo"], "device='foo' is not a torch device"),
    (["--device", "cuda"], "device='cuda' but this torch"),
])
def test_analyze_bad_layers_or_device_exit_2(tmp_path, monkeypatch, capsys, option, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch
    base, tuned = models(tmp_path)
    assert main(["analyze", str(base), str(tuned), "--quiet", *option]) == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_in_analyze_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    base, tuned = models(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("intruder.analysis.find_intruders", interrupted)
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "r.json"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted. Kept: nothing was written" in err and "run the same command again" in err
    assert "Traceback" not in err and not (tmp_path / "r.json").exists()


def test_analyze_an_adapter_alone_takes_its_base_from_the_adapter(tmp_path, capsys):
    base, _ = models(tmp_path)
    adapter = random_adapter(base, tmp_path / "adapter", rank=4, strength=5.0, targets=("up_proj",))
    assert main(["analyze", str(adapter), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"base model {base} (base_model_name_or_path in {adapter / 'adapter_config.json'})" in captured.err
    assert "total: " in captured.out and "up_proj" in captured.out
    assert main(["analyze", str(base), "--quiet"]) == 2  # a model, not an adapter: it names no base
    assert "is not a LoRA adapter directory" in capsys.readouterr().err
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    assert main(["analyze", str(adapter), "--quiet"]) == 2
    assert "names no base_model_name_or_path" in capsys.readouterr().err
