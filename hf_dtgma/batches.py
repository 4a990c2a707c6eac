"""Batches of a continual task's split, for training and evaluation: `{"inputs_embeds", "attention_mask", "labels"}`
from cached backbone `features`, or `{"pixel_values", "labels"}` from images; plus `task_ids` where the data set has a
`task_id` column (training on several tasks at once)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from .features import pad_features
from .modeling_dtgma import check_finite

Transform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def batch_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    transform: Transform | None = None,
    name: str = "the split",
) -> DataLoader:
    """A `DataLoader` over `dataset` (a split with a `label` column and `features` or `pixel_values`); `transform`
    maps each collated batch (e.g. augmentation); `name` says which split it is in error messages."""
    if len(dataset) == 0:
        raise ValueError(f"No examples in {name}: every task needs train, validation and test examples.")
    inputs = next((column for column in ("features", "pixel_values") if column in dataset.column_names), None)
    if inputs is None:
        raise ValueError(
            f"Neither `features` nor `pixel_values` in {name} (columns: {dataset.column_names}): compute text "
            "features with hf_dtgma.features.cache_task_features, or give images as `pixel_values`."
        )
    columns = [inputs, "label"] + (["task_id"] if "task_id" in dataset.column_names else [])
    return DataLoader(
        dataset.with_format("torch", columns=columns), batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=_collator(inputs, transform, name),
    )


def _collator(
    inputs: str, transform: Transform | None = None, name: str = "the split"
) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Collate examples `{inputs: ..., "label": int[, "task_id": int]}` into model inputs plus `labels (B,)` (and
    `task_ids (B,)`), then apply `transform`. A batch with NaN or inf inputs is refused here, on the host (no device
    sync), for every method (the DTG-MA forward checks again for callers that bypass these batches)."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        if inputs == "features":
            batch = pad_features([example["features"] for example in examples])
        else:
            batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples]).float()}
        values = batch["inputs_embeds" if inputs == "features" else "pixel_values"]
        check_finite(values, f"A batch of {name} (`{inputs}`)")
        batch["labels"] = torch.tensor([int(example["label"]) for example in examples])
        if "task_id" in examples[0]:
            batch["task_ids"] = torch.tensor([int(example["task_id"]) for example in examples])
        return transform(batch) if transform is not None else batch

    return collate
