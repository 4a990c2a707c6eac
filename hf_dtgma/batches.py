"""Batches of a continual task's split, for training and evaluation: `{"inputs_embeds", "attention_mask", "labels"}`
from cached backbone `features`, or `{"pixel_values", "labels"}` from images; plus `task_ids` where the data set has a
`task_id` column (training on several tasks at once)."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
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
    if inputs == "features":  # whole batches read from Arrow at once (`_FeatureBatches.__getitems__`)
        return DataLoader(
            _FeatureBatches(dataset, columns), batch_size=batch_size, shuffle=shuffle, generator=generator,
            collate_fn=_batch_collator(transform, name),
        )
    return DataLoader(
        dataset.with_format("torch", columns=columns), batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=_collator(inputs, transform, name),
    )


class _FeatureBatches(torch.utils.data.Dataset):
    """A split with ragged `features` `(n_i, D)` per example, read a batch of rows at a time: one Arrow read, then the
    token values of all the rows at once into `inputs_embeds (B, N_max, D)` (float32, zero padding) and
    `attention_mask (B, N_max)`. Same values as collating the rows one by one (`pad_features`), without a tensor per
    row: a shuffled epoch of a 1,500-example CLINC150 split in batches of 32 reads in 0.13 s against 0.29 s."""

    def __init__(self, dataset: Dataset, columns: list[str]):
        self.table = dataset.with_format("arrow", columns=columns)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([row])

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The batch of `rows`: `DataLoader` asks for a batch's rows at once and hands the result to its collate_fn."""
        contiguous = rows[-1] - rows[0] + 1 == len(rows) and rows == list(range(rows[0], rows[-1] + 1))
        table = self.table[rows[0] : rows[-1] + 1] if contiguous else self.table[rows]  # a slice: no copy
        batch = _padded_features(table["features"])
        for column, key in (("label", "labels"), ("task_id", "task_ids")):
            if column in table.column_names:
                batch[key] = torch.from_numpy(table[column].to_numpy().astype("int64"))
        return batch


def _padded_features(column: pa.ChunkedArray) -> dict[str, torch.Tensor]:
    """Ragged token features (an `Array2D(shape=(None, D))` column, or lists of lists) → `pad_features`' output."""
    tokens = column.combine_chunks()
    tokens = tokens.storage if isinstance(tokens, pa.ExtensionArray) else tokens
    lengths = torch.from_numpy(pc.list_value_length(tokens).to_numpy(zero_copy_only=False).astype("int64"))
    vectors = pc.list_flatten(tokens)
    if len(vectors) == 0:  # no token at all: nothing tells the width, so the rows say it
        return pad_features([torch.tensor(row, dtype=torch.float32) for row in column.to_pylist()])
    values = torch.from_numpy(pc.list_flatten(vectors).to_numpy(zero_copy_only=False).astype("float32"))
    inputs = values.new_zeros(len(lengths), int(lengths.max()), len(values) // len(vectors))
    mask = torch.arange(inputs.shape[1])[None] < lengths[:, None]
    inputs[mask] = values.view(len(vectors), -1)
    return {"inputs_embeds": inputs, "attention_mask": mask.long()}


def _batch_collator(transform: Transform | None, name: str) -> Transform:
    """The finite check and `transform` of `_collator`, for a batch `_FeatureBatches` already put together."""

    def collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_finite(batch["inputs_embeds"], f"A batch of {name} (`features`)")
        return transform(batch) if transform is not None else batch

    return collate


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
