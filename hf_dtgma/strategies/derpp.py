"""`derpp`, Dark Experience Replay++ (Buzzega et al. 2020), task-incremental with one head per task.

A buffer of `buffer_size` training examples is filled by reservoir sampling over the whole stream (every training
example seen, at every epoch, has the same chance to be in it), each stored with its task id, its label and the
logits its task's head gave it when it was stored. Each training step adds, to the cross-entropy of the new batch,

    alpha · MSE(logits now, stored logits)   on one batch drawn from the buffer
    beta  · cross-entropy(labels)             on a second, independent batch drawn from the buffer

each buffered example scored by its own task's head. Inputs are stored as the model saw them (after any training
augmentation), token features without padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..features import pad_features
from .base import SharedEncoderStrategy, model_inputs


@dataclass
class DERPPConfig:
    """Args:
    buffer_size: examples kept over all tasks (reservoir sampling).
    alpha: weight of the logit-matching (dark knowledge) term.
    beta: weight of the buffer cross-entropy term.
    """

    buffer_size: int = 500
    alpha: float = 0.3
    beta: float = 0.5


@dataclass
class _Stored:
    inputs: torch.Tensor  # (n_tokens, D) token features or (C, H, W) pixels
    task: int
    label: int
    logits: torch.Tensor  # (L_task,)


class DERPPStrategy(SharedEncoderStrategy):
    name: ClassVar[str] = "derpp"
    config_class: ClassVar[type] = DERPPConfig

    def __init__(self, model_config, config: DERPPConfig | None = None):
        super().__init__(model_config, config)
        self.buffer: list[_Stored] = []
        self.seen = 0

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], index: int, progress: float
    ) -> torch.Tensor:
        logits = self.network(**model_inputs(batch), task_ids=index)
        loss = self.classification_loss(logits, batch["labels"])
        if self.buffer:
            size = len(batch["labels"])
            replay, stored = self._replay_batch(size)
            pooled = self.network.encode(**replay)
            matching = torch.zeros((), device=loss.device)
            for task in sorted({example.task for example in stored}):
                rows = [row for row, example in enumerate(stored) if example.task == task]
                now = self.network.head_logits(pooled[rows], task).float()
                then = torch.stack([stored[row].logits for row in rows]).to(now)
                matching = matching + F.mse_loss(now, then, reduction="sum") / now.shape[1]
            replay, stored = self._replay_batch(size)
            task_ids = torch.tensor([example.task for example in stored], device=loss.device)
            labels = torch.tensor([example.label for example in stored], device=loss.device)
            replayed = self.classification_loss(self.network(**replay, task_ids=task_ids), labels)
            loss = loss + self.config.alpha * matching / len(stored) + self.config.beta * replayed
        self._store(batch, logits.detach(), index)
        return loss

    def _replay_batch(self, size: int) -> tuple[dict[str, torch.Tensor], list[_Stored]]:
        """`size` buffered examples drawn uniformly (without replacement), collated as model inputs."""
        picks = torch.randperm(len(self.buffer))[:size].tolist()
        stored = [self.buffer[pick] for pick in picks]
        device = self.network.input_proj.weight.device
        if stored[0].inputs.dim() == 2:
            inputs = pad_features([example.inputs for example in stored])
        else:
            inputs = {"pixel_values": torch.stack([example.inputs for example in stored])}
        return {name: value.to(device) for name, value in inputs.items()}, stored

    def _store(self, batch: dict[str, torch.Tensor], logits: torch.Tensor, index: int) -> None:
        """Reservoir sampling: the i-th example of the stream replaces a random slot with probability size / i."""
        if "pixel_values" in batch:
            examples = list(batch["pixel_values"].cpu())
        else:
            lengths = batch["attention_mask"].sum(1).tolist()
            examples = [row[:length] for row, length in zip(batch["inputs_embeds"].cpu(), lengths)]
        for example, label, row_logits in zip(examples, batch["labels"].tolist(), logits.cpu()):
            item = _Stored(example.clone(), index, label, row_logits)
            if len(self.buffer) < self.config.buffer_size:
                self.buffer.append(item)
            else:
                slot = int(torch.randint(0, self.seen + 1, ()))
                if slot < self.config.buffer_size:
                    self.buffer[slot] = item
            self.seen += 1
