"""Base factors and their on-disk cache: exact, reused, and never trusted when damaged."""

import multiprocessing as mp
import os
import warnings

import numpy as np
import pytest
import torch

import intruder.analysis.projection as projection
import intruder.analysis.spectra as spectra
from intruder import find_intruders
from intruder.analysis.spectra import FactorCache, base_factors, low_rank_singular_values, tensor_digest
from tests.conftest import save_model_dir


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40)])
def test_base_factors_are_a_complete_singular_basis(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    f = base_factors(w)
    p = min(shape)
    assert f.basis.shape == (p, p) and f.left == (shape[0] <= shape[1])
    np.testing.assert_allclose(f.basis.T @ f.basis, np.eye(p), atol=1e-12)
    np.testing.assert_allclose(f.sigma, torch.linalg.svdvals(w), rtol=1e-10, atol=1e-10)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    reference = u if f.left else vh.T
    np.testing.assert_allclose((reference.T @ f.basis).abs().diagonal(), np.ones(p), atol=1e-8)


def test_low_rank_singular_values():
    left, right = torch.randn(60, 3, dtype=torch.float64), torch.randn(3, 45, dtype=torch.float64)
    np.testing.assert_allclose(low_rank_singular_values(left, right), torch.linalg.svdvals(left @ right)[:3],
                               rtol=1e-12)


def counting(monkeypatch):
    calls = []
    real = spectra.base_factors

    def counted(w):
        calls.append(tuple(w.shape))
        return real(w)

    monkeypatch.setattr(spectra, "base_factors", counted)
    monkeypatch.setattr(projection, "base_factors", counted)
    return calls


def test_a_warm_cache_skips_the_base_decomposition(tmp_path, monkeypatch):
    w = torch.randn(40, 60)
    calls = counting(monkeypatch)
    cache = FactorCache(tmp_path)
    first = cache.factors(w)
    second = FactorCache(tmp_path).factors(w.clone())
    assert calls == [(40, 60)]
    assert torch.equal(first.basis, second.basis) and torch.equal(first.sigma, second.sigma)
    assert FactorCache(tmp_path).factors(w + 1).sigma[0] != first.sigma[0]  # another tensor, another key
    assert len(calls) == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_find_intruders_reuses_the_cache_across_runs(tmp_path, monkeypatch):
    base = save_model_dir(tmp_path / "base", {"x.weight": torch.randn(30, 20), "y.weight": torch.randn(20, 30)})
    tuned = {"x.weight": torch.randn(30, 20), "y.weight": torch.randn(20, 30)}
    calls = counting(monkeypatch)
    first = find_intruders(base, tuned, cache_dir=tmp_path / "c", progress=False)
    second = find_intruders(base, tuned, cache_dir=tmp_path / "c", progress=False)
    assert len(calls) == 2  # two matrices, decomposed once
    assert [lr.max_cos.tolist() for lr in first.layers] == [lr.max_cos.tolist() for lr in second.layers]
    for layer in second.layers:  # results own their arrays: none keeps a cache entry's file buffer alive
        for name in ("base_singular_values", "singular_values", "max_cos_left", "max_cos_right", "similarity",
                     "best_match_left", "delta_singular_values"):
            assert getattr(layer, name).flags.owndata, name
    assert list((tmp_path / "c" / "digests").rglob("*"))  # file hashes remembered
    find_intruders(base, tuned, cache_dir=False, progress=False)
    assert len(calls) == 4


def entry(tmp_path):
    (path,) = list((tmp_path / "factors").rglob("*.safetensors"))
    return path


@pytest.mark.parametrize("damage", ["garble", "truncate", "empty", "stale"])
def test_a_damaged_entry_is_recomputed_with_a_warning(tmp_path, monkeypatch, damage):
    w = torch.randn(24, 36)
    good = FactorCache(tmp_path).factors(w)
    path = entry(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "garble":
        data[-100:-90] = b"\x00" * 10
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    else:  # a valid entry of another tensor under this key
        FactorCache(tmp_path / "other").factors(torch.randn(24, 36))
        data = entry(tmp_path / "other").read_bytes()
    path.write_bytes(bytes(data))
    calls = counting(monkeypatch)
    with pytest.warns(RuntimeWarning, match="will be recomputed") as caught:
        again = FactorCache(tmp_path).factors(w)
    (message,) = [str(c.message) for c in caught]
    assert str(path) in message and message.count(str(path)) == 1 and "download" not in message
    assert str(tmp_path) in message  # the cache directory, to delete
    assert calls == [(24, 36)]
    assert torch.equal(again.sigma, good.sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FactorCache(tmp_path).factors(w)  # repaired: no warning now


def test_an_unwritable_cache_warns_and_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        factors = FactorCache(blocker).factors(torch.randn(10, 12))
    assert factors.sigma.shape == (10,)


def _store_together(directory, barrier, queue):
    """Store the entry of one tensor, holding the rename until the other process has written its file too."""
    warnings.simplefilter("error")  # "cannot write the factor cache" would only warn: here it fails the process
    real = spectra.write_safetensors

    def write_then_wait(path, *args, **kwargs):
        real(path, *args, **kwargs)
        queue.put(("written", str(path)))
        barrier.wait(timeout=60)  # both files are written, neither is renamed into place yet

    spectra.write_safetensors = write_then_wait
    torch.manual_seed(123)
    w = torch.randn(300, 200)
    factors = base_factors(w)
    FactorCache(directory).store(tensor_digest(w), tuple(w.shape), factors)
    queue.put(("sigma", float(factors.sigma.sum())))


def test_two_processes_writing_the_same_entry_at_the_same_time(tmp_path):
    """Both write at once (as two processes that break a stale lock together may): both succeed, each through its
    own temporary file, and the entry left is whole."""
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_store_together, args=(tmp_path, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0  # a broken barrier (one process skipped its write) or a warning exits non-zero
    messages = [queue.get(timeout=5) for _ in range(4)]
    written = [path for kind, path in messages if kind == "written"]
    sigmas = [value for kind, value in messages if kind == "sigma"]
    assert len(written) == 2 and written[0] != written[1]  # each its own temporary file, side by side
    assert sigmas[0] == sigmas[1]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".safetensors"]  # no leftovers
    torch.manual_seed(123)
    w = torch.randn(300, 200)
    (entry_path,) = (tmp_path / "factors").rglob("*.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry is intact: read without a warning
        cached = FactorCache(tmp_path).load(tensor_digest(w), tuple(w.shape))
    fresh = base_factors(w)
    assert cached is not None and cached.left == fresh.left
    torch.testing.assert_close(cached.sigma, fresh.sigma, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((cached.basis.T @ fresh.basis).abs().diagonal(), torch.ones(200, dtype=torch.float64))
    assert float(cached.sigma.sum()) == pytest.approx(sigmas[0])
    assert entry_path.name == f"{tensor_digest(w)}.safetensors"


def test_digest_memo_follows_file_changes(tmp_path):
    from intruder import open_weights

    model = save_model_dir(tmp_path / "m", {"w": torch.ones(8, 8)})
    cache = FactorCache(tmp_path / "c")
    with open_weights(model) as weights:
        assert cache.key(weights.get("w"), weights.fingerprint("w")) == tensor_digest(torch.ones(8, 8))
    save_model_dir(tmp_path / "m", {"w": torch.full((8, 8), 2.0)})
    os.utime(model / "model.safetensors", ns=(1, 1))  # new content, even with an old mtime
    with open_weights(model) as weights:
        assert cache.key(weights.get("w"), weights.fingerprint("w")) == tensor_digest(torch.full((8, 8), 2.0))


def test_a_file_rewritten_in_place_with_its_mtime_restored_is_hashed_again(tmp_path):
    from intruder.analysis._reference import brute_force

    g = torch.Generator().manual_seed(1)
    model = save_model_dir(tmp_path / "m", {"w": torch.randn(48, 32, generator=g)})
    file = model / "model.safetensors"
    tuned = {"w": torch.randn(48, 32, generator=g)}
    find_intruders(model, tuned, cache_dir=tmp_path / "c", progress=False)
    before, inode = file.stat(), file.stat().st_ino
    new_base = tuned["w"] + 0.1 * torch.randn(48, 32, generator=g)  # the tuned model is now close to its base
    rewritten = save_model_dir(tmp_path / "new", {"w": new_base}) / "model.safetensors"
    with open(file, "r+b") as f:  # in place: same inode, same size
        f.write(rewritten.read_bytes())
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (file.stat().st_ino, file.stat().st_size, file.stat().st_mtime_ns) == (inode, before.st_size,
                                                                                  before.st_mtime_ns)
    (layer,) = find_intruders(model, tuned, cache_dir=tmp_path / "c", progress=False).layers
    max_cos, _ = brute_force(new_base, tuned["w"])
    np.testing.assert_allclose(layer.max_cos, max_cos.numpy(), atol=1e-6)
    assert layer.n_intruders == int((max_cos < 0.5).sum())
