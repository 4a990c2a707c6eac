"""`dtgma` (ours) and `dtgma_full` (the reference design), as strategies: the trainer's default.

DTG-MA isolates tasks by construction: a new task adds its own tokens, low-rank deltas and head, and everything an
earlier task reads is frozen (`DTGMAModel.freeze_task`), so no regulariser, mask or replay is needed. `dtgma_full`
gives each task full Q/K/V/O and feed-forward projections instead of low-rank deltas, as the published DTG-MA code
does (many more parameters per task), for comparison.

Input rows never read task tokens, so while the shared weights are frozen (`shared_training="never"`, or after the
first task) an example's input stream (`DTGMAModel.input_stream`: the input tokens' keys and values in every layer)
never changes. `DTGMAStrategy.batches` computes it once per example of a split, in evaluation mode, and every epoch,
validation and evaluation after it computes only the task rows. (So no dropout falls on the frozen input stream
itself; in training the task rows drop out the input keys and values they read, re-drawn at every step.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from ..batches import batch_loader
from ..configuration_dtgma import DTGMAConfig
from ..features import token_counts
from ..modeling_dtgma import DTGMAInputStream, DTGMAModel
from ..routing import fit_task_router
from .base import ContinualStrategy, NoHyperparameters, Retrain, model_inputs

STREAM_BATCH_SIZE = 256  # examples per input-stream call (`DTGMAStrategy._input_streams`)


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
        # split fingerprint → (stream, labels, positions): see `_input_streams`
        self._streams: dict[str, tuple[DTGMAInputStream, torch.Tensor, torch.Tensor]] = {}

    @property
    def model(self) -> DTGMAModel:
        return self.module

    def begin_task(self, index: int, tasks: list) -> None:
        self.model.add_task(tasks[index].name, labels=tasks[index].labels)

    def batches(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        name: str = "the split",
    ) -> DataLoader:
        """Batches `{"input_stream", "labels"}` over the input streams of `dataset`, computed once (see the module
        docstring) and kept until the task that trains on them ends; the feature batches of `batch_loader` where the
        stream can change (shared weights training, images, a batch transform, several tasks in one split)."""
        model = self.model
        frozen = not any(param.requires_grad for param in model.shared_parameters())
        fixed = "features" in dataset.column_names and "task_id" not in dataset.column_names and transform is None
        if not (frozen and fixed and model.config.image_size is None):
            return super().batches(
                dataset, batch_size, shuffle=shuffle, generator=generator, transform=transform, name=name
            )
        if dataset._fingerprint not in self._streams:
            self._streams[dataset._fingerprint] = self._input_streams(dataset, name)
        stream, labels, positions = self._streams[dataset._fingerprint]

        def collate(rows: list[int]) -> dict[str, Any]:
            rows = positions[torch.tensor(rows)]
            return {"input_stream": stream.select(rows), "labels": labels[rows]}

        return DataLoader(
            range(len(dataset)), batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
        )

    @torch.no_grad()
    def _input_streams(self, dataset: Dataset, name: str) -> tuple[DTGMAInputStream, torch.Tensor, torch.Tensor]:
        """The input stream of every example of `dataset`, in evaluation mode, computed in batches of examples of
        similar length (little padding: the input rows are the costly part of a DTG-MA forward). Returns the stream and
        the labels `(n,)` in that length order, and `positions` `(n,)`: where example i of `dataset` sits in them."""
        model, was_training = self.model, self.model.training
        device = model.input_proj.weight.device
        order = np.argsort(token_counts(dataset), kind="stable")
        streams, labels = [], []
        model.eval()
        try:
            for batch in batch_loader(dataset.select(order), STREAM_BATCH_SIZE, name=name):
                streams.append(
                    model.input_stream(batch["inputs_embeds"].to(device), batch["attention_mask"].to(device))
                )
                labels.append(batch["labels"])
        finally:
            model.train(was_training)
        positions = torch.empty(len(order), dtype=torch.long)
        positions[torch.from_numpy(order)] = torch.arange(len(order))
        return DTGMAInputStream.cat(streams), torch.cat(labels), positions

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], index: int, progress: float
    ) -> torch.Tensor:
        if not self.label_smoothing:
            return model(**batch, task_ids=index).loss  # the model's own (checked) cross-entropy
        return self.classification_loss(model(**model_inputs(batch), task_ids=index).logits, batch["labels"])

    def end_task(self, index: int, tasks: list, retrain: Retrain) -> None:
        """Freeze the task, then fit its routing statistics (`hf_dtgma.routing`) from its own splits."""
        self.model.freeze_task(tasks[index].name)
        self._streams.pop(tasks[index].train._fingerprint, None)  # no later task trains on it
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
