"""What the benchmark scripts (`scripts/text_domains.py`, `scripts/vision_splits.py`) share: the model and training
flags, the Accelerator, one run of the continual trainer, and writing its outputs."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from ..configuration_dtgma import HEAD_INPUTS, ROUTERS, DTGMAConfig
from ..strategies import build_strategy
from .reporting import write_run_outputs
from .trainer import (
    OUTCOME_NEUTRAL_TRAINING,
    ContinualTask,
    ContinualTrainer,
    ContinualTrainingConfig,
    make_accelerator,
)


def at_least(bound: float, kind: type = int, exclusive: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a number of `kind` no smaller than `bound` (above it when `exclusive`), so that e.g.
    `--epochs 0` is refused before any work."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value < bound or (exclusive and value == bound):
            raise argparse.ArgumentTypeError(f"must be {'above' if exclusive else 'at least'} {bound}, got {text}")
        return value

    return parse


def complete_data_flags(
    args: argparse.Namespace, read_by: dict[str, tuple[str, ...]], defaults: dict[str, Any]
) -> None:
    """Refuse a data flag given to a `--benchmark` whose loader does not read it, then fill the ones left unset.

    Args:
        args: the parsed flags; the flags named in `read_by` default to None in the parser, so a value means given.
        read_by: flag attribute (`"max_shift"`) → the benchmarks that read it.
        defaults: the values of those left unset, filled whatever the benchmark (the recorded settings stay the same).
    Raises:
        ValueError: naming the flag, the benchmarks that read it, and the fix (drop it), instead of ignoring it.
    """
    for name, readers in read_by.items():
        if args.benchmark not in readers and getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{args.benchmark} does not read {flag} (only {', '.join(readers)} do): drop the flag.")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def add_model_arguments(parser: argparse.ArgumentParser, hidden_size: int = 256) -> argparse._ArgumentGroup:
    """The DTG-MA layer flags (`--hidden-size`, `--num-layers`, ...)."""
    model = parser.add_argument_group("model")
    model.add_argument("--hidden-size", type=int, default=hidden_size)
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--num-heads", type=int, default=4)
    model.add_argument("--task-param-mode", choices=["lowrank", "full"], default="lowrank")
    model.add_argument("--task-rank", type=int, default=8)
    model.add_argument("--num-task-tokens", type=int, default=1)
    model.add_argument("--shared-training", choices=["never", "first_task"], default="never")
    model.add_argument(
        "--head-input", choices=list(HEAD_INPUTS), default="task_tokens",
        help="what each task's head reads: its tokens' final state, or that plus the mean of the input tokens' states",
    )
    model.add_argument(
        "--router", choices=list(ROUTERS), default="mahalanobis",
        help="how the task is inferred when none is given (class-incremental evaluation, model.predict)",
    )
    return model


def add_training_arguments(
    parser: argparse.ArgumentParser, epochs: int = 40, patience: int = 10, batch_size: int = 16, lr: float = 3e-3
) -> argparse._ArgumentGroup:
    """The continual-training flags (`--epochs`, `--lr`, `--output-dir`, `--resume`, ...), with per-script defaults."""
    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs", type=at_least(1), default=epochs, help="most epochs per task (early stopping ends sooner)"
    )
    training.add_argument(
        "--patience", type=at_least(1), default=patience, help="epochs without a better validation accuracy"
    )
    training.add_argument(
        "--batch-size", type=at_least(1), default=batch_size, help="global batch size (all processes together)"
    )
    training.add_argument(
        "--eval-batch-size", type=at_least(1), default=256,
        help="evaluation batch size (changes memory use, not results)",
    )
    training.add_argument(
        "--lr", type=at_least(0.0, float, exclusive=True), default=lr,
        help="peak AdamW learning rate (chosen on validation)",
    )
    training.add_argument("--weight-decay", type=at_least(0.0, float), default=0.01)
    training.add_argument(
        "--label-smoothing", type=float, default=None,
        help="share of each training target spread over the task's other labels (default: the script's, else 0)",
    )
    training.add_argument("--seed", type=at_least(0), default=0)
    training.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    training.add_argument(
        "--cpu", action="store_true",
        help="run on the CPU even with a GPU (also: CPU processes under accelerate launch --multi_gpu)",
    )
    training.add_argument("--log-with", default=None, help="Accelerate tracker, e.g. tensorboard (off by default)")
    training.add_argument("--output-dir", default=None, help="default: outputs/<benchmark>")
    training.add_argument("--resume", action="store_true", help="continue after the last finished task in --output-dir")
    training.add_argument(
        "--overwrite-output-dir", action="store_true", help="start over in an --output-dir that holds another run"
    )
    training.add_argument(
        "--evaluate-on", choices=["test", "validation"], default="test",
        help="split of the accuracy matrix: 'validation' to compare settings without reading a test split",
    )
    return training


def model_config(args: argparse.Namespace, **fields: Any) -> DTGMAConfig:
    """A `DTGMAConfig` from the model flags plus `fields` (input width, backbone identity, image geometry)."""
    return DTGMAConfig(
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        task_param_mode=args.task_param_mode, task_rank=args.task_rank, num_task_tokens=args.num_task_tokens,
        shared_training=args.shared_training, head_input=args.head_input, router=args.router, **fields,
    )


def make_run_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's `Accelerator` (global batch size, `--cpu`, `--mixed-precision`, `--log-with`)."""
    return make_accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, log_with=args.log_with, project_dir=args.output_dir
    )


# Flags that change no result: a resumed run may change them, and compare.py reuses a finished run across them.
RUN_NEUTRAL_FLAGS = {*OUTCOME_NEUTRAL_TRAINING, "resume", "feature_batch_size", "cache_dir"}


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag of a run that may change its results (all but `RUN_NEUTRAL_FLAGS`), as it reads back from JSON.

    Example:
        >>> run_flags(argparse.Namespace(max_length=128, cache_dir="/tmp/cache", data_dir="data", resume=True))
        {'data_dir': 'data', 'max_length': 128}
    """
    flags = {name: value for name, value in sorted(vars(args).items()) if name not in RUN_NEUTRAL_FLAGS}
    return json.loads(json.dumps(flags, default=str))


def train_continually(
    args: argparse.Namespace,
    config: DTGMAConfig,
    tasks: list[ContinualTask],
    accelerator: Accelerator,
    evaluation_split: str | None = None,
    method: str = "dtgma",
    hyperparameters: dict[str, Any] | None = None,
) -> tuple[ContinualTrainer, dict]:
    """Build `method` (DTG-MA by default, or any registered strategy) on a model of `config`'s shape, its weights
    seeded by `--seed`, and train it on `tasks` in order, measuring the accuracy matrix on `evaluation_split`
    (default: `--evaluate-on`). Returns the trainer (its `.model`, `.strategy`) and the results."""
    torch.manual_seed(args.seed)  # the shared weights' initialisation
    trainer = ContinualTrainer(
        build_strategy(method, config, **(hyperparameters or {})),
        ContinualTrainingConfig(
            output_dir=args.output_dir, epochs=args.epochs, batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing or 0.0, patience=args.patience, seed=args.seed, log_with=args.log_with,
            evaluation_split=evaluation_split or args.evaluate_on, overwrite_output_dir=args.overwrite_output_dir,
            mixed_precision=accelerator.mixed_precision, cpu=args.cpu,
        ),
        accelerator=accelerator,
    )
    return trainer, trainer.fit(tasks, resume=args.resume, run_settings=run_flags(args))


def finish_run(
    trainer: ContinualTrainer,
    results: dict,
    args: argparse.Namespace,
    accelerator: Accelerator,
    started: float,
    **extra: Any,
) -> None:
    """Write results.json / results.md / accuracy_matrix.png, the model with its card and the adapters (main process
    only), and print the summary line. `extra` goes into results.json (backbone, phase timings, ...), as does the
    command line (the card's training command)."""
    if not accelerator.is_main_process:
        return
    command = shlex.join(["python", *sys.argv])
    results.update(benchmark=args.benchmark, seed=args.seed, config=vars(args), command=command, **extra)
    results["seconds_total"] = time.perf_counter() - started
    write_run_outputs(trainer.model, results, args.output_dir)
    task_il = results["task_il"]
    print(
        f"{args.benchmark}: average accuracy {100 * task_il['average_accuracy']:.2f}%, average forgetting "
        f"{100 * task_il['average_forgetting']:.2f}, {results['seconds_total']:.0f} s -> {args.output_dir}"
    )
