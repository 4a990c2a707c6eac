"""`packnet`, PackNet (Mallya & Lazebnik 2018): iterative magnitude pruning packs every task into its own subset of
the shared encoder's weights.

For task t: train the weights no earlier task owns (the free ones; owned weights receive no update); then keep the
largest-magnitude free weights of each projection for task t (a `keep_fraction` of them; by default an equal share,
1 / (tasks left), so every task gets the same capacity), set the rest to zero and return them to the pool; retrain
the kept weights for `retrain_epochs` (early-stopped on validation, like all training here) with the pruned ones held
at zero. At inference, task t uses exactly the weights owned by tasks 0..t (a binary mask per task), so later tasks
cannot change it.

The pruned weights are those of `input_proj` and each layer's q, k, v, o, fc1 and fc2. As in the paper, biases and
normalisation parameters (and here the patch embedder) train on the first task only and are frozen after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.func import functional_call

from .base import Retrain, SharedEncoderStrategy, UpdateMask
from .network import PROJECTIONS

FREE = -1  # owner id of a weight no task owns yet


@dataclass
class PackNetConfig:
    """Args:
    retrain_epochs: most epochs of retraining after pruning.
    keep_fraction: share of the free weights each task keeps; None (default) = 1 / (number of tasks left).
    """

    retrain_epochs: int = 10
    keep_fraction: float | None = None


class PackNetStrategy(SharedEncoderStrategy):
    name: ClassVar[str] = "packnet"
    config_class: ClassVar[type] = PackNetConfig

    def __init__(self, model_config, config: PackNetConfig | None = None):
        super().__init__(model_config, config)
        self.pruned = ["input_proj"] + [f"layers.{i}.{p}" for i in range(model_config.num_layers) for p in PROJECTIONS]
        modules = dict(self.network.named_modules())
        self.weights = {name: modules[name].weight for name in self.pruned}
        self.owner = {name: torch.full(weight.shape, FREE, dtype=torch.int16) for name, weight in self.weights.items()}
        self.update_mask = UpdateMask()
        self._unpruned: int | None = None  # the task being trained before its pruning: it also uses the free weights

    def begin_task(self, index: int, tasks: list) -> None:
        super().begin_task(index, tasks)
        if index > 0:
            for name, param in self.network.encoder_parameters():
                if not (name.endswith(".weight") and name[: -len(".weight")] in self.weights):
                    param.requires_grad_(False)
        self._train_only(FREE)
        self._unpruned = index

    def _train_only(self, owner: int) -> None:
        """Let the optimizer update only the weights whose owner is `owner` (FREE: the unowned ones)."""
        self.update_mask.set(
            {weight: (self._owner(name, weight) == owner).float() for name, weight in self.weights.items()}
        )

    def _owner(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        self.owner[name] = self.owner[name].to(weight.device)
        return self.owner[name]

    def before_optimizer_step(self) -> None:
        self.update_mask.before_step()

    def after_optimizer_step(self) -> None:
        self.update_mask.after_step()

    def end_task(self, index: int, tasks: list, retrain: Retrain) -> None:
        keep = self.config.keep_fraction if self.config.keep_fraction is not None else 1 / (len(tasks) - index)
        if self._prune(index, keep):
            self._train_only(index)
            retrain(self.config.retrain_epochs)
        self.update_mask.set({})

    @torch.no_grad()
    def _prune(self, index: int, keep: float) -> bool:
        """Give task `index` the `keep` share of the free weights with the largest magnitudes, zero the other free
        weights. Returns whether any weight was zeroed."""
        self._unpruned = None
        pruned_any = False
        for name, weight in self.weights.items():
            owner = self._owner(name, weight)
            free = owner == FREE
            count = int(round(keep * int(free.sum())))
            if count == 0:
                continue
            magnitude = weight.abs().masked_fill(~free, -1.0).flatten()
            kept = torch.zeros_like(free).flatten()
            kept[magnitude.topk(count).indices] = True
            kept = kept.view_as(free)
            owner[kept] = index
            weight[free & ~kept] = 0.0
            pruned_any = pruned_any or bool((free & ~kept).any())
        return pruned_any

    def logits(self, inputs: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        """Task `index` with exactly the weights tasks 0..index own (and the free ones while it trains, unpruned)."""
        params = {}
        for name, weight in self.weights.items():
            owner = self._owner(name, weight)
            used = (owner >= 0) & (owner <= index)
            if index == self._unpruned:
                used |= owner == FREE
            params[f"{name}.weight"] = weight * used
        return functional_call(self.network, params, (), {**inputs, "task_ids": index}, strict=False)

