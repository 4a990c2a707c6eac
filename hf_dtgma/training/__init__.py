"""Continual training with Accelerate, the metrics of the field, and run outputs."""

from .metrics import average_accuracy, average_forgetting, backward_transfer, forward_transfer, summarize
from .reporting import write_run_outputs
from .trainer import ContinualTask, ContinualTrainer, ContinualTrainingConfig, make_accelerator

__all__ = [
    "ContinualTask",
    "ContinualTrainer",
    "ContinualTrainingConfig",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "forward_transfer",
    "make_accelerator",
    "summarize",
    "write_run_outputs",
]
