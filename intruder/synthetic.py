"""Synthetic test material with known answers: matrices with planted intruders, random PEFT adapters.

Useful beyond tests, to calibrate: what does an update of a given rank and size do to a spectrum?
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .weights import open_weights

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def planted(m: int, n: int, *, n_intruders: int, k: int = 10, seed: int = 0, rank: int | None = None):
    """A base W_0 (m, n) and a tuned W_t whose top-k singular vectors hold exactly `n_intruders` intruders.

    W_0 = U diag(S) Vᵀ with S falling from 10 to 1 (zero beyond `rank`). W_t rotates a 16-dimensional block
    of W_0's weakest live singular pairs by a Hadamard matrix H/4 and lifts the first `n_intruders` rotated
    pairs to singular values 30, 29, ...: each is an intruder on both sides with max |cos| exactly 0.25,
    while W_t's other top vectors are W_0's top vectors (|cos| = 1). ΔW = W_t - W_0 has rank <= 16.
    Returns (w0, wt, delta_left (m, 16), delta_right (16, n)), float64, ΔW = delta_left @ delta_right.
    """
    block = 16
    live = min(m, n) if rank is None else rank
    if live < block + k or n_intruders > block:
        raise ValueError(f"need rank(W_0) >= {block + k} and n_intruders <= {block}")
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    s = torch.zeros(p, dtype=torch.float64)
    s[:live] = torch.linspace(10, 1, live, dtype=torch.float64)
    w0 = (u * s) @ v.T
    idx = torch.arange(live - block, live)
    h = _hadamard(block) / block**0.5  # orthogonal, every entry ±1/4
    tuned_s = s[idx].clone()
    tuned_s[:n_intruders] = torch.arange(30, 30 - n_intruders, -1, dtype=torch.float64)
    # the block's part of W_0 is U_b diag(s_b) V_bᵀ; in W_t it becomes U_b H diag(t) Hᵀ V_bᵀ
    core = h @ torch.diag(tuned_s) @ h.T - torch.diag(s[idx])
    left, right = u[:, idx] @ core, v[:, idx].T
    return w0, w0 + left @ right, left, right


def _hadamard(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_adapter(base, out_dir, *, rank: int = 8, alpha: float = 16.0, strength: float = 3.0,
                   targets=PROJECTIONS, seed: int = 0) -> Path:
    """Write a PEFT LoRA adapter with random factors on every `targets` module of `base`.

    Each update s·B A gets singular values near `strength` times the RMS singular value of the weight it
    modifies, large enough to reach the top of the spectrum. A stand-in for a trained adapter: the result
    has PEFT's exact file layout (`adapter_config.json`, `adapter_model.safetensors`).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pattern = re.compile(rf"\.({'|'.join(map(re.escape, targets))})\.weight$")
    tensors = {}
    with open_weights(base) as weights:
        for name in weights.keys():
            if not pattern.search(name) or len(weights.shape(name)) != 2:
                continue
            w = weights.get(name).to(torch.float32)
            out_f, in_f = w.shape
            rms = float(w.norm()) / min(out_f, in_f) ** 0.5
            a = torch.randn(rank, in_f, generator=g) / in_f**0.5
            b = torch.randn(out_f, rank, generator=g) * (strength * rms / (alpha / rank) / out_f**0.5)
            module = name[: -len(".weight")]
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    if not tensors:
        raise ValueError(f"no 2-D weight of {base} matches the targets {targets}")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": {},
              "alpha_pattern": {}, "modules_to_save": None,
              "base_model_name_or_path": str(base) if isinstance(base, (str, Path)) else None}
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def random_base(out_dir, *, n_layers: int = 4, hidden: int = 64, intermediate: int = 128, decay: float = 0.5,
                seed: int = 0) -> Path:
    """Write a small stand-in base model: `n_layers` blocks of the seven projection matrices, float32.

    Names and shapes follow Llama/Gemma (`model.layers.{i}.self_attn.q_proj.weight` (hidden, hidden),
    `mlp.up_proj.weight` (intermediate, hidden), ...), saved as `out_dir/model.safetensors`. Each W (m, n) =
    U diag(S) Vᵀ has random orthonormal U, V and S_i = (i + 1)^-decay, a falling spectrum like a trained
    weight's, so that `random_adapter` on it yields intruders. Returns out_dir.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    tensors = {}
    for i in range(n_layers):
        for module, (m, n) in shapes.items():
            p = min(m, n)
            u, _ = torch.linalg.qr(torch.randn(m, p, generator=g))
            v, _ = torch.linalg.qr(torch.randn(n, p, generator=g))
            s = torch.arange(1, p + 1, dtype=torch.float32) ** -decay
            tensors[f"model.layers.{i}.{module}.weight"] = ((u * s) @ v.T).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
