"""Reliability (issue 11): bad input gets a clear error, interruptions lose nothing, only safetensors and JSON load."""

import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import DIM, INPUT_DIM, make_model, synthetic_tasks, tiny_qwen
from test_main_job import ROOT, write_csv
from test_training import new_model, training_config

from hf_dtgma import DTGMAConfig, DTGMAModel
from hf_dtgma.backbones import open_text_backbone
from hf_dtgma.batches import batch_loader
from hf_dtgma.data.vision import load_split_cifar100
from hf_dtgma.errors import TrainingDivergedError, explain_out_of_memory
from hf_dtgma.features import cache_features
from hf_dtgma.modeling_dtgma import PatchEmbedder, atomic_path, task_graph_mask
from hf_dtgma.strategies.dtgma import DTGMAStrategy
from hf_dtgma.training import ContinualTask, ContinualTrainer, ContinualTrainingConfig
from hf_dtgma.training.trainer import SPLITS

# ------------------------------------------------------------------------------------------ bad input, table-driven


def two_tasks() -> DTGMAModel:
    model = make_model()
    model.add_task("sentiment", labels=["positive", "negative"])
    model.add_task("topic", labels=["finance", "science", "sports"])
    return model.eval()


def image_model() -> DTGMAModel:
    model = make_model(input_dim=INPUT_DIM, image_size=28, patch_size=7, num_channels=1)
    model.add_task("digits", labels=["0", "1"])
    return model.eval()


def a_file(folder: Path) -> Path:
    (folder / "afile").write_text("mine")
    return folder / "afile"


def one_layer_stream():
    """The input stream of a model with one layer (`two_tasks` has two)."""
    model = make_model(num_layers=1)
    model.add_task("a", labels=["x", "y"])
    return model.input_stream(features())


def saved_folder(model: DTGMAModel, folder: Path) -> str:
    model.save_pretrained(folder)
    return str(folder)


def features(batch: int = 2, tokens: int = 4, width: int = INPUT_DIM, poison: float | None = None) -> torch.Tensor:
    values = torch.randn(batch, tokens, width)
    if poison is not None:
        values[1, 2, 3] = poison
    return values


def split(labels=(0, 1, 0, 1), width: int = DIM, poison: float | None = None) -> Dataset:
    """A split of token features (3 tokens each) with the given labels; `poison` goes into the last example."""
    rows = [np.full((3, width), 0.5 * label, dtype=np.float32) for label in labels]
    if poison is not None and rows:
        rows[-1][1, 2] = poison
    return Dataset.from_dict({"features": rows, "label": list(labels)})


def task(name: str = "t", labels=("no", "yes"), **splits: Dataset) -> ContinualTask:
    data = {part: split() for part in SPLITS} | splits
    return ContinualTask(name, list(labels), **data)


def fit(tasks: list[ContinualTask], tmp_path: Path) -> dict:
    return ContinualTrainer(new_model(), training_config(tmp_path / "run")).fit(tasks)


class FakeBackbone:
    """What `cache_features` reads of a text backbone; `encode` returns fixed features or raises `error`."""

    name, max_length, hidden_size, identity = "fake", 8, DIM, {"name": "fake"}

    def __init__(self, error: Exception | None = None):
        self.error = error

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.error is not None:
            raise self.error
        return torch.ones(len(texts), 2, DIM), torch.ones(len(texts), 2, dtype=torch.long)


def case(name: str, call, error: type[Exception], message: str):
    """One row of the table: `call(tmp_path)` must raise `error` with a message matching `message`."""
    return pytest.param(call, error, message, id=name)


BAD_INPUTS = [
    # unknown task name or id: the known ones are listed
    case("unknown-task-name", lambda tmp: two_tasks().task_labels("weather"),
         KeyError, r"Unknown task 'weather'\. Known tasks: \['sentiment', 'topic'\]"),
    case("unknown-task-name-in-forward", lambda tmp: two_tasks()(inputs_embeds=features(), task_ids="weather"),
         KeyError, r"Known tasks: \['sentiment', 'topic'\]"),
    case("unknown-task-name-in-save-task", lambda tmp: two_tasks().save_task("weather", tmp / "a"),
         KeyError, "Known tasks"),
    case("unknown-task-id", lambda tmp: two_tasks()(inputs_embeds=features(), task_ids=5),
         ValueError, r"out of range: task ids are 0\.\.1 for tasks \['sentiment', 'topic'\]"),
    case("float-task-ids", lambda tmp: two_tasks()(inputs_embeds=features(), task_ids=torch.tensor([0.0, 1.0])),
         ValueError, r"integer tensor of shape \(2,\) \(or one id or task name\), got torch.float32 of shape \(2,\)"),
    case("boolean-task-id", lambda tmp: two_tasks()(inputs_embeds=features(), task_ids=True),
         ValueError, r"got torch.bool of shape \(2,\)"),
    case("unknown-task-name-in-a-list",
         lambda tmp: two_tasks()(inputs_embeds=features(), task_ids=["topic", "weather"]),
         KeyError, r"Unknown task 'weather'. Known tasks: \['sentiment', 'topic'\]"),
    case("deferred-backbone-attached", lambda tmp: two_tasks().attach_backbone(SimpleNamespace(backbone=None)),
         TypeError, r"takes a module such as `TextBackbone` or `PatchEmbedder`, got SimpleNamespace "
         r"\(a deferred backbone: attach its `.backbone`\)"),
    case("predict-no-texts", lambda tmp: two_tasks().predict([]), ValueError, r"`texts` is empty"),
    case("backbone-folder-missing", lambda tmp: open_text_backbone(str(tmp / "nope")),
         FileNotFoundError, r"nope: no such folder, and not a Hub id"),
    case("dtgma-model-as-backbone", lambda tmp: open_text_backbone(saved_folder(two_tasks(), tmp / "model")),
         ValueError, r"model is a DTG-MA model, not a backbone: pass the backbone it was trained on"),
    case("layer-norm-eps-negative", lambda tmp: DTGMAConfig(layer_norm_eps=-1.0),
         ValueError, r"`layer_norm_eps` must be in \(0, 1\), got -1.0"),
    case("config-task-without-labels", lambda tmp: DTGMAConfig(tasks=[{"name": "a", "frozen": True}]),
         ValueError, r"`tasks\[0\]` must be a dict with a task `name` and its non-empty `labels` list"),
    case("config-tasks-twice", lambda tmp: DTGMAConfig(tasks=[{"name": "a", "labels": ["x"]}] * 2),
         ValueError, r"tasks \['a'\] appear more than once"),
    case("config-task-name-that-is-a-path",
         lambda tmp: DTGMAModel(DTGMAConfig(tasks=[{"name": "../evil", "labels": ["x", "y"]}])),
         ValueError, r"Task name '../evil' cannot name a folder"),
    case("dropout-not-a-probability", lambda tmp: DTGMAConfig(attention_dropout=-1),
         ValueError, r"`attention_dropout` is a probability in \[0, 1\), got -1"),
    case("negative-task-id", lambda tmp: two_tasks()(inputs_embeds=features(), task_ids=torch.tensor([0, -1])),
         ValueError, "out of range"),
    # a task added twice
    case("task-added-twice", lambda tmp: two_tasks().add_task("topic", labels=["a"]),
         ValueError, "'topic' is already registered"),
    case("task-twice-in-the-task-list", lambda tmp: fit([task("a"), task("b"), task("a")], tmp),
         ValueError, r"Tasks \['a'\] appear more than once"),
    # labels empty or duplicated
    case("labels-empty", lambda tmp: two_tasks().add_task("new", labels=[]),
         ValueError, "`labels` is empty"),
    case("labels-duplicated", lambda tmp: two_tasks().add_task("new", labels=["a", "b", "a"]),
         ValueError, r"duplicated labels \['a'\]"),
    case("labels-empty-in-the-task-list", lambda tmp: fit([task(labels=[])], tmp),
         ValueError, "`labels` is empty"),
    case("labels-duplicated-in-the-task-list", lambda tmp: fit([task(labels=["no", "no"])], tmp),
         ValueError, r"duplicated labels \['no'\]"),
    # feature width different from the config
    case("feature-width", lambda tmp: two_tasks()(inputs_embeds=features(width=INPUT_DIM + 1)),
         ValueError, "Feature width 13 differs from config.input_dim=12"),
    case("feature-width-in-training", lambda tmp: fit([task(**{part: split(width=DIM + 2) for part in SPLITS})], tmp),
         ValueError, "Feature width 10 differs from config.input_dim=8"),
    case("feature-width-differs-between-tasks", lambda tmp: fit([task("a"), task("b", test=split(width=DIM + 2))], tmp),
         ValueError, r"`features` of shape \(10,\), but Task 'a', train split has `features` of shape \(8,\)"),
    # attention mask of the wrong shape, or all zeros for a row
    case("mask-shape", lambda tmp: two_tasks()(inputs_embeds=features(), attention_mask=torch.ones(2, 5)),
         ValueError, r"`attention_mask` must have shape \(batch, tokens\) = \(2, 4\), got \(2, 5\)"),
    case("mask-row-all-zeros",
         lambda tmp: two_tasks()(inputs_embeds=features(), attention_mask=torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])),
         ValueError, r"rows \[1\] have no real token \(all zeros\)"),
    case("mask-value-not-0-or-1",
         lambda tmp: two_tasks()(inputs_embeds=features(), attention_mask=torch.tensor([[1, 1, 0, -1], [1, 1, 1, 1]])),
         ValueError, r"`attention_mask` must hold 1 \(real token\) and 0 \(padding\) only, got \[-1\]"),
    case("no-tokens", lambda tmp: two_tasks()(inputs_embeds=features(tokens=0)),
         ValueError, r"`inputs_embeds` of shape \(2, 0, 12\) holds no example or no token"),
    case("predict-two-inputs", lambda tmp: two_tasks().predict(["a text"], inputs_embeds=features()),
         ValueError, r"exactly one of `texts`, .* got \['texts', 'inputs_embeds'\]"),
    case("input-stream-of-another-model",
         lambda tmp: two_tasks()(input_stream=one_layer_stream(), task_ids=0),
         ValueError, r"`input_stream` comes from another model \(1 layers .* this model's: 2 layers"),
    # images of the wrong size or channels
    case("image-size", lambda tmp: image_model()(pixel_values=torch.randn(2, 1, 14, 14), task_ids=0),
         ValueError, "the images are 14x14, the model reads 28x28"),
    case("image-channels", lambda tmp: image_model()(pixel_values=torch.randn(2, 3, 28, 28), task_ids=0),
         ValueError, "the images have 3 channels, the model reads 1"),
    case("image-not-4d", lambda tmp: image_model()(pixel_values=torch.randn(2, 28, 28), task_ids=0),
         ValueError, r"pass a 4-D \(batch, channels, height, width\) tensor"),
    case("image-size-patch-embedder", lambda tmp: PatchEmbedder(28, 7, 1, 8)(torch.randn(2, 1, 32, 32)),
         ValueError, "the images are 32x32, the model reads 28x28"),
    # an empty dataset, or a split with no examples
    case("no-tasks", lambda tmp: fit([], tmp), ValueError, "`tasks` is empty"),
    case("split-with-no-examples", lambda tmp: fit([task("a"), task("b", test=split(labels=()))], tmp),
         ValueError, "Task 'b', test split: no examples"),
    case("empty-dataset-batches", lambda tmp: batch_loader(split(labels=()), 4, name="task 'x''s training data"),
         ValueError, "No examples in task 'x''s training data"),
    case("empty-dataset-features",
         lambda tmp: cache_features(Dataset.from_dict({"text": []}), FakeBackbone(), cache_dir=tmp),
         ValueError, "empty dataset"),
    case("split-without-inputs", lambda tmp: fit([task(train=Dataset.from_dict({"label": [0]}))], tmp),
         ValueError, "needs a `label` column and `features`"),
    # a label outside the task's label set
    case("label-outside-in-forward",
         lambda tmp: two_tasks()(inputs_embeds=features(), task_ids=0, labels=torch.tensor([0, 2])),
         ValueError, "label indices within each row's task"),
    case("float-labels-in-forward",
         lambda tmp: two_tasks()(inputs_embeds=features(), task_ids=0, labels=torch.tensor([0.5, 1.5])),
         ValueError, r"label indices within each row's task .* got \[0.5, 1.5\] \(torch.float32\)"),
    case("float-labels-in-the-task-list", lambda tmp: fit([task(train=split(labels=(0.0, 1.0, 0.5, 0.7)))], tmp),
         ValueError, r"Task 't', train split: `label` holds float\d+ values, e.g. \[0.0, 1.0, 0.5\]: it must hold "
         r"whole-number indices 0..1"),
    case("label-names-in-the-task-list",
         lambda tmp: fit([task(train=split().remove_columns("label").add_column("label", ["no", "yes"] * 2))], tmp),
         ValueError, r"`label` holds <U3 values, e.g. \['no', 'yes', 'no'\]: .*map label names to their index"),
    case("learning-rate-a-string", lambda tmp: ContinualTrainingConfig(output_dir=str(tmp), learning_rate="0.01"),
         ValueError, r"`learning_rate` must be a number, got '0.01' \(str\)"),
    case("save-into-a-file", lambda tmp: two_tasks().save_pretrained(a_file(tmp)),
         NotADirectoryError, r"afile is a file, not a folder to save into"),
    case("save-task-into-a-file", lambda tmp: two_tasks().save_task("topic", a_file(tmp)),
         NotADirectoryError, r"afile is a file, not a folder to save into"),
    case("from-pretrained-without-config", lambda tmp: DTGMAModel.from_pretrained(tmp),
         FileNotFoundError, r"has no config.json: it is not a folder written by save_pretrained"),
    case("negative-seed", lambda tmp: ContinualTrainingConfig(output_dir=str(tmp), seed=-1),
         ValueError, r"`seed` must be a whole number in \[0, 2\*\*31\), got -1"),
    case("label-outside-in-the-task-list",
         lambda tmp: fit([task("a"), task("b", validation=split(labels=(0, 1, 2)))], tmp),
         ValueError, r"Task 'b', validation split: labels \[2\] are outside the task's label set"),
    case("negative-label", lambda tmp: fit([task(train=split(labels=(0, -1)))], tmp),
         ValueError, r"labels \[-1\] are outside"),
    # NaN or inf in the inputs
    case("nan-features", lambda tmp: two_tasks()(inputs_embeds=features(poison=float("nan"))),
         ValueError, r"`inputs_embeds` \(the token features\) holds NaN or inf values \(batch rows \[1\]\)"),
    case("inf-features", lambda tmp: two_tasks()(inputs_embeds=features(poison=float("-inf")), task_ids=1),
         ValueError, "holds NaN or inf"),
    case("inf-pixels", lambda tmp: image_model()(pixel_values=torch.full((2, 1, 28, 28), float("inf")), task_ids=0),
         ValueError, r"`pixel_values` holds NaN or inf values \(batch rows \[0, 1\]\)"),
    case("nan-in-training-data", lambda tmp: fit([task("a"), task("b", train=split(poison=float("nan")))], tmp),
         ValueError, r"A batch of task 'b''s training data \(`features`\) holds NaN or inf"),
    case("inf-in-test-data", lambda tmp: fit([task("a", test=split(poison=float("inf")))], tmp),
         ValueError, r"A batch of task 'a''s test data \(`features`\) holds NaN or inf"),
    # a config of an incompatible version
    case("config-from-a-newer-version", lambda tmp: DTGMAConfig(format_version=3),
         ValueError, r"format_version=3, and this hf_dtgma reads format 2 only \(it was saved by a newer hf_dtgma\)"),
    case("config-from-before-routing", lambda tmp: DTGMAConfig(format_version=1),
         ValueError, r"format_version=1, and this hf_dtgma reads format 2 only "
         r"\(it was saved by an older hf_dtgma.*\)\. Load the model with the code saved next to it"),
    # a task's name names its adapter's folder; the training settings are checked before any work
    case("task-name-that-is-a-path", lambda tmp: two_tasks().add_task("../model", labels=["a", "b"]),
         ValueError, r"Task name '\.\./model' cannot name a folder .*without '/'"),
    case("task-name-that-is-a-path-in-the-task-list", lambda tmp: task("news/sports"),
         ValueError, r"Task name 'news/sports' cannot name a folder"),
    case("zero-epochs", lambda tmp: ContinualTrainingConfig(output_dir=str(tmp), epochs=0),
         ValueError, r"`epochs` must be a whole number of at least 1, got 0"),
    case("zero-batch-size", lambda tmp: ContinualTrainingConfig(output_dir=str(tmp), eval_batch_size=0),
         ValueError, r"`eval_batch_size` must be a whole number of at least 1, got 0"),
    case("negative-learning-rate", lambda tmp: ContinualTrainingConfig(output_dir=str(tmp), learning_rate=-0.01),
         ValueError, r"`learning_rate` and `max_grad_norm` must be above 0 and `weight_decay` at least 0, got -0\.01"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS)
def test_bad_input_gets_an_error_naming_the_problem(tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)


# ------------------------------------------------------------------------- forward: property-based


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_forward_shapes_finite_logits_and_exactly_zero_blocked_attention(data):
    label_counts = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4), label="label counts per task")
    per_task = data.draw(st.integers(1, 2), label="task tokens")
    batch, length = data.draw(st.integers(1, 4), label="batch"), data.draw(st.integers(1, 6), label="tokens")
    # any padding pattern (left, right, in the middle) with at least one real token per row
    real = [data.draw(st.lists(st.booleans(), min_size=length, max_size=length)) for _ in range(batch)]
    for row in real:
        row[data.draw(st.integers(0, length - 1))] = True
    num_tasks = len(label_counts)
    task_ids = data.draw(
        st.one_of(st.none(), st.lists(st.integers(0, num_tasks - 1), min_size=batch, max_size=batch)), label="task ids"
    )
    model = make_model(seed=data.draw(st.integers(0, 3)), num_task_tokens=per_task)
    for index, count in enumerate(label_counts):
        model.add_task(f"task{index}", labels=[f"l{j}" for j in range(count)])
    model.eval()
    inputs, mask = torch.randn(batch, length, INPUT_DIM), torch.tensor(real, dtype=torch.long)
    ids = None if task_ids is None else torch.tensor(task_ids)

    out = model(
        inputs_embeds=inputs, attention_mask=mask, task_ids=ids, output_attentions=True, output_hidden_states=True
    )

    groups, max_labels = (num_tasks if ids is None else 1), max(label_counts)
    logits = out.logits if ids is None else out.logits[:, None]  # (B, G, L_max)
    assert logits.shape == (batch, groups, max_labels)
    assert out.task_states.shape == ((batch, num_tasks, 16) if ids is None else (batch, 16))
    row_tasks = torch.arange(num_tasks).expand(batch, -1) if ids is None else ids[:, None]
    counts = torch.tensor(label_counts)[row_tasks]  # (B, G): each group's label count
    real_label = torch.arange(max_labels) < counts[..., None]
    assert torch.isfinite(logits[real_label]).all() and torch.isneginf(logits[~real_label]).all()
    assert all(torch.isfinite(state).all() for state in out.hidden_states)

    blocked = torch.isneginf(task_graph_mask(groups, per_task, mask))  # (B, 1, S, S)
    assert len(out.attentions) == model.config.num_layers
    for weights in out.attentions:
        assert weights.shape == (batch, model.config.num_heads, groups * per_task + length, groups * per_task + length)
        assert torch.isfinite(weights).all()
        assert (weights.masked_select(blocked.expand_as(weights)) == 0).all()  # exactly zero, not merely small
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))

    # The fused attention (no weights returned) computes the same; what is blocked cannot matter: other values at the
    # padded positions give identical logits.
    fused = model(inputs_embeds=inputs, attention_mask=mask, task_ids=ids).logits
    torch.testing.assert_close(fused, out.logits)
    repadded = torch.where(mask[..., None].bool(), inputs, torch.randn_like(inputs))
    assert torch.equal(model(inputs_embeds=repadded, attention_mask=mask, task_ids=ids).logits, fused)
    if ids is not None:  # a mixed batch scores each row as its own task would alone, with every task in one pass
        every_task = model(inputs_embeds=inputs, attention_mask=mask).logits  # (B, T, L_max)
        torch.testing.assert_close(fused, every_task[torch.arange(batch), ids])


# ------------------------------------------------------------------ loading bad files changes nothing


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def saved(tmp_path):
    """A base model (one task) in `model/`, and the adapter of a second task trained on that base in `topic/`."""
    model = make_model()
    model.add_task("sentiment", labels=["pos", "neg"])
    model.save_pretrained(tmp_path / "model")
    model.add_task("topic", labels=["finance", "science"])
    model.save_task("topic", tmp_path / "topic")
    return tmp_path


def test_truncated_adapter_and_model_files_fail_clearly_and_leave_every_other_file_unchanged(saved):
    truncate(saved / "topic" / "adapter_model.safetensors")
    truncate(saved / "model" / "model.safetensors")
    before = snapshot(saved)
    target = make_model()
    target.add_task("sentiment", labels=["pos", "neg"])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors could not be read .*the adapter file is corrupt"):
        target.load_task(saved / "topic")
    assert target.tasks == ["sentiment"]
    with pytest.raises(ValueError, match=r"could not be read \(.*\): the safetensors file is truncated or corrupted"):
        DTGMAModel.from_pretrained(saved / "model")
    assert snapshot(saved) == before  # same files, same bytes: the truncated ones are not rewritten either


def edit_adapter_config(folder: Path, edit) -> None:
    path = folder / "topic" / "adapter_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def weights_of_another_save(folder: Path) -> None:
    """The topic adapter's weights replaced by another task's of the same shapes, as a `save_task` interrupted
    between its two files leaves them (new weights, the earlier save's metadata)."""
    model = make_model()
    model.add_task("sentiment", labels=["pos", "neg"])
    model.add_task("spam", labels=["ham", "spam"])
    model.save_task("spam", folder / "spam")
    shutil.move(folder / "spam" / "adapter_model.safetensors", folder / "topic" / "adapter_model.safetensors")
    shutil.rmtree(folder / "spam")


def poison_adapter_weights(folder: Path) -> None:
    path = folder / "topic" / "adapter_model.safetensors"
    with safe_open(path, "pt") as weights:
        metadata, tensors = weights.metadata(), {key: weights.get_tensor(key) for key in weights.keys()}
    next(iter(tensors.values()))[0] = float("nan")
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize(
    "damage, load, message",
    [
        pytest.param(
            lambda folder: edit_adapter_config(folder, lambda config: {k: v for k, v in config.items() if k != "task"}),
            lambda folder: make_model().load_task(folder / "topic"),
            r"lacks a task name and labels \(\['task'\]\): the adapter config is damaged", id="adapter-config-no-task",
        ),
        pytest.param(
            lambda folder: edit_adapter_config(folder, lambda config: [config]),
            lambda folder: make_model().load_task(folder / "topic"), "holds a JSON list, not an adapter config",
            id="adapter-config-a-list",
        ),
        pytest.param(
            weights_of_another_save, lambda folder: make_model().load_task(folder / "topic"),
            "come from two different saves", id="adapter-weights-of-another-save",
        ),
        pytest.param(
            poison_adapter_weights, lambda folder: make_model().load_task(folder / "topic"),
            "holds NaN or inf values: the adapter is damaged", id="adapter-weights-nan",
        ),
        pytest.param(
            lambda folder: None, lambda folder: make_model(seed=1).load_task(folder / "topic"),
            "saved from a model of another shape|other shared weights", id="adapter-from-another-base",
        ),
        pytest.param(
            lambda folder: (folder / "model" / "config.json").write_text(
                json.dumps({**json.loads((folder / "model" / "config.json").read_text()), "format_version": 3})
            ),
            lambda folder: DTGMAModel.from_pretrained(folder / "model"), "saved by a newer hf_dtgma",
            id="config-from-a-newer-version",
        ),
        pytest.param(
            lambda folder: (folder / "topic" / "adapter_config.json").write_text('{"library": "hf_dtg'),
            lambda folder: make_model().load_task(folder / "topic"), "is not valid JSON", id="truncated-adapter-config",
        ),
    ],
)
def test_incompatible_files_fail_clearly_and_change_nothing_on_disk(saved, damage, load, message):
    damage(saved)
    before = snapshot(saved)
    with pytest.raises(ValueError, match=message):
        load(saved)
    assert snapshot(saved) == before


@pytest.fixture(scope="module")
def one_task_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint") / "run"
    ContinualTrainer(new_model(), training_config(folder)).fit(synthetic_tasks(num_tasks=1, sizes=(8, 4, 4)))
    return folder


@pytest.mark.parametrize(
    "damaged, message",
    [
        pytest.param("checkpoint-1/model/model.safetensors", "Cannot resume from .*checkpoint-1: The weights of",
                     id="model"),
        pytest.param("checkpoint-1/trainer_state.json", r"trainer_state\.json is missing or not valid JSON",
                     id="trainer-state"),
        pytest.param("latest_checkpoint.json", r"latest_checkpoint\.json is missing or not valid JSON", id="pointer"),
    ],
)
def test_resuming_from_a_truncated_checkpoint_fails_clearly_and_changes_nothing(
    one_task_checkpoint, tmp_path, damaged, message
):
    folder = tmp_path / "run"
    shutil.copytree(one_task_checkpoint, folder)
    truncate(folder / damaged)
    before = snapshot(folder)
    with pytest.raises(ValueError, match=f"{message}.*the checkpoint is damaged"):
        trainer = ContinualTrainer(new_model(), training_config(folder))
        trainer.fit(synthetic_tasks(num_tasks=2, sizes=(8, 4, 4)), resume=True)
    assert snapshot(folder) == before


def test_an_overwrite_refused_for_a_model_with_tasks_leaves_the_previous_run_in_place(one_task_checkpoint, tmp_path):
    """`overwrite_output_dir` deletes the previous run only once the new one is sure to start: a model that already
    has tasks is refused first (it used to be refused after the deletion)."""
    folder = tmp_path / "run"
    shutil.copytree(one_task_checkpoint, folder)
    before = snapshot(folder)
    model = new_model()
    model.add_task("old", labels=["no", "yes"])
    config = dataclasses.replace(training_config(folder), overwrite_output_dir=True)
    with pytest.raises(ValueError, match=r"The model already has tasks \['old'\]"):
        ContinualTrainer(model, config).fit(synthetic_tasks(num_tasks=1, sizes=(8, 4, 4)))
    assert snapshot(folder) == before


# ------------------------------------------------------------------------------- atomic writes


def test_a_failed_rename_leaves_no_temporary_file(tmp_path):
    (tmp_path / "adapter_config.json").mkdir()  # what the file would replace is a folder: the rename fails
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "adapter_config.json") as tmp:
            Path(tmp).write_text("{}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter_config.json"]


def write_half_then_crash(original):
    def save_file(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        truncate(Path(filename))
        raise OSError("disk full")

    return save_file


def test_a_crash_mid_save_leaves_the_previous_files_whole(saved, monkeypatch):
    import transformers.modeling_utils

    import hf_dtgma.modeling_dtgma

    before = snapshot(saved)
    model = DTGMAModel.from_pretrained(saved / "model")
    model.add_task("topic", labels=["finance", "science", "sports"])
    for module, name in ((transformers.modeling_utils, "safe_save_file"), (hf_dtgma.modeling_dtgma, "save_file")):
        monkeypatch.setattr(module, name, write_half_then_crash(getattr(module, name)))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved / "model")
    with pytest.raises(OSError, match="disk full"):
        model.save_task("topic", saved / "topic")
    assert snapshot(saved) == before  # no half file under a real name, and no temporary file left behind
    assert sorted(path.name for path in saved.iterdir()) == ["model", "topic"]


# ------------------------------------------------------------------------------- training guards


def test_a_nan_loss_stops_the_task_and_leaves_the_last_checkpoint_untouched(tmp_path, monkeypatch):
    folder, snapshots, calls = tmp_path / "run", [], []
    original = DTGMAStrategy.training_loss

    def nan_at_the_third_step_of_task_2(self, model, batch, index, progress):
        loss = original(self, model, batch, index, progress)
        if index == 1:
            calls.append(index)
            if len(calls) == 1:
                snapshots.append(snapshot(folder))  # checkpoint-1, as task 1 left it
            if len(calls) == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(DTGMAStrategy, "training_loss", nan_at_the_third_step_of_task_2)
    trainer = ContinualTrainer(new_model(), training_config(folder))
    message = r"Training diverged on task 'task1' \(task 2 of 3\), epoch 1, step 3: "
    message += r"the training loss became NaN or inf\. "
    message += r"To fix: lower the learning rate \(--lr, now 0\.003\)\. Nothing of this task was saved; the last good "
    message += r"checkpoint, .*checkpoint-1, is untouched"
    with pytest.raises(TrainingDivergedError, match=message):
        trainer.fit(synthetic_tasks())
    assert len(calls) == 4  # stopped at the end of the epoch the NaN came in (4 steps: 64 examples, batches of 16)
    assert snapshot(folder) == snapshots[0] and "checkpoint-1/model/model.safetensors" in snapshots[0]


@pytest.mark.parametrize(
    "target, error, message",
    [
        pytest.param("training_loss", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                     r"Out of memory while training task 'task0': lower --batch-size \(now 16\), or --max-length",
                     id="training"),
        pytest.param("logits", RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 B"),
                     r"Out of memory while evaluating task 'task0''s validation data: lower the evaluation batch size "
                     r"\(--eval-batch-size, now 16\)", id="evaluation"),
    ],
)
def test_out_of_memory_says_which_setting_to_lower(tmp_path, monkeypatch, target, error, message):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(DTGMAStrategy, target, out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=message) as raised:
        ContinualTrainer(new_model(), training_config(tmp_path)).fit(synthetic_tasks(num_tasks=1))
    assert raised.value.__cause__ is error


def test_out_of_memory_in_feature_extraction_names_its_settings(tmp_path):
    backbone = FakeBackbone(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError, match=r"--feature-batch-size, now 2\) or --max-length \(8\)"):
        cache_features(Dataset.from_dict({"text": ["a", "b", "c"]}), backbone, batch_size=2, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="^boom$"):  # any other error passes through as it was
        with explain_out_of_memory("testing", "nothing"):
            raise RuntimeError("boom")


# ---------------------------------------------------------------------------------------- no pickle


def test_no_pickle_loading_of_weights_anywhere_in_the_code():
    sources = [*(ROOT / "hf_dtgma").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_a_bin_only_checkpoint_is_refused(saved, tmp_path):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    shutil.copy(saved / "model" / "config.json", folder / "config.json")
    torch.save(DTGMAModel.from_pretrained(saved / "model").state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        DTGMAModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="safetensors weights only"):
        DTGMAModel.from_pretrained(folder, use_safetensors=False)


def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    ran = tmp_path / "code_ran"
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return Path.touch, (ran,)

    (folder / "train").write_bytes(pickle.dumps({b"data": Payload()}))
    for name in ("test", "meta"):
        (folder / name).write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match=r"pathlib\.Path\.touch is not allowed .*no code runs"):
        load_split_cifar100(tmp_path)
    assert not ran.exists()


# ------------------------------------------------------------------------- SIGKILL mid-task, then resume

DRIVER = """
import runpy, sys, time
from pathlib import Path

marker, stop_at, script = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.argv = sys.argv[3:]


def pause():
    marker.write_text(stop_at)
    time.sleep(600)  # until the test kills this process


if stop_at == "mid-task-2":  # the 5th training batch of task 2: its 2nd epoch, mid-epoch
    from hf_dtgma.strategies.dtgma import DTGMAStrategy

    original, calls = DTGMAStrategy.training_loss, []

    def training_loss(self, model, batch, index, progress):
        if index == 1:
            calls.append(index)
            if len(calls) == 5:
                pause()
        return original(self, model, batch, index, progress)

    DTGMAStrategy.training_loss = training_loss
else:  # "mid-write": half of the next checkpoint's weights are on disk
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.safe_save_file

    def save_file(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
        pause()

    modeling_utils.safe_save_file = save_file
runpy.run_path(script, run_name="__main__")
"""


def assert_only_complete_files(output_dir: Path) -> None:
    """Every file under a real (not hidden) name is complete: the pointer and states parse, the models load."""

    def hidden(path: Path) -> bool:
        return any(part.startswith(".") for part in path.relative_to(output_dir).parts)

    real = [path for path in output_dir.rglob("*") if not hidden(path)]
    assert real and not [path for path in real if path.name.endswith(".tmp")]
    for path in real:
        if path.suffix == ".json":
            json.loads(path.read_text())
        if path.name == "model.safetensors":
            DTGMAModel.from_pretrained(path.parent)


def test_a_run_killed_in_the_middle_of_task_2_resumes_to_the_uninterrupted_results(tmp_path):
    backbone, tokenizer = tiny_qwen()
    tokenizer.pad_token = "<pad>"
    backbone.save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    write_csv(tmp_path / "domains.csv")
    script = str(ROOT / "scripts" / "text_domains.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def flags(output: str, *extra: str) -> list[str]:
        return [
            "--benchmark", "custom", "--data-files", str(tmp_path / "domains.csv"), "--text-column", "sentence",
            "--label-column", "target", "--task-column", "domain", "--backbone", str(tmp_path / "backbone"),
            "--layer", "-1", "--hidden-size", "16", "--num-heads", "2", "--epochs", "3", "--patience", "3", "--cpu",
            "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / output), *extra,
        ]

    def run_to_the_end(*args: str) -> None:
        command = [sys.executable, script, *args]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    def run_and_kill(stop_at: str, *args: str) -> None:
        marker = tmp_path / f"{stop_at}.marker"
        (tmp_path / "driver.py").write_text(DRIVER)
        with open(tmp_path / f"{stop_at}.log", "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(tmp_path / "driver.py"), str(marker), stop_at, script, *args],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert process.poll() is None, (tmp_path / f"{stop_at}.log").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            assert process.wait() == -signal.SIGKILL

    run_to_the_end(*flags("reference"))
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    out = tmp_path / "interrupted"

    run_and_kill("mid-task-2", *flags("interrupted"))
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-1", "latest_checkpoint.json"]
    assert_only_complete_files(out)
    task_1 = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert task_1["finished_tasks"] == ["news"]

    run_and_kill("mid-write", *flags("interrupted", "--resume"))  # task 2 again, killed while checkpoint-2 is written
    assert_only_complete_files(out)
    assert json.loads((out / "latest_checkpoint.json").read_text()) == {"checkpoint": "checkpoint-1"}
    half_written = [path for path in out.rglob("model.safetensors") if path.stat().st_size == 1000]
    assert len(half_written) == 1 and half_written[0].relative_to(out).parts[0].startswith(".checkpoint-2.")

    run_to_the_end(*flags("interrupted", "--resume"))
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["task_il"] == reference["task_il"]
    assert resumed["validation_accuracy"] == reference["validation_accuracy"]
    assert resumed["seconds"]["news"] == task_1["seconds"]["news"]  # task 1 was not trained again
    assert not [path for path in out.rglob(".*")]  # the killed writer's leftovers are gone
    assert_only_complete_files(out)
    final_weights = [(folder / "model" / "model.safetensors").read_bytes() for folder in (tmp_path / "reference", out)]
    assert final_weights[0] == final_weights[1]  # the same final model, bit for bit
