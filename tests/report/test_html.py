"""`intruder report` end to end on a tiny base, fabricated training runs and saved reports; the HTML page rendered
in a headless browser when one is installed."""

import matplotlib

matplotlib.use("Agg")

import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from intruder import IntruderError, IntruderReport, find_intruders  # noqa: E402
from intruder.cli import main  # noqa: E402
from intruder.report import write_report  # noqa: E402
from intruder.synthetic import random_adapter, random_base  # noqa: E402
from intruder.training.runs import load_run, read_metrics  # noqa: E402

TARGETS = ("q_proj", "v_proj", "up_proj")


def make_run(path, base, *, epochs: int = 2, rank: int = 4, metrics: bool = True, seed: int = 0):
    """A run directory as the trainer writes it: config, metrics, summary and one LoRA adapter per epoch, the
    adapters growing in strength with the epoch."""
    path.mkdir(parents=True)
    config = {"model": "tiny", "model_path": str(base), "method": "lora", "rank": rank, "alpha": 2 * rank,
              "epochs": epochs, "lr": 2e-3, "seed": seed, "data": "sample"}
    (path / "config.json").write_text(json.dumps(config))
    evals = [{"kind": "eval", "step": 10 * e, "epoch": e, "accuracy": 0.25 + 0.2 * e, "n_questions": 20,
              "forget_loss": 3.0 + 0.1 * e, "perplexity": float(np.exp(3.0 + 0.1 * e)), "forget_tokens": 900}
             for e in range(epochs + 1)]
    train = [{"kind": "train", "step": s, "epoch": s / 10, "loss": 2.0 / (1 + s / 5), "lr": 2e-3,
              "tokens_per_s": 500.0, "elapsed_s": 0.1 * s} for s in range(1, 10 * epochs + 1)]
    if metrics:
        records = sorted(evals + train, key=lambda r: (r["step"], r["kind"] == "train"))
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"config": config, "evals": evals, "accuracy_before": evals[0]["accuracy"],
               "accuracy_after": evals[-1]["accuracy"], "forgetting": 0.1 * epochs,
               "versions": {"torch": "2.x"}, "checkpoints": [f"epoch-{e:02d}" for e in range(1, epochs + 1)]}
    (path / "summary.json").write_text(json.dumps(summary))
    for e in range(1, epochs + 1):
        random_adapter(base, path / f"epoch-{e:02d}", rank=rank, alpha=2 * rank, strength=1.5 * e,
                       targets=TARGETS, seed=seed)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return random_base(tmp_path_factory.mktemp("base"), n_layers=3, hidden=48, intermediate=96)


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "lora-r4", base)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """A saved report of a rank-8 adapter, as `intruder analyze --out r.json` writes it."""
    folder = tmp_path_factory.mktemp("saved")
    adapter = random_adapter(base, folder / "adapter-r8", rank=8, strength=3.0, targets=TARGETS, seed=3)
    path = folder / "lora-r8.json"
    find_intruders(base, adapter, progress=False, cache_dir=False).to_json(path)
    return path


@pytest.fixture(scope="module")
def written(run, saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same base, same settings: nothing to warn about
        page = write_report([run, saved], out, cache_dir=False)
    return out, page


def test_run_is_read_back(run):
    loaded = load_run(run)
    assert loaded.epochs == [1, 2] and [p.name for p in loaded.checkpoints] == ["epoch-01", "epoch-02"]
    assert loaded.describe() == "LoRA r=4 α=8, 2 epochs, lr 0.002, seed 0"
    assert [r["kind"] for r in loaded.metrics[:2]] == ["eval", "train"]


def test_report_writes_every_file(written):
    out, page = written
    assert page == out / "report.html"
    figures = sorted(p.name for p in (out / "figures").iterdir())
    expected = ["compare-effective-rank", "compare-threshold-sweep", "lora-r4-training", "lora-r4-intruders-by-epoch",
                "lora-r4-intruder-map", "lora-r8-intruder-map", "lora-r8-similarity", "lora-r8-spectrum"]
    for stem in expected:
        assert f"{stem}.png" in figures and f"{stem}.svg" in figures
    assert "lora-r8-training.png" not in figures  # a saved report has no metrics
    assert all((out / "figures" / name).stat().st_size > 1000 for name in figures)
    analyses = sorted(p.name for p in (out / "analysis").iterdir())
    assert analyses == ["lora-r4-epoch-01.json", "lora-r4-epoch-02.json", "lora-r4.json", "lora-r8.json"]
    again = IntruderReport.from_json(out / "analysis" / "lora-r4.json")
    assert again.tuned.endswith("epoch-02") and again.total > 0


def test_html_is_self_contained_with_tables_settings_and_versions(written, run):
    out, page = written
    text = page.read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == len([p for p in (out / "figures").iterdir() if p.suffix == ".png"])
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing loaded from elsewhere
    for needed in ("model.layers.2.mlp.up_proj.weight", "lora-r4", "lora-r8", "accuracy before", "threshold ε",
                   "&quot;model_path&quot;", "numpy", "torch", "transformers", "intruder report", "LoRA r=4 α=8"):
        assert needed in text, needed
    total = IntruderReport.from_json(out / "analysis" / "lora-r8.json").total
    assert f'<td class="num">{total}</td>' in text


def test_markdown_has_the_same_content_with_figures_beside_it(written):
    out, _ = written
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert links and all((out / link).is_file() for link in links)
    html_text = (out / "report.html").read_text()
    assert len(links) == html_text.count("<img ")
    for heading in re.findall(r"^#+ (.+)$", md, flags=re.M)[1:]:
        assert f">{heading}</h" in html_text.replace("&amp;", "&")
    assert "| model.layers.0.self_attn.q_proj.weight |" in md and "```json" in md
    assert "| min max\\|cos\\| |" in md  # a | inside a cell is escaped, headers included


def test_different_base_warns_and_labels(run, base, tmp_path):
    other = random_base(tmp_path / "other-base", n_layers=3, hidden=48, intermediate=96, seed=7)
    adapter = random_adapter(other, tmp_path / "adapter", rank=4, targets=TARGETS)
    odd = tmp_path / "odd.json"
    find_intruders(other, adapter, progress=False, cache_dir=False).to_json(odd)
    with pytest.warns(UserWarning, match="odd analyses the base .*other-base"):
        page = write_report([run, odd], tmp_path / "out", cache_dir=False, every_epoch=False, formats=("png",))
    text = page.read_text()
    assert '<div class="notice">' in text and "not comparable" in text
    assert "<h2>odd (different base)</h2>" in text
    assert "## odd (different base)" in (tmp_path / "out" / "report.md").read_text()


def test_missing_metrics_skips_the_panel_and_says_so(base, tmp_path):
    bare = make_run(tmp_path / "bare", base, epochs=1, metrics=False)
    config = json.loads((bare / "config.json").read_text())  # trained elsewhere: its model_path is not here
    (bare / "config.json").write_text(json.dumps({**config, "model_path": str(tmp_path / "gone")}))
    with pytest.raises(IntruderError, match="does not exist here.*--base"):
        write_report([bare], tmp_path / "out")
    with pytest.warns(UserWarning, match="no metrics.jsonl"):
        page = write_report([bare], tmp_path / "out", base=base, cache_dir=False, formats=("png", "pdf"))
    figures = tmp_path / "out" / "figures"
    assert not (figures / "bare-training.png").exists() and (figures / "bare-intruder-map.pdf").is_file()
    assert "no metrics.jsonl" in page.read_text() and "no metrics.jsonl" in (tmp_path / "out" / "report.md").read_text()


def test_empty_and_bad_inputs_raise_clear_errors(base, tmp_path):
    empty = tmp_path / "empty.json"
    IntruderReport([], 0.5, 10, "left", base="b", tuned="t").to_json(empty)
    with pytest.raises(IntruderError, match="holds no analysed matrix"):
        write_report([empty], tmp_path / "out")
    assert not (tmp_path / "out" / "figures").exists()  # no empty figure written
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(IntruderError, match="neither a saved intruder report"):
        write_report([tmp_path / "notes.txt"], tmp_path / "out")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(IntruderError, match="cannot be read as an intruder report"):
        write_report([tmp_path / "other.json"], tmp_path / "out")
    with pytest.raises(IntruderError, match="no input"):
        write_report([], tmp_path / "out")
    with pytest.raises(IntruderError, match="2 labels for 1 inputs"):
        write_report([empty], tmp_path / "out", labels=["a", "b"])


def test_metrics_reader(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "eval", "epoch": 0, "accuracy": 0.3}\n\n{"kind": "train", "ep')
    with pytest.warns(UserWarning, match="truncated last line"):
        assert read_metrics(tmp_path) == [{"kind": "eval", "epoch": 0, "accuracy": 0.3}]
    path.write_text('not json\n{"kind": "eval"}\n')
    with pytest.raises(IntruderError, match="metrics.jsonl:1"):
        read_metrics(path)
    with pytest.raises(IntruderError, match="no config.json"):
        load_run(tmp_path)


def test_cli_report(run, tmp_path, capsys):
    code = main(["report", str(run), "--out", str(tmp_path / "r"), "--labels", "r=4", "--last-only", "--quiet",
                 "--no-cache", "--formats", "png"])
    assert code == 0
    assert "report.html" in capsys.readouterr().out
    figures = tmp_path / "r" / "figures"
    assert (figures / "r-4-intruder-map.png").is_file() and not (figures / "r-4-intruder-map.svg").exists()
    assert not (figures / "r-4-intruders-by-epoch.png").exists()  # --last-only
    assert "--last-only" in (tmp_path / "r" / "report.md").read_text()
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2
    assert "neither a saved intruder report" in capsys.readouterr().err


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _screenshot(browser: str, page, png, size=(1200, 2400)) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
                    f"--user-data-dir={png.parent / ('profile-' + png.stem)}", f"--screenshot={png}",
                    f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)


def _colours(png) -> tuple[int, float]:
    """Distinct colours, and the fraction of pixels in a saturated colour (figures; the text is grey/black)."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    distinct = len(np.unique(pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]))
    saturated = (pixels.max(axis=1) - pixels.min(axis=1)) > 60
    return distinct, float(saturated.mean())


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (apt-get install chromium): the HTML "
                    "report is not rendered in a browser")
def test_html_renders_with_its_figures_in_a_browser(written, tmp_path):
    from PIL import Image

    _, page = written
    shot, bare_shot = tmp_path / "report.png", tmp_path / "bare.png"
    _screenshot(_chromium(), page, shot)
    bare = tmp_path / "bare.html"  # the same page with every image removed
    bare.write_text(re.sub(r'<img src="data:[^"]+"', '<img src=""', page.read_text()))
    _screenshot(_chromium(), bare, bare_shot)
    assert Image.open(shot).size == (1200, 2400)
    colours, saturated = _colours(shot)
    bare_colours, bare_saturated = _colours(bare_shot)
    assert colours > 5 * bare_colours and colours > 1000  # anti-aliased plots, heat maps
    assert saturated > 0.02 and saturated > 10 * bare_saturated


def test_report_on_a_run_of_the_real_trainer(tiny_lm, tmp_path):
    from intruder.training.data import load_general_text, load_mcq
    from intruder.training.trainer import TrainConfig, train

    data, corpus = tmp_path / "data.jsonl", tmp_path / "corpus.txt"
    data.write_text("".join(json.dumps(q.to_row(), ensure_ascii=False) + "\n" for q in load_mcq("sample")[:40]),
                    encoding="utf-8")
    corpus.write_text("\n\n".join(load_general_text()[:4]), encoding="utf-8")
    run = tmp_path / "lora-run"
    summary = train(TrainConfig(out=str(run), model=str(tiny_lm), data=str(data), general_text=str(corpus),
                                epochs=2, batch_size=8, lr=5e-3, rank=4, alpha=8, context=False, max_length=192),
                    progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete run: nothing to warn about
        page = write_report([run], tmp_path / "out", progress=False)
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert any("training" in f for f in figures) and any("epoch" in f for f in figures)
    analyses = sorted(p.name for p in (tmp_path / "out" / "analysis").glob("*.json"))
    assert analyses == ["lora-run-epoch-01.json", "lora-run-epoch-02.json", "lora-run.json"]  # each epoch, last
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    for text in ("LoRA r=4 α=8, 2 epochs", f"{summary['accuracy_after']:g}", str(tiny_lm), "epoch 01, 02"):
        assert text in markdown
    assert "data:image/png;base64," in page.read_text(encoding="utf-8")


def test_a_model_directory_is_not_taken_for_a_run(tmp_path, capsys):
    import torch

    from tests.conftest import save_model_dir

    model = save_model_dir(tmp_path / "model", {"w": torch.ones(4, 4)})
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(IntruderError, match="is not a training run") as info:
        write_report([model], tmp_path / "out")
    message = str(info.value)
    assert "metrics.jsonl" in message and "intruder analyze" in message and "holds no epoch-NN" not in message
    assert main(["report", str(model), "--out", str(tmp_path / "out")]) == 2
    assert "is not a training run" in capsys.readouterr().err


@pytest.mark.parametrize("top", ["[1, 2]", "42", '"report"'])
def test_a_report_json_that_is_not_an_object(tmp_path, capsys, top):
    path = tmp_path / "r.json"
    path.write_text(top)
    with pytest.raises(IntruderError, match=r"r.json holds a JSON (list|number|string), not an intruder report"):
        write_report([path], tmp_path / "out")
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "intruder analyze" in capsys.readouterr().err


def test_a_run_that_stopped_early_says_how_to_resume(base, tmp_path):
    stopped = make_run(tmp_path / "stopped", base, epochs=1)
    config = json.loads((stopped / "config.json").read_text())
    (stopped / "config.json").write_text(json.dumps({**config, "epochs": 3}))
    notice = f"run stopped after epoch 1 of 3; resume it with `intruder train --out {stopped} --resume`"
    with pytest.warns(UserWarning, match=re.escape(notice)):
        page = write_report([stopped], tmp_path / "out", cache_dir=False, formats=("png",))
    assert notice in (tmp_path / "out" / "report.md").read_text()
    assert f"run stopped after epoch 1 of 3; resume it with <code>intruder train --out {stopped} --resume</code>" in (
        page.read_text())


def test_report_files_are_renamed_in_never_written_in_place(saved, tmp_path):
    out = tmp_path / "out"
    files = [out / "report.html", out / "report.md", out / "analysis" / "r8.json"]
    for number, path in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("an earlier report")
        os.link(path, tmp_path / f"before-{number}")  # a second name for the old file
    write_report([saved], out, labels=["r8"], formats=("png",))
    for number, path in enumerate(files):
        assert (tmp_path / f"before-{number}").read_text() == "an earlier report"  # the old file was left whole
        assert path.read_text() != "an earlier report"
    assert not [p for p in out.rglob(".*")]  # no temporary file left behind
    assert IntruderReport.from_json(out / "analysis" / "r8.json").total > 0


def test_cli_report_refuses_an_out_it_cannot_write_before_analysing(run, tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the runs were analysed although --out cannot be written")

    monkeypatch.setattr("intruder.report.html.find_intruders", must_not_run)
    (tmp_path / "notes").write_text("mine")
    for out in (tmp_path / "notes", tmp_path / "notes" / "report"):
        assert main(["report", str(run), "--out", str(out), "--quiet"]) == 2
        assert "notes is a file, not a directory" in capsys.readouterr().err
    monkeypatch.setattr("intruder.outputs.os.access", lambda *args, **kwargs: False)  # as a folder of another user
    assert main(["report", str(run), "--out", str(tmp_path / "new"), "--quiet"]) == 2
    assert "no permission to write in" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "mine" and not (tmp_path / "new").exists()


def _analyses(out) -> dict:
    """{file name: the saved analysis without its timing}: what a report's numbers come from."""
    found = {}
    for path in sorted((out / "analysis").glob("*.json")):
        data = json.loads(path.read_text())
        data["meta"].pop("seconds", None)
        found[path.name] = data
    return found


def test_the_command_in_the_report_rebuilds_it(run, saved, tmp_path, capsys):
    import shlex

    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="analysed with different settings"):  # the saved report keeps its own
        write_report([run, saved], out, labels=["a run", "saved r8"], threshold=0.3, top_k=5, side="both",
                     layers=r"q_proj|up_proj", every_epoch=False, formats=("png", "pdf"), cache_dir=False)
    markdown = (out / "report.md").read_text()
    (command,) = [line for line in markdown.splitlines() if line.startswith("intruder report ")]
    assert command in (out / "report.html").read_text().replace("&#x27;", "'").replace("&quot;", '"')
    words = shlex.split(command)
    assert words[words.index("--out") + 1] == str(out)
    first = _analyses(out)
    assert {layer["name"].split(".")[-2] for layer in first["a-run.json"]["layers"]} == {"q_proj", "up_proj"}
    assert first["a-run.json"]["side"] == "both" and first["a-run.json"]["top_k"] == 5
    figures = sorted(p.name for p in (out / "figures").iterdir())
    shutil.rmtree(out)
    assert main(words[1:] + ["--quiet", "--no-cache"]) == 0  # the command as printed, run from the shell's CLI
    capsys.readouterr()
    assert _analyses(out) == first  # the same settings: every analysis again, value for value
    assert sorted(p.name for p in (out / "figures").iterdir()) == figures
    again = (out / "report.md").read_text()
    timing = re.compile(r"written \d{4}-\d\d-\d\d \d\d:\d\d UTC|seconds \| [0-9.]+ \|")  # only times differ
    assert timing.sub("", again) == timing.sub("", markdown)


def test_report_on_a_full_fine_tuning_run(tiny_lm, tmp_path):
    """A report of a fully fine-tuned run of the real trainer: every epoch's dense update analysed as
    `find_intruders` analyses it, with cosines as the brute force gives them."""
    import torch

    from intruder import open_weights
    from intruder.training.data import load_mcq
    from intruder.training.trainer import TrainConfig, train
    from tests.conftest import assert_cosines_match

    rows = [q.to_row() | {"split": "train" if i < 8 else "test"} for i, q in enumerate(load_mcq("sample")[:10])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run = tmp_path / "full-run"
    train(TrainConfig(out=str(run), model=str(tiny_lm), data=str(data), method="full", epochs=2, batch_size=4,
                      lr=2e-3, context=False, max_length=192, forget_texts=2), progress=False)
    page = write_report([run], tmp_path / "out", progress=False, formats=("png",))
    analyses = {name: IntruderReport.from_json(tmp_path / "out" / "analysis" / name)
                for name in ("full-run-epoch-01.json", "full-run-epoch-02.json")}
    for epoch, report in zip((1, 2), analyses.values()):
        assert len(report.layers) == 14 and {layer.update for layer in report.layers} == {"dense"}
        direct = find_intruders(tiny_lm, run / f"epoch-{epoch:02d}", cache_dir=False, progress=False)
        assert [lr.name for lr in report.layers] == [lr.name for lr in direct.layers]
        for mine, theirs in zip(report.layers, direct.layers):
            np.testing.assert_allclose(mine.max_cos_left, theirs.max_cos_left, atol=1e-9)
            assert mine.n_intruders == theirs.n_intruders
    with open_weights(tiny_lm) as base, open_weights(run / "epoch-02") as tuned:
        for layer in analyses["full-run-epoch-02.json"].layers:
            w0, wt = base.get(layer.name).double(), tuned.get(layer.name).double()
            sigma = torch.linalg.svdvals(wt)[: len(layer.singular_values)].numpy()
            gap = np.abs(np.diff(sigma)) / sigma[0]
            clear = np.flatnonzero(np.r_[gap > 1e-3, True] & np.r_[True, gap > 1e-3])
            assert_cosines_match(layer, w0, wt, rows=clear, atol=1e-6)
            np.testing.assert_allclose(layer.delta_singular_values[:5], torch.linalg.svdvals(wt - w0)[:5], rtol=1e-6)
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "full fine-tuning, 2 epochs, lr 0.002" in markdown and "| dense |" in markdown
    figures = {p.name for p in (tmp_path / "out" / "figures").glob("*.png")}
    assert {"full-run-training.png", "full-run-intruders-by-epoch.png", "full-run-effective-rank.png"} <= figures
    assert "data:image/png;base64," in page.read_text(encoding="utf-8")
