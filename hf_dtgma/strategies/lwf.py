"""`lwf`, Learning without Forgetting (Li & Hoiem 2016/2018), task-incremental with one head per task.

Before task t trains, a frozen copy of the model is kept. On each training batch of task t, besides the cross-entropy
on the new head, every old head's outputs are distilled from the copy's: the knowledge-distillation loss
`T² · KL(softmax(old / T) ‖ softmax(new / T))` with temperature T = 2, averaged over the old heads (the paper sums
them; the mean keeps `distillation` on the same scale whatever the number of tasks), weighted by `distillation`.
No example of an old task is stored: the distillation runs on the new task's inputs only. As in the paper, the old
heads train too (θ_o), on the distillation term.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Retrain, SharedEncoderStrategy, model_inputs


@dataclass
class LwFConfig:
    """Args:
    distillation: λ_o, the weight of the distillation term against the new task's cross-entropy.
    temperature: T of the softened outputs (2 in the paper).
    """

    distillation: float = 1.0
    temperature: float = 2.0


class LwFStrategy(SharedEncoderStrategy):
    name: ClassVar[str] = "lwf"
    config_class: ClassVar[type] = LwFConfig

    def __init__(self, model_config, config: LwFConfig | None = None):
        super().__init__(model_config, config)
        self.teacher: nn.Module | None = None

    def begin_task(self, index: int, tasks: list) -> None:
        super().begin_task(index, tasks)
        self.network.heads.requires_grad_(True)

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], index: int, progress: float
    ) -> torch.Tensor:
        inputs = model_inputs(batch)
        pooled = self.network.encode(**inputs)
        loss = self.classification_loss(self.network.head_logits(pooled, index), batch["labels"])
        if self.teacher is None or index == 0:
            return loss
        with torch.no_grad():
            teacher_pooled = self.teacher.encode(**inputs)
        temperature = self.config.temperature
        distillation = torch.zeros((), device=loss.device)
        for old in range(index):
            student = F.log_softmax(self.network.head_logits(pooled, old).float() / temperature, dim=-1)
            teacher = F.log_softmax(self.teacher.head_logits(teacher_pooled, old).float() / temperature, dim=-1)
            distillation = distillation + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return loss + self.config.distillation * temperature**2 * distillation / index

    def end_task(self, index: int, tasks: list, retrain: Retrain) -> None:
        self.teacher = copy.deepcopy(self.network).eval().requires_grad_(False)
