"""`lora` and `adapter`: one PEFT adapter per task on the same projections of the shared encoder, through `peft`.

The encoder stays frozen at its initialisation, exactly as DTG-MA's shared weights do by default
(`shared_training="never"`), so the comparison with `dtgma` isolates the method: both add a small set of weights per
task on a frozen random encoder; DTG-MA adds task tokens that read the input tokens through the task-graph mask,
these add a low-rank update (LoRA) or learned rescalings ((IA)³) on the projections and pool the tokens by their mean.
Task t's adapter is `add_adapter(f"task_{t}", ...)`, trained with its head, then frozen; evaluation of task t runs
`set_adapter(f"task_{t}")`. Nothing an earlier task uses ever changes, so forgetting is zero by construction.

* `lora`: LoRA (Hu et al. 2021) of rank `rank` on q, k, v, o, fc1 and fc2 (DTG-MA's per-task rank sits on the same
  six projections).
* `adapter`: PEFT has no bottleneck (Houlsby) adapter; its adapter method is (IA)³ (Liu et al. 2022), learned
  vectors rescaling the keys, the values and the feed-forward's inner activations (the input of fc2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model

from .base import SharedEncoderStrategy


def adapter_name(index: int) -> str:
    return f"task_{index}"


class PeftStrategy(SharedEncoderStrategy):
    """Base of `lora` and `adapter`: subclasses give the `peft_config`."""

    def __init__(self, model_config, config: Any = None):
        super().__init__(model_config, config)
        self.network.requires_grad_(False)
        self.peft_model: PeftModel | None = None

    def peft_config(self) -> PeftConfig:
        raise NotImplementedError

    def begin_task(self, index: int, tasks: list) -> None:
        self.network.add_head(len(tasks[index].labels))
        name = adapter_name(index)
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.network, self.peft_config(), adapter_name=name)
            self.module = self.peft_model
        else:
            self.peft_model.add_adapter(name, self.peft_config())
        self.peft_model.set_adapter(name)
        for param_name, param in self.peft_model.named_parameters():  # this task's adapter and head, nothing else
            param.requires_grad_(f".{name}." in param_name or param_name.endswith(f".{name}"))
        self.network.heads[index].requires_grad_(True)

    def logits(self, inputs: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        trainable = {param: param.requires_grad for param in self.peft_model.parameters()}
        self.peft_model.set_adapter(adapter_name(index))
        for param, requires_grad in trainable.items():  # set_adapter makes the evaluated adapter trainable: undo it
            param.requires_grad_(requires_grad)
        return self.network(**inputs, task_ids=index)

    def _adapter_parameters(self, index: int) -> int:
        name = adapter_name(index)
        return sum(
            param.numel() for param_name, param in self.network.named_parameters()
            if f".{name}." in param_name or param_name.endswith(f".{name}")
        )

    def task_parameters(self, index: int) -> int:
        return super().task_parameters(index) + self._adapter_parameters(index)

    def parameter_counts(self, task_names: list[str]) -> dict[str, Any]:
        per_task = {name: self.task_parameters(index) for index, name in enumerate(task_names)}
        total = sum(param.numel() for param in self.network.parameters())
        return {"total": total, "shared": total - sum(per_task.values()), "per_task": per_task}


@dataclass
class LoRAStrategyConfig:
    """Args:
    rank: r of every LoRA update. lora_alpha: its scale numerator (scale = lora_alpha / rank).
    target_modules: the encoder projections that get an update.
    """

    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q", "k", "v", "o", "fc1", "fc2")


class LoRAStrategy(PeftStrategy):
    name: ClassVar[str] = "lora"
    config_class: ClassVar[type] = LoRAStrategyConfig

    def peft_config(self) -> PeftConfig:
        return LoraConfig(
            r=self.config.rank, lora_alpha=self.config.lora_alpha, target_modules=list(self.config.target_modules)
        )


@dataclass
class IA3StrategyConfig:
    """Args:
    target_modules: the projections whose outputs (or, for `feedforward_modules`, inputs) are rescaled.
    feedforward_modules: those rescaled on their input (the feed-forward's inner activations).
    """

    target_modules: tuple[str, ...] = ("k", "v", "fc2")
    feedforward_modules: tuple[str, ...] = ("fc2",)


class IA3AdapterStrategy(PeftStrategy):
    name: ClassVar[str] = "adapter"
    config_class: ClassVar[type] = IA3StrategyConfig

    def peft_config(self) -> PeftConfig:
        return IA3Config(
            target_modules=list(self.config.target_modules), feedforward_modules=list(self.config.feedforward_modules)
        )
