"""`batch_loader` reads cached features a batch at a time from Arrow: the same batches, values and order as collating
the rows one by one."""

import numpy as np
import pytest
import torch
from datasets import Array2D, Dataset, Features, Value
from torch.utils.data import DataLoader

from hf_dtgma.batches import batch_loader
from hf_dtgma.features import pad_features
from hf_dtgma.modeling_dtgma import check_finite


def ragged_split(rows: int = 37, width: int = 5, array2d: bool = True) -> Dataset:
    """Rows of 1..9 token vectors in float16, as `cache_features` stores them (or plain nested lists)."""
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((int(rng.integers(1, 10)), width)).astype(np.float16) for _ in range(rows)]
    data = {"features": features, "label": [i % 3 for i in range(rows)], "task_id": [i % 2 for i in range(rows)]}
    schema = Features({
        "features": Array2D(shape=(None, width), dtype="float16") if array2d else [[Value("float32")]],
        "label": Value("int64"), "task_id": Value("int64"),
    })
    return Dataset.from_dict(data, features=schema)


def row_by_row(dataset: Dataset, rows: list[int]) -> dict[str, torch.Tensor]:
    """What collating the rows one at a time gives: datasets' torch format, then `pad_features`."""
    table = dataset.with_format("torch")
    examples = [table[i] for i in rows]
    batch = pad_features([example["features"] for example in examples])
    batch["labels"] = torch.tensor([int(example["label"]) for example in examples])
    batch["task_ids"] = torch.tensor([int(example["task_id"]) for example in examples])
    return batch


def assert_same_batch(batch: dict, expected: dict) -> None:
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        assert batch[key].dtype == value.dtype, key
        assert torch.equal(batch[key], value), key


@pytest.mark.parametrize("array2d", [True, False])
def test_batches_in_order_equal_row_by_row_collation(array2d):
    dataset = ragged_split(array2d=array2d)
    batches = list(batch_loader(dataset, 8))
    assert [len(batch["labels"]) for batch in batches] == [8, 8, 8, 8, 5]
    assert batches[0]["inputs_embeds"].dtype == torch.float32
    for start, batch in zip(range(0, len(dataset), 8), batches):
        assert_same_batch(batch, row_by_row(dataset, list(range(start, min(start + 8, len(dataset))))))


def test_shuffled_batches_follow_the_generator_like_a_plain_dataloader():
    dataset = ragged_split()
    plain = DataLoader(range(len(dataset)), 6, shuffle=True, generator=torch.Generator().manual_seed(4))
    loader = batch_loader(dataset, 6, shuffle=True, generator=torch.Generator().manual_seed(4))
    order = [list(batch) for epoch in range(2) for batch in plain]  # two epochs: the generator moves on alike
    batches = [batch for epoch in range(2) for batch in loader]
    assert len(batches) == len(order) == 14 and order[:7] != order[7:]
    for rows, batch in zip(order, batches):
        assert_same_batch(batch, row_by_row(dataset, [int(row) for row in rows]))


def test_a_selected_view_reads_its_own_rows():
    dataset = ragged_split()
    view = dataset.select([30, 2, 17, 5, 5, 11])
    (batch,) = list(batch_loader(view, 16))
    assert_same_batch(batch, row_by_row(dataset, [30, 2, 17, 5, 5, 11]))


def test_a_transform_sees_the_batch_and_bad_values_name_their_row():
    dataset = ragged_split(rows=6)
    (batch,) = list(batch_loader(dataset, 6, transform=lambda batch: {**batch, "seen": torch.ones(1)}))
    assert "seen" in batch
    features = [row.copy() for row in dataset.with_format("numpy")[:]["features"]]
    features[4][0, 1] = np.nan
    broken = Dataset.from_dict({"features": features, "label": [0] * 6}, features=Features({
        "features": Array2D(shape=(None, 5), dtype="float16"), "label": Value("int64"),
    }))
    with pytest.raises(ValueError, match=r"batch rows \[4\]"):
        list(batch_loader(broken, 6, name="task 'x' train"))


def test_check_finite_takes_huge_finite_values_and_finds_every_nan_and_inf():
    check_finite(torch.full((3, 4), 3e38), "big")  # the sum overflows; every value is finite
    check_finite(torch.empty(0, 4), "empty")
    for bad in (float("nan"), float("inf"), -float("inf")):
        values = torch.zeros(5, 2, 3)
        values[1, 1, 2] = values[3, 0, 0] = bad
        with pytest.raises(ValueError, match=r"batch rows \[1, 3\]"):
            check_finite(values, "values")
