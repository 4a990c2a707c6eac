"""`dtgma` (ours) and `dtgma_full` (the reference design), as strategies: the trainer's default.

DTG-MA isolates tasks by construction: a new task adds its own tokens, low-rank deltas and head, and everything an
earlier task reads is frozen (`DTGMAModel.freeze_task`), so no regulariser, mask or replay is needed. `dtgma_full`
gives each task full Q/K/V/O and feed-forward projections instead of low-rank deltas, as the published DTG-MA code
does (many more parameters per task), for comparison.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..configuration_dtgma import DTGMAConfig
from ..modeling_dtgma import DTGMAModel
from ..routing import fit_task_router
from .base import ContinualStrategy, NoHyperparameters, Retrain, model_inputs


class DTGMAStrategy(ContinualStrategy):
    """Trains a `DTGMAModel`: `add_task` before a task, `freeze_task` after it. Built from a model, or from a
    `DTGMAConfig` (every setting of the method lives there)."""

    name: ClassVar[str] = "dtgma"
    config_class: ClassVar[type] = NoHyperparameters
    supports_checkpoints: ClassVar[bool] = True
    supports_distributed: ClassVar[bool] = True
    task_param_mode: ClassVar[str | None] = None  # None: as the config says

    def __init__(self, model: DTGMAModel | DTGMAConfig, config: NoHyperparameters | None = None):
        if isinstance(model, DTGMAConfig):  # a copy: the model records its tasks in its config
            settings = {**model.to_dict(), "task_param_mode": self.task_param_mode or model.task_param_mode}
            model = DTGMAModel(DTGMAConfig.from_dict(settings))
        elif self.task_param_mode not in (None, model.config.task_param_mode):
            raise ValueError(f"{self.name} needs a model with task_param_mode={self.task_param_mode!r}.")
        self.config = config or NoHyperparameters()
        self.module = model

    @property
    def model(self) -> DTGMAModel:
        return self.module

    def begin_task(self, index: int, tasks: list) -> None:
        self.model.add_task(tasks[index].name, labels=tasks[index].labels)

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], index: int, progress: float) -> torch.Tensor:
        if not self.label_smoothing:
            return model(**batch, task_ids=index).loss  # the model's own (checked) cross-entropy
        return self.classification_loss(model(**model_inputs(batch), task_ids=index).logits, batch["labels"])

    def end_task(self, index: int, tasks: list, retrain: Retrain) -> None:
        """Freeze the task, then fit its routing statistics (`hf_dtgma.routing`) from its own splits."""
        self.model.freeze_task(tasks[index].name)
        fit_task_router(self.model, index, tasks[index].train, tasks[index].validation)

    def logits(self, inputs: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        return self.model(**model_inputs(inputs), task_ids=index).logits

    def class_il_predict(self, inputs: dict[str, torch.Tensor], num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's task (`config.router`) and that task's label, from one all-task pass."""
        if num_tasks != len(self.model.tasks):
            raise ValueError(f"DTG-MA routes among all {len(self.model.tasks)} registered tasks, not {num_tasks}.")
        prediction = self.model.predict(**model_inputs(inputs), reject_threshold=float("-inf"))
        return prediction.task_ids.cpu(), prediction.label_ids.cpu()

    def parameter_counts(self, task_names: list[str]) -> dict[str, Any]:
        return {
            "total": self.model.num_parameters(),
            "shared": sum(param.numel() for param in self.model.shared_parameters()),
            "per_task": {name: self.model.num_task_parameters(name) for name in task_names},
        }


class DTGMAFullStrategy(DTGMAStrategy):
    """`dtgma` with full per-task projections (`task_param_mode="full"`), the published reference design."""

    name: ClassVar[str] = "dtgma_full"
    task_param_mode: ClassVar[str | None] = "full"
