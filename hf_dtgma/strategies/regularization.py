"""Quadratic-penalty methods: `ewc` (online EWC) and `mas`. After each task they measure how much every shared
encoder parameter matters to it (an importance Ω) and anchor the parameters (θ*); later tasks pay
`penalty / 2 · Σ Ω (θ − θ*)²` for moving them.

* `ewc`, online EWC (Schwarz et al. 2018, "Progress & Compress"): Ω is the diagonal empirical Fisher, the mean over
  training examples of the squared per-example gradient of the log-likelihood of the true label, accumulated as
  `Ω ← decay · Ω + F_t` with a single anchor (the parameters after the last task). Per-example gradients (through
  `torch.func.vmap`), not squared mini-batch gradients, which underestimate the Fisher by the batch size.
* `mas`, Memory Aware Synapses (Aljundi et al. 2018): Ω is the mean absolute per-example gradient of the squared L2
  norm of the task's output (its head's logits); it needs no labels. Importances add up over tasks (decay 1).

Both measure Ω on at most `importance_samples` training examples of the task (a seeded random subset).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..batches import batch_loader
from .base import Retrain, SharedEncoderStrategy, model_inputs


@dataclass
class QuadraticPenaltyConfig:
    """Args:
    penalty: λ, the weight of the penalty (chosen on validation splits, see the README).
    decay: γ, how much of the earlier tasks' importance carries over (online EWC; 1.0 = plain sum).
    importance_samples: training examples Ω is measured on, per task.
    """

    penalty: float = 100.0
    decay: float = 1.0
    importance_samples: int = 1024


class QuadraticPenaltyStrategy(SharedEncoderStrategy):
    """Base of `ewc` and `mas`: subclasses say how one example's output scores (`example_score`) and how its
    gradient turns into importance (`importance_of`)."""

    config_class: ClassVar[type] = QuadraticPenaltyConfig

    def __init__(self, model_config, config: QuadraticPenaltyConfig | None = None):
        super().__init__(model_config, config)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self) -> torch.Tensor:
        """`Σ Ω (θ − θ*)²` over the shared encoder (0 before the first task has ended)."""
        total = torch.zeros((), device=self.network.input_proj.weight.device)
        for name, param in self.network.encoder_parameters():
            if name in self.importance:
                total = total + (self.importance[name] * (param - self.anchor[name]) ** 2).sum()
        return total

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], index: int, progress: float
    ) -> torch.Tensor:
        loss = self.task_loss(batch, index, model)
        return loss + self.config.penalty / 2 * self.penalty() if self.importance else loss

    def example_score(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The scalar whose per-example gradient measures importance; `logits (1, L)`, `label (1,)`."""
        raise NotImplementedError

    def importance_of(self, gradients: torch.Tensor) -> torch.Tensor:
        """Per-example gradients `(B, *shape)` → their contribution to Ω, summed over the batch `(*shape)`."""
        raise NotImplementedError

    def end_task(self, index: int, tasks: list, retrain: Retrain) -> None:
        new = self.task_importance(tasks[index].train, index)
        for name, value in new.items():
            self.importance[name] = (
                self.config.decay * self.importance[name] + value if name in self.importance else value
            )
        self.anchor = {name: param.detach().clone() for name, param in self.network.encoder_parameters()}

    @torch.no_grad()
    def task_importance(self, dataset, index: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Ω of task `index` for every shared encoder parameter, from per-example gradients on `dataset`."""
        network = self.network.eval()
        samples = min(self.config.importance_samples, len(dataset))
        subset = dataset.shuffle(seed=index).select(range(samples))
        params = {name: param.detach() for name, param in network.named_parameters()}
        shared = [name for name, _ in network.encoder_parameters()]

        def score(shared_params: dict, inputs: dict, label: torch.Tensor) -> torch.Tensor:
            one = {name: value[None] for name, value in inputs.items()}
            logits = functional_call(network, {**params, **shared_params}, (), {**one, "task_ids": index})
            return self.example_score(logits, label[None])

        per_example = vmap(grad(score), in_dims=(None, 0, 0))
        total = {name: torch.zeros_like(params[name]) for name in shared}
        device = network.input_proj.weight.device
        with warnings.catch_warnings(), torch.enable_grad():
            # No batching rule for the CPU flash-attention kernel yet: vmap loops over it, correctly, and says so.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            for batch in batch_loader(subset, batch_size):
                batch = {name: value.to(device) for name, value in batch.items()}
                gradients = per_example({name: params[name] for name in shared}, model_inputs(batch), batch["labels"])
                for name in shared:
                    total[name] += self.importance_of(gradients[name])
        return {name: value / samples for name, value in total.items()}


class EWCStrategy(QuadraticPenaltyStrategy):
    """Online EWC: Ω = diagonal empirical Fisher, accumulated with `decay`."""

    name: ClassVar[str] = "ewc"

    def example_score(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), label)  # −log p(y | x); the Fisher squares its gradient

    def importance_of(self, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients**2).sum(0)


class MASStrategy(QuadraticPenaltyStrategy):
    """Memory Aware Synapses: Ω = mean |∂‖f(x)‖² / ∂θ|, summed over tasks."""

    name: ClassVar[str] = "mas"

    def example_score(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return (logits.float() ** 2).sum()

    def importance_of(self, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.abs().sum(0)
