"""Fine-tuning: the accelerate loop, datasets, recipes, resumable state, run directories."""
from .loop import (DivergenceError, EvalResult, Interrupted, TrainResult, checkpoint_file, evaluate,
                   evaluate_checkpoint, finetune)

__all__ = ["DivergenceError", "EvalResult", "Interrupted", "TrainResult", "checkpoint_file", "evaluate",
           "evaluate_checkpoint", "finetune"]
