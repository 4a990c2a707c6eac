"""`joint`: the multi-task upper bound. Task t trains the shared encoder and every head on the union of the training
splits of tasks 0..t (each example on its own task's head), starting from the model after task t-1, and early-stops
on the mean validation accuracy of tasks 0..t. Each row of its accuracy matrix is a model trained on all the data
seen so far, which no continual method may store; its cost grows with the number of tasks."""

from __future__ import annotations

from typing import ClassVar

from datasets import Dataset, Value, concatenate_datasets

from .base import SharedEncoderStrategy


def with_task_id(dataset: Dataset, task_id: int) -> Dataset:
    """A task's examples (`features` or `pixel_values`, `label`) with a `task_id` column, labels as plain integers."""
    inputs = "features" if "features" in dataset.column_names else "pixel_values"
    part = dataset.select_columns([inputs, "label"]).cast_column("label", Value("int64"))
    return part.add_column("task_id", [task_id] * len(part))


def with_task_ids(tasks: list, index: int) -> Dataset:
    """The training splits of tasks 0..index in one data set, with a `task_id` column (labels as plain integers)."""
    return concatenate_datasets([with_task_id(task.train, task_id) for task_id, task in enumerate(tasks[: index + 1])])


class JointStrategy(SharedEncoderStrategy):
    name: ClassVar[str] = "joint"

    def begin_task(self, index: int, tasks: list) -> None:
        super().begin_task(index, tasks)
        for head in self.network.heads:
            head.requires_grad_(True)

    def train_dataset(self, index: int, tasks: list) -> Dataset:
        return with_task_ids(tasks, index)

    def validation_tasks(self, index: int) -> list[int]:
        return list(range(index + 1))
