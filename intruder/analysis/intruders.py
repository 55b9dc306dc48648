"""Intruder dimensions (Shuttleworth et al., arXiv 2410.21228, Algorithm 1), computed exactly and fast.

For W_t = W_0 + ΔW (m, n), tuned left singular vector y_j (j < k) is an intruder when
max_i |cos(y_j, x_i)| < ε over all left singular vectors x_i of W_0. Rather than two full SVDs, the method
here works in the complete singular basis X of W_0's small side (p = min(m, n)), cached on disk:

* low-rank ΔW = L R (LoRA): Xᵀ W_t W_tᵀ X = S² + P Q Pᵀ, a diagonal plus a rank-2r matrix, whose top-k
  eigenvectors z_j are the tuned vectors written in the base basis, so max_i |cos| = max_i |z_j[i]|;
* dense ΔW (full fine-tuning): top-k eigenvectors of W_t W_tᵀ only, then projected on X.
The other side's cosines follow from the same eigenvectors at O(k) extra matrix-vector products.
`tuned_triplets` returns the same top-k triplets (σ_j, u_j, v_j) themselves, for the mitigation.
"""

from __future__ import annotations

import numbers
import platform
import re
import time

import torch

from ..distributed import device_for_rank
from ..errors import IntruderError, NoCommonTensorsError
from ..weights import Weights, open_weights
from ._runtime import Workspace, cpu_threads
from .parallel import analyse_shared, together_if, use_group
from .projection import analyse_all, load, project, safe
from .results import SIDES, IntruderReport
from .spectra import FactorCache


def find_intruders(base, tuned, *, threshold: float = 0.5, top_k: int = 10, side: str = "left",
                   layers=None, device=None, cache_dir=None, progress: bool = True,
                   distributed: bool | None = None, workers: int | None = None) -> IntruderReport:
    """Find the intruder dimensions of every matrix that fine-tuning changed.

    base: the pretrained model; tuned: the fine-tuned one, or a PEFT LoRA adapter directory. Each may be
        anything `open_weights` accepts (directory, file, hub id, state dict, nn.Module, `Weights`).
    threshold: ε; a tuned vector whose largest |cos| with every base vector is below ε is an intruder.
    top_k: k, how many of the tuned matrix's top singular vectors are examined.
    side: "left" (the paper's definition), "right", or "both" (an intruder on either side).
    layers: None for every 2-D tensor present in both and changed, a regex, or a list of tensor names.
    device: where the linear algebra runs ("cpu" default, "cuda" when available; under several processes,
        "cuda" is each rank's own GPU, cuda:LOCAL_RANK).
    cache_dir: where base factors are cached (default `~/.cache/intruder`); False disables the cache.
    distributed: None (default) splits the matrices among the ranks of an initialised torch.distributed process
        group of several processes, if there is one (every rank must call, and gets the whole report); False
        analyses everything in this process; True requires such a group. See `parallel.py`.
    workers: how many matrices a CPU analyses side by side (in each process): default one per torch thread,
        at most 8. Each holds its own matrix, so memory grows with them; 1 holds one matrix at a time.
    """
    check_options(threshold, top_k, side)
    check_workers(workers, device)
    group = use_group(distributed)
    with together_if(group, "opening the models"):
        device = check_device(device_for_rank(device) if group else device)
        base_w = open_weights(base)
        tuned_w = open_weights(tuned, base=base_w)
        names, unchanged = _select(base_w, tuned_w, layers)
    cache = None if cache_dir is False else FactorCache(cache_dir)
    start = time.perf_counter()
    try:
        if group:
            results, skipped, spread = analyse_shared(names, base_w, tuned_w, top_k, threshold, side, device,
                                                      cache, progress, workers)
        else:
            bar = _progress(len(names), progress)
            results, skipped = analyse_all(names, base_w, tuned_w, top_k, threshold, side, device, cache,
                                           bar.update, workers)
            bar.close()
            spread = {}
    finally:
        if cache is not None:
            cache.release()  # the lock of an entry a failed matrix did not store
    if not results:
        raise NoCommonTensorsError(
            f"no analysed matrix differs between {base_w.source} and {tuned_w.source}: "
            f"the {len(names)} selected 2-D tensors are identical; check that `tuned` is the fine-tuned model"
        )
    meta = {"seconds": round(time.perf_counter() - start, 3), "device": str(device), "torch": torch.__version__,
            "python": platform.python_version(), "cache": None if cache is None else str(cache.directory)}
    return IntruderReport(results, threshold, top_k, side, base=base_w.source, tuned=tuned_w.source,
                          unchanged=unchanged + skipped, meta=meta | spread)


def check_options(threshold: float, top_k: int, side: str) -> None:
    """Raise IntruderError unless ε, k and the side are ones `find_intruders` accepts."""
    if not isinstance(side, str) or side not in SIDES:
        raise IntruderError(f"side={side!r}: use one of {', '.join(SIDES)}")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise IntruderError(f"threshold={threshold!r} is a {type(threshold).__name__}: give a number in (0, 1], "
                            "e.g. threshold=0.5")
    if not 0 < threshold <= 1:  # NaN fails this too
        raise IntruderError(f"threshold={threshold}: a cosine threshold must lie in (0, 1], e.g. 0.5")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
        raise IntruderError(f"top_k={top_k!r}: give a positive whole number of tuned singular vectors, e.g. 10")


def check_workers(workers, device) -> None:
    """Raise IntruderError unless `workers` is None or a positive whole number, and 1 on a GPU."""
    if workers is None:
        return
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers < 1:
        raise IntruderError(f"workers={workers!r}: give a positive whole number of matrices to analyse side by "
                            "side, e.g. 1 for the least memory, or leave it out (one per torch thread)")
    if workers > 1 and str(device or "cpu").startswith("cuda"):
        raise IntruderError(f"workers={workers}: a GPU analyses one matrix at a time; leave workers out")


def check_device(device) -> torch.device:
    """The torch device the analysis runs on: None or "cpu" (the CPU), "cuda" or "cuda:N" when torch sees that
    GPU; anything else raises IntruderError."""
    try:
        found = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError) as exc:
        raise IntruderError(f"device={device!r} is not a torch device ({exc}); use 'cpu' (the default) or "
                            "'cuda'") from None
    if found.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise IntruderError(f"device={device!r} but this torch ({torch.__version__}) sees no CUDA GPU; "
                                "leave the device out (or use 'cpu'), or install a CUDA build of torch")
        if found.index is not None and found.index >= count:
            raise IntruderError(f"device={device!r} but torch sees {count} CUDA GPU(s), cuda:0 to "
                                f"cuda:{count - 1}; choose one of those")
    elif found.type != "cpu":
        raise IntruderError(f"device={device!r}: the analysis runs in float64 on 'cpu' or 'cuda' only; use one "
                            "of those")
    return found


def _select(base: Weights, tuned: Weights, layers) -> tuple[list[str], list[str]]:
    """Names to analyse, in the base's order, and the common 2-D names the tuned source reports unchanged."""
    tuned_keys = set(tuned.keys())
    common = [n for n in base.keys() if n in tuned_keys and len(base.shape(n)) == 2]
    if not common:
        raise NoCommonTensorsError(
            f"{base.source} and {tuned.source} have no 2-D tensor in common (base has e.g. "
            f"{', '.join(base.keys()[:3])}; tuned has e.g. {', '.join(sorted(tuned_keys)[:3])}); "
            "pass the base model this one was fine-tuned from"
        )
    if isinstance(layers, str):
        try:
            pattern = re.compile(layers)
        except re.error as exc:
            raise IntruderError(f"layers={layers!r} is not a valid regular expression ({exc}); escape special "
                                r"characters with a backslash, e.g. 'layers\.0\.' or 'up_proj'") from None
        selected = [n for n in common if pattern.search(n)]
        if not selected:
            raise NoCommonTensorsError(
                f"layers={layers!r} matches none of the {len(common)} common matrices (e.g. {common[0]})")
        common = selected
    elif layers is not None:
        wanted = list(layers)
        missing = [n for n in wanted if n not in set(common)]
        if missing:
            raise NoCommonTensorsError(
                f"layers: {', '.join(missing[:3])} not among the common 2-D tensors (e.g. {', '.join(common[:3])})")
        common = wanted
    changed = tuned.changed_keys()
    if changed is None:
        return common, []
    return [n for n in common if n in changed], [n for n in common if n not in changed]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="intruders", unit="matrix", leave=False, disable=not enabled)


def tuned_triplets(base: Weights, tuned: Weights, name: str, k: int, *, device=None,
                   cache: FactorCache | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The top-k singular triplets of W_t = tuned[name] (m, n), computed as `find_intruders` computes them
    (same projections, same cached base factors, same threads), so index j here is its tuned vector j.

    -> σ (k,) descending, U (m, k) left and V (n, k) right singular vectors, float64 on `device`, with
    W_t v_j = σ_j u_j; None when W_t equals W_0. k is capped at min(m, n). The small side's vectors y_j come
    from the projection, the other side's as W_tᵀ y_j / σ_j (or W_t y_j / σ_j), so σ_j u_j v_jᵀ is exactly
    u_j u_jᵀ W_t (W_t v_j v_jᵀ) and no second decomposition is needed.
    """
    device = torch.device(device or "cpu")
    work = Workspace(device, torch.get_num_threads())
    with cpu_threads(device):
        m = load(name, base, tuned, device, cache, work)
        if m is None:
            return None
        proj = project(m, k)
        y = m.factors.basis @ proj.small.T  # (p, k) tuned small-side vectors
        if m.update is not None:  # W_tᵀ Y = W_0ᵀ Y + Rᵀ (Lᵀ Y), on the small side's orientation
            lo, ro = (m.update.left, m.update.right) if m.factors.left else (m.update.right.T, m.update.left.T)
            w0 = m.w0.to(torch.float64)  # stored as read when the update is low-rank
            w = w0 if m.factors.left else w0.T
            wty = w.T @ y + ro.T @ (lo.T @ y)
        else:
            wty = (m.wt.T if m.factors.left else m.wt) @ y
        z = wty / safe(proj.sigma)[None, :]  # (q, k) tuned large-side vectors
    return (proj.sigma, y, z) if m.factors.left else (proj.sigma, z, y)


