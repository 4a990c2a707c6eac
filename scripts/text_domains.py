"""Continual learning on text domains with DTG-MA: the project's main job.

    accelerate launch scripts/text_domains.py             # or: python scripts/text_domains.py

Trains one DTG-MA model on the tasks of a text benchmark, one after another, on frozen backbone features, and writes
to --output-dir: results.json, results.md, accuracy_matrix.png, the final model (model/) and one adapter per task
(adapters/<task>/). Backbone features are computed once and cached (--cache-dir); a second run reads them from disk.

The default backbone is Qwen/Qwen2.5-1.5B (the DTG-MA paper's setting). If it is neither cached nor reachable, the
run falls back to the embedded all-MiniLM-L6-v2 encoder with a warning, and results.json records which was used.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator

from hf_dtgma import DTGMAConfig, DTGMAModel
from hf_dtgma.backbones import DEFAULT_TEXT_BACKBONE, DeferredTextBackbone, open_text_backbone
from hf_dtgma.data import CL_BENCHMARK_ORDERS, load_cl_benchmark, load_clinc150, load_custom, load_text_domains
from hf_dtgma.features import cache_task_features
from hf_dtgma.training import ContinualTask, ContinualTrainer, ContinualTrainingConfig, make_accelerator, write_run_outputs

BENCHMARKS = ("text_domains", "clinc150", "cl_benchmark", "custom")


def load_benchmark(args: argparse.Namespace) -> list[ContinualTask]:
    """The tasks of `--benchmark`, in order, from the Hub or from `--data-dir` / `--data-files`."""
    if args.benchmark != "custom" and (args.data_files or args.dataset):
        raise ValueError("--data-files and --dataset belong to --benchmark custom; other benchmarks read --data-dir.")
    if args.benchmark == "text_domains":
        if args.data_dir is not None:
            raise ValueError("text_domains is built into the package and reads no --data-dir; drop the flag.")
        return load_text_domains(num_tasks=args.num_tasks)
    if args.benchmark == "clinc150":
        return load_clinc150(args.data_dir, num_tasks=args.num_tasks)
    if args.benchmark == "cl_benchmark":
        return load_cl_benchmark(
            args.data_dir, order=args.order, train_per_task=args.train_per_task, test_per_task=args.test_per_task,
            seed=args.split_seed, num_tasks=args.num_tasks,
        )
    if not (args.data_files or args.dataset):
        raise ValueError("--benchmark custom needs --data-files FILE [FILE ...] (or a folder) or --dataset <hub id>.")
    return load_custom(
        data_files=args.data_files, hub_id=args.dataset, text_column=args.text_column, label_column=args.label_column,
        task_column=args.task_column, seed=args.split_seed, num_tasks=args.num_tasks,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--benchmark", choices=BENCHMARKS, default="text_domains")
    data.add_argument(
        "--data-dir", default=None,
        help="local copy of clinc150 (data_full.json) or cl_benchmark (agnews/, amazon/, ...); default: the Hub",
    )
    data.add_argument("--num-tasks", type=int, default=None, help="train only the first N tasks")
    data.add_argument("--order", choices=sorted(CL_BENCHMARK_ORDERS), default="1", help="cl_benchmark task order")
    data.add_argument("--train-per-task", type=int, default=None, help="cl_benchmark: subsample each training set")
    data.add_argument("--test-per-task", type=int, default=None, help="cl_benchmark: subsample each test set")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the splits a loader carves (not the run's)")
    data.add_argument("--data-files", nargs="+", default=None, help="custom: CSV/TSV/JSON/JSONL/Parquet files or a folder")
    data.add_argument("--dataset", default=None, help="custom: a Hub data set id instead of --data-files")
    data.add_argument("--text-column", default="text", help="custom: column with the text")
    data.add_argument("--label-column", default="label", help="custom: column with the label")
    data.add_argument(
        "--task-column", default="task", help="custom: column with the task name ('none': one file per task)"
    )
    backbone = parser.add_argument_group("backbone")
    backbone.add_argument("--backbone", default=None, help=f"Hub id or local path (default: {DEFAULT_TEXT_BACKBONE})")
    backbone.add_argument("--backbone-revision", default=None)
    backbone.add_argument(
        "--layer", type=int, default=-3,
        help="hidden state to read: -1 last layer, 0 embeddings (default -3: best on validation, see README)",
    )
    backbone.add_argument("--max-length", type=int, default=128, help="tokens per text")
    backbone.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/hf_dtgma/features)")
    model = parser.add_argument_group("model")
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--num-heads", type=int, default=4)
    model.add_argument("--task-param-mode", choices=["lowrank", "full"], default="lowrank")
    model.add_argument("--task-rank", type=int, default=8)
    model.add_argument("--num-task-tokens", type=int, default=1)
    model.add_argument("--shared-training", choices=["never", "first_task"], default="never")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=40, help="most epochs per task (early stopping ends sooner)")
    training.add_argument("--patience", type=int, default=10, help="epochs without a better validation accuracy")
    training.add_argument("--batch-size", type=int, default=16, help="global batch size (all processes together)")
    training.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (chosen on validation)")
    training.add_argument("--weight-decay", type=float, default=0.01)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    training.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU (also: CPU processes under accelerate launch --multi_gpu)")
    training.add_argument("--log-with", default=None, help="Accelerate tracker, e.g. tensorboard (off by default)")
    training.add_argument("--output-dir", default=None, help="default: outputs/<benchmark> (cl_benchmark: _order<N>)")
    training.add_argument("--resume", action="store_true", help="continue after the last finished task in --output-dir")
    return parser


def complete_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other flags."""
    if args.task_column is not None and args.task_column.lower() == "none":
        args.task_column = None
    if args.output_dir is None:
        suffix = f"_order{args.order}" if args.benchmark == "cl_benchmark" else ""
        args.output_dir = f"outputs/{args.benchmark}{suffix}"
    return args


def make_run_accelerator(args: argparse.Namespace) -> Accelerator:
    return make_accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, log_with=args.log_with, project_dir=args.output_dir
    )


def prepare(args: argparse.Namespace, accelerator: Accelerator) -> tuple[DeferredTextBackbone, str | None, list[ContinualTask]]:
    """The frozen backbone (the embedded encoder, with a warning, when the default cannot be had), its fallback
    reason, and the benchmark's tasks with cached features (computed once, by the main process first)."""
    backbone, fallback_reason = open_text_backbone(
        args.backbone, revision=args.backbone_revision, layer=args.layer, max_length=args.max_length,
        dtype=torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32, device=accelerator.device,
    )
    tasks = load_benchmark(args)
    with accelerator.main_process_first():
        cache_task_features(tasks, backbone, cache_dir=args.cache_dir)
    return backbone, fallback_reason, tasks


def train(
    args: argparse.Namespace,
    backbone: DeferredTextBackbone,
    tasks: list[ContinualTask],
    accelerator: Accelerator,
    evaluation_split: str = "test",
) -> tuple[ContinualTrainer, dict]:
    """Train a new DTG-MA model on `tasks` in order; returns the trainer (its `.model`) and the results."""
    config = DTGMAConfig(
        input_dim=backbone.hidden_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads, task_param_mode=args.task_param_mode, task_rank=args.task_rank,
        num_task_tokens=args.num_task_tokens, shared_training=args.shared_training, backbone=backbone.identity,
    )
    torch.manual_seed(args.seed)  # the shared weights' initialisation
    trainer = ContinualTrainer(
        DTGMAModel(config),
        ContinualTrainingConfig(
            output_dir=args.output_dir, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
            weight_decay=args.weight_decay, patience=args.patience, seed=args.seed, log_with=args.log_with,
            evaluation_split=evaluation_split,
        ),
        accelerator=accelerator,
    )
    return trainer, trainer.fit(tasks, resume=args.resume)


def main() -> None:
    args = complete_args(build_parser().parse_args())
    started = time.perf_counter()
    accelerator = make_run_accelerator(args)
    backbone, fallback_reason, tasks = prepare(args, accelerator)
    features_done = time.perf_counter()
    trainer, results = train(args, backbone, tasks, accelerator)

    if accelerator.is_main_process:
        finished = time.perf_counter()
        results.update(
            benchmark=args.benchmark,
            backbone={**backbone.identity, "fallback_reason": fallback_reason, "loaded_this_run": backbone.loaded},
            seed=args.seed,
            config=vars(args),
            seconds_features=features_done - started,
            seconds_total=finished - started,
        )
        write_run_outputs(trainer.model, results, args.output_dir)
        task_il = results["task_il"]
        print(
            f"{args.benchmark}: average accuracy {100 * task_il['average_accuracy']:.2f}%, average forgetting "
            f"{100 * task_il['average_forgetting']:.2f}, {results['seconds_total']:.0f} s -> {args.output_dir}"
        )


if __name__ == "__main__":
    main()
