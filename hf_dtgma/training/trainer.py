"""Continual training with Accelerate, one task after another: DTG-MA (a `DTGMAModel`) or any `ContinualStrategy`.

For each task, in order: the strategy's `begin_task` (DTG-MA: `add_task`), train what may train (DTG-MA: the new
task's parameters, and the shared ones only when the config says so), early-stop on the task's validation split,
`end_task` (DTG-MA: `freeze_task`), evaluate every task seen so far on its test split (one row of the accuracy
matrix), checkpoint (DTG-MA). A run is repeatable: task t's initialisation, shuffling and
dropout draw from `seed + t`, so `--resume` after task t continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..batches import batch_loader
from ..files import write_json_atomic
from ..modeling_dtgma import DTGMAModel
from ..strategies.base import ContinualStrategy, model_inputs
from ..strategies.dtgma import DTGMAStrategy
from .metrics import summarize

CHECKPOINT_POINTER = "latest_checkpoint.json"
STATE_NAME = "trainer_state.json"


@dataclass
class ContinualTask:
    """One task of a benchmark: its name, label names and splits with a `label` column and the inputs the trainer
    reads: `features` (cached backbone token features, from a `text` column) or `pixel_values` (images). `notes` says
    where the splits came from when a loader made them (e.g. "validation: 10% of train, seed 0"); results.json
    records it. `train_transform`, if given, maps each training batch `{"pixel_values", "labels"}` to an augmented
    one (training only; validation and test batches are never transformed)."""

    name: str
    labels: list[str]
    train: Dataset
    validation: Dataset
    test: Dataset
    notes: str = ""
    train_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


@dataclass
class ContinualTrainingConfig:
    """How each task is trained.

    Args:
        output_dir: checkpoints (and, from the scripts, results) go here.
        epochs: most epochs per task; early stopping usually ends sooner.
        batch_size: examples per optimizer step, over all processes together.
        eval_batch_size: examples per evaluation batch, over all processes together.
        learning_rate / weight_decay: AdamW settings.
        warmup_ratio: fraction of a task's steps with a linear warm-up, then linear decay to 0.
        max_grad_norm: gradient clipping.
        patience: stop a task after this many epochs without a better validation accuracy; the best epoch's
            parameters are kept.
        seed: task t draws its initialisation, shuffling and dropout from `seed + t`.
        mixed_precision: "no", "fp16" or "bf16" (through Accelerate).
        log_with: an Accelerate tracker ("tensorboard", ...); None (default) logs nothing.
        cpu: force the CPU even where a GPU is present.
        evaluation_split: the split each row of the accuracy matrix is measured on: "test" (default), or
            "validation" to compare settings without ever reading a test split.
    """

    output_dir: str
    epochs: int = 40
    batch_size: int = 16
    eval_batch_size: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    patience: int = 10
    seed: int = 0
    mixed_precision: str = "no"
    log_with: str | None = None
    cpu: bool = False
    evaluation_split: str = "test"

    def __post_init__(self):
        if self.evaluation_split not in ("test", "validation"):
            raise ValueError(f"`evaluation_split` must be 'test' or 'validation', got {self.evaluation_split!r}.")


def make_accelerator(
    cpu: bool = False, mixed_precision: str | None = None, log_with: str | None = None, project_dir: str | None = None
) -> Accelerator:
    """The `Accelerator` a continual run uses: `split_batches=True`, so the batch size is global and any number of
    processes sees the same batches as one."""
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


@dataclass
class _RunState:
    """What a checkpoint records besides the model: enough to resume after the last finished task."""

    finished_tasks: list[str] = field(default_factory=list)
    accuracy_matrix: list[list[float]] = field(default_factory=list)
    validation_accuracy: dict[str, float] = field(default_factory=dict)
    epochs_trained: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)


class ContinualTrainer:
    """Trains a `DTGMAModel` (or any `ContinualStrategy`, see `hf_dtgma.strategies`) on a sequence of `ContinualTask`s.

    Example:

    ```python
    >>> trainer = ContinualTrainer(model, ContinualTrainingConfig(output_dir="runs/demo", epochs=10))
    >>> results = trainer.fit(tasks)            # tasks: list[ContinualTask] with cached features
    >>> results["task_il"]["average_accuracy"]
    >>> ewc = ContinualTrainer(build_strategy("ewc", model.config), ContinualTrainingConfig(output_dir="runs/ewc"))
    ```
    """

    def __init__(
        self,
        model: DTGMAModel | ContinualStrategy,
        config: ContinualTrainingConfig,
        accelerator: Accelerator | None = None,
    ):
        self.strategy = model if isinstance(model, ContinualStrategy) else DTGMAStrategy(model)
        self.config = config
        self.accelerator = accelerator or make_accelerator(
            cpu=config.cpu, mixed_precision=config.mixed_precision, log_with=config.log_with, project_dir=config.output_dir
        )
        if self.accelerator.num_processes > 1 and not self.strategy.supports_distributed:
            raise ValueError(
                f"The {self.strategy.name!r} strategy runs in one process (its state is not synchronised across "
                f"processes); launch it without --num_processes or use dtgma."
            )
        self.output_dir = Path(config.output_dir)
        self._tasks: list[ContinualTask] = []

    @property
    def model(self) -> nn.Module:
        """The strategy's model (a `DTGMAModel` for DTG-MA)."""
        return self.strategy.module

    # ------------------------------------------------------------------ public

    def fit(self, tasks: list[ContinualTask], resume: bool = False) -> dict:
        """Train `tasks` in order and return the results (metrics, validation accuracy, timings, parameters).

        With `resume=True`, continue after the last finished task of the checkpoint in `output_dir`.
        """
        if not tasks:
            raise ValueError("`tasks` is empty: give at least one ContinualTask.")
        if resume and not self.strategy.supports_checkpoints:
            raise ValueError(f"The {self.strategy.name!r} strategy writes no checkpoints, so it cannot resume.")
        self._tasks = tasks
        state = self._resume(tasks) if resume else _RunState()
        if not resume and isinstance(self.model, DTGMAModel) and self.model.tasks:
            raise ValueError(f"The model already has tasks {self.model.tasks}; start from a model without tasks.")
        accelerator = self.accelerator
        if self.config.log_with:
            accelerator.init_trackers("hf_dtgma", config=asdict(self.config))
        progress = tqdm(
            total=len(tasks), initial=len(state.finished_tasks), desc="tasks", disable=not accelerator.is_local_main_process
        )
        for index in range(len(state.finished_tasks), len(tasks)):
            task = tasks[index]
            progress.set_postfix_str(task.name)
            started = time.perf_counter()
            best_accuracy, epochs = self._train_task(index, task)
            trained = time.perf_counter()
            row = [self._accuracy(j, getattr(tasks[j], self.config.evaluation_split)) for j in range(index + 1)]
            state.finished_tasks.append(task.name)
            state.accuracy_matrix.append(row)
            state.validation_accuracy[task.name] = best_accuracy
            state.epochs_trained[task.name] = epochs
            state.seconds[task.name] = {"train": trained - started, "evaluate": time.perf_counter() - trained}
            if self.strategy.supports_checkpoints:
                self._save_checkpoint(state)
            if self.config.log_with:
                accelerator.log({"average_accuracy": sum(row) / len(row)}, step=index)
            progress.update()
        progress.close()
        if self.config.log_with:
            accelerator.end_training()
        return self._results(state, tasks)

    # ---------------------------------------------------------------- training

    def _train_task(self, index: int, task: ContinualTask) -> tuple[float, int]:
        """Begin, train (best-validation parameters kept) and end task `index`. Returns (validation accuracy of the
        finished task, epochs trained, retraining included)."""
        set_seed(self.config.seed + index)
        self.strategy.begin_task(index, self._tasks)
        accuracy, epochs = self._train_epochs(index, self.config.epochs)
        retrained: list[tuple[float, int]] = []

        def retrain(num_epochs: int) -> float:
            retrained.append(self._train_epochs(index, num_epochs))
            return retrained[-1][0]

        self.strategy.end_task(index, self._tasks, retrain)
        if retrained:
            accuracy, epochs = retrained[-1][0], epochs + sum(count for _, count in retrained)
        return accuracy, epochs

    def _train_epochs(self, index: int, num_epochs: int) -> tuple[float, int]:
        """Train what the strategy leaves trainable for up to `num_epochs` epochs, early-stopped on validation; keep
        the best epoch's parameters. Returns (best validation accuracy, epochs run)."""
        accelerator, config, strategy = self.accelerator, self.config, self.strategy
        task = self._tasks[index]
        trainable_by_name = {name: param for name, param in strategy.module.named_parameters() if param.requires_grad}
        trainable = list(trainable_by_name.values())
        optimizer = torch.optim.AdamW(strategy.parameter_groups(config.weight_decay), lr=config.learning_rate)
        generator = torch.Generator().manual_seed(config.seed + index)
        train_data = strategy.train_dataset(index, self._tasks)
        train_loader = batch_loader(
            train_data, config.batch_size, shuffle=True, generator=generator, transform=task.train_transform
        )
        steps = num_epochs * math.ceil(len(train_data) / config.batch_size)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
        wrapped, optimizer, train_loader, scheduler = accelerator.prepare(strategy.module, optimizer, train_loader, scheduler)

        best, best_state, stale, epochs = (-1.0, float("-inf")), None, 0, 0
        epoch_bar = tqdm(range(num_epochs), desc=task.name, leave=False, disable=not accelerator.is_local_main_process)
        for epoch in epoch_bar:
            wrapped.train()
            total_loss, batches, last = 0.0, 0, max(len(train_loader) - 1, 1)
            for batch in tqdm(train_loader, desc=f"epoch {epoch + 1}", leave=False, disable=not accelerator.is_local_main_process):
                loss = strategy.training_loss(wrapped, batch, index, progress=batches / last)
                accelerator.backward(loss)
                strategy.before_optimizer_step()
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                strategy.after_optimizer_step()
                total_loss, batches = total_loss + loss.detach(), batches + 1
            epochs = epoch + 1
            accuracy, val_loss = self._validate(index)
            train_loss = (total_loss / max(batches, 1)).item()
            epoch_bar.set_postfix(loss=f"{train_loss:.4f}", val_acc=f"{accuracy:.4f}")
            if config.log_with:
                accelerator.log(
                    {f"{task.name}/train_loss": train_loss, f"{task.name}/val_accuracy": accuracy, f"{task.name}/val_loss": val_loss},
                    step=epoch,
                )
            # Best = highest validation accuracy; on a small validation split many epochs tie, and the lower
            # validation loss breaks the tie.
            if (accuracy, -val_loss) > best:
                best, stale = (accuracy, -val_loss), 0
                best_state = {name: param.detach().clone() for name, param in trainable_by_name.items()}
            else:
                stale += 1
                if stale >= config.patience:
                    break
        epoch_bar.close()
        with torch.no_grad():  # the best epoch's parameters
            for name, param in trainable_by_name.items():
                param.copy_(best_state[name])
        # Drop the DDP wrapper, the mixed-precision forward and the optimizer: the next task prepares its own.
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
        accelerator.free_memory()
        return best[0], epochs

    def _validate(self, index: int) -> tuple[float, float]:
        """Mean validation accuracy and loss over the tasks the strategy early-stops task `index` on."""
        scores = [self._evaluate(j, self._tasks[j].validation) for j in self.strategy.validation_tasks(index)]
        return sum(a for a, _ in scores) / len(scores), sum(loss for _, loss in scores) / len(scores)

    @torch.no_grad()
    def _evaluate(self, task_index: int, dataset: Dataset) -> tuple[float, float]:
        """Task-incremental accuracy and mean cross-entropy of task `task_index` on `dataset`, identical for any
        number of processes (`gather_for_metrics` drops the samples Accelerate repeats to even out the shards)."""
        accelerator = self.accelerator
        loader = accelerator.prepare_data_loader(batch_loader(dataset, self.config.eval_batch_size))
        self.model.eval()
        correct, loss, total = 0, 0.0, 0
        for batch in loader:
            with accelerator.autocast():
                logits = self.strategy.logits(model_inputs(batch), task_index)
            losses = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")
            predictions, labels, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
            correct += (predictions == labels).sum().item()
            loss += losses.sum().item()
            total += labels.numel()
        return correct / total, loss / total

    def _accuracy(self, task_index: int, dataset: Dataset) -> float:
        return self._evaluate(task_index, dataset)[0]

    # ------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, state: _RunState) -> None:
        """Write `checkpoint-{k}` (model + state) under a temporary name, rename it, then move the pointer to it."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            name = f"checkpoint-{len(state.finished_tasks)}"
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.output_dir))
            self.model.save_pretrained(staging / "model")
            (staging / STATE_NAME).write_text(json.dumps(asdict(state), indent=2) + "\n")
            final = self.output_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            previous = self._latest_checkpoint()
            write_json_atomic(self.output_dir / CHECKPOINT_POINTER, {"checkpoint": name})
            if previous is not None and previous != final:
                shutil.rmtree(previous, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _latest_checkpoint(self) -> Path | None:
        pointer = self.output_dir / CHECKPOINT_POINTER
        if not pointer.is_file():
            return None
        return self.output_dir / json.loads(pointer.read_text())["checkpoint"]

    def _resume(self, tasks: list[ContinualTask]) -> _RunState:
        checkpoint = self._latest_checkpoint()
        if checkpoint is None:
            return _RunState()
        state = _RunState(**json.loads((checkpoint / STATE_NAME).read_text()))
        expected = [task.name for task in tasks[: len(state.finished_tasks)]]
        if state.finished_tasks != expected:
            raise ValueError(
                f"The checkpoint in {self.output_dir} finished tasks {state.finished_tasks}, but this run's task order "
                f"starts with {expected}: resume with the same benchmark and order, or use a new --output-dir."
            )
        self.strategy = DTGMAStrategy(type(self.model).from_pretrained(checkpoint / "model").to(self.accelerator.device))
        return state

    # ------------------------------------------------------------------ results

    def _results(self, state: _RunState, tasks: list[ContinualTask]) -> dict:
        names = [task.name for task in tasks]
        return {
            "task_il": summarize(state.accuracy_matrix, names),
            "validation_accuracy": state.validation_accuracy,
            "epochs_trained": state.epochs_trained,
            "seconds": state.seconds,
            "parameters": self.strategy.parameter_counts(names),
            "num_processes": self.accelerator.num_processes,
            "task_notes": {task.name: task.notes for task in tasks if task.notes},
        }

