"""The training wing: the models the analysis studies, made by a small trainer.

`data` (Tin_hoc_mcq schema, the bundled sets in `_data/`), `lora` (LoRA layers saved in PEFT's format),
`modeling` (loading a causal LM), `train` (the loop, one screen), `evaluate` (learning and forgetting),
`runs` (reading run directories). It uses `intruder.weights` for files and hub ids, never the report wing.

    from intruder.training import TrainConfig, train
    summary = train(TrainConfig(out="runs/lora-r8", rank=8, alpha=16, epochs=3))
"""

from .trainer import TrainConfig, evaluate_model, train

__all__ = ["TrainConfig", "train", "evaluate_model"]
