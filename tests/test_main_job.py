"""The main job end to end on a custom benchmark: a small CSV made here, a tiny local backbone, two tasks."""

import csv
import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import tiny_qwen

ROOT = Path(__file__).resolve().parents[1]
TOPICS = {
    "markets": ["the market rallied", "stocks fell after rates rose", "the market fell", "stocks rallied"],
    "science": ["a new comet was found", "the comet was found after", "a comet rose", "a new comet"],
}
SPORTS = {
    "win": ["team won final match", "the team won the final", "team won", "won the match"],
    "loss": ["the team fell", "team fell after the match", "the final match fell", "team fell"],
}


def write_csv(path: Path) -> None:
    """Two tasks in one file (a `domain` column), 24 rows per label, with word-order variations."""
    rng = random.Random(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "target", "domain"])
        for task, labels in (("news", TOPICS), ("sports", SPORTS)):
            for label, phrases in labels.items():
                for i in range(24):
                    words = rng.choice(phrases).split()
                    writer.writerow([" ".join(words + words[: i % 3]), label, task])


def test_custom_csv_runs_end_to_end(tmp_path):
    model, tokenizer = tiny_qwen()
    tokenizer.pad_token = "<pad>"  # in the vocabulary (a new token would index past the tiny embedding table)
    model.save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    write_csv(tmp_path / "domains.csv")
    command = [
        sys.executable, str(ROOT / "scripts" / "text_domains.py"), "--benchmark", "custom",
        "--data-files", str(tmp_path / "domains.csv"), "--text-column", "sentence", "--label-column", "target",
        "--task-column", "domain", "--backbone", str(tmp_path / "backbone"), "--layer", "-1",
        "--hidden-size", "16", "--num-heads", "2", "--epochs", "3", "--patience", "3", "--cpu",
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["benchmark"] == "custom"
    assert results["backbone"]["name"] == str(tmp_path / "backbone") and results["backbone"]["fallback_reason"] is None
    matrix = results["task_il"]["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2] and matrix[1][0] == matrix[0][0]
    assert results["task_il"]["average_forgetting"] == 0.0
    # Class-incremental evaluation beside it: routed among the tasks seen so far, every router reported.
    assert [len(row) for row in results["class_il"]["accuracy_matrix"]] == [1, 2]
    assert results["class_il"]["average_accuracy"] <= results["task_il"]["average_accuracy"]
    assert (
        set(results["routing"]["validation"])
        == set(results["routing"]["test"])
        == {"mahalanobis", "energy", "combined"}
    )
    assert results["routing"]["router"] == "mahalanobis" and 0.0 <= results["routing"]["task_accuracy"] <= 1.0
    assert "Class-incremental (no task id; router `mahalanobis`)" in (tmp_path / "out" / "results.md").read_text()
    assert list(results["validation_accuracy"]) == ["news", "sports"]
    assert all("test: 10% of the task's rows" in results["task_notes"][task] for task in ("news", "sports"))
    for task in ("news", "sports"):
        adapter = json.loads((tmp_path / "out" / "adapters" / task / "adapter_config.json").read_text())
        assert sorted(adapter["labels"]) == sorted(TOPICS if task == "news" else SPORTS)
    assert (tmp_path / "out" / "accuracy_matrix.png").stat().st_size > 0
    card = ModelCard.load(tmp_path / "out" / "model" / "README.md")  # the model card, next to the model it describes
    assert card.data.eval_results[0].metric_value == results["task_il"]["average_accuracy"]
    assert "scripts/text_domains.py --benchmark custom" in card.text and results["command"] in card.text


def test_benchmark_defaults_fill_only_the_flags_left_unset():
    sys.path.insert(0, str(ROOT / "scripts"))
    from text_domains import build_parser, complete_args

    def parsed(*argv: str):
        return complete_args(build_parser().parse_args(list(argv)))

    clinc = parsed("--benchmark", "clinc150")
    assert (clinc.layer, clinc.head_input) == ([-1, -3], "task_tokens+inputs")
    assert (parsed().layer, parsed().head_input) == (-3, "task_tokens")
    chosen = parsed("--benchmark", "clinc150", "--layer", "-2", "--head-input", "task_tokens")
    assert (chosen.layer, chosen.head_input) == (-2, "task_tokens")


@pytest.mark.parametrize(
    "script, name, flags",
    [("text_domains", "clinc150", ["--order", "2"]), ("text_domains", "text_domains", ["--train-per-task", "100"]),
     ("text_domains", "clinc150", ["--test-per-task", "100"]), ("text_domains", "clinc150", ["--split-seed", "3"]),
     ("text_domains", "cl_benchmark", ["--text-column", "sentence"]),
     ("text_domains", "text_domains", ["--task-column", "none"]),
     ("vision_splits", "permuted_mnist", ["--max-shift", "1"]),
     ("vision_splits", "omniglot", ["--validation-fraction", "0.2"]),
     ("vision_splits", "omniglot", ["--train-per-task", "100"]),
     ("vision_splits", "split_fashion_mnist", ["--image-size", "32"]),
     ("vision_splits", "split_mnist", ["--classes-per-task", "5"]),
     ("vision_splits", "split_cifar100", ["--omniglot-tasks", "alphabets"])],
)
def test_a_data_flag_the_benchmark_does_not_read_is_an_error(script, name, flags):
    sys.path.insert(0, str(ROOT / "scripts"))
    module = importlib.import_module(script)

    with pytest.raises(ValueError, match=f"{name} does not read {flags[0]} \\(only .*\\): drop the flag"):
        module.complete_args(module.build_parser().parse_args(["--benchmark", name, *flags]))


def test_data_flags_left_unset_get_their_defaults():
    sys.path.insert(0, str(ROOT / "scripts"))
    from text_domains import build_parser, complete_args

    custom = complete_args(build_parser().parse_args(["--benchmark", "custom", "--task-column", "none"]))
    columns = (custom.text_column, custom.label_column, custom.task_column)
    assert columns == ("text", "label", None) and custom.split_seed == 0
    ordered = complete_args(build_parser().parse_args(["--benchmark", "cl_benchmark", "--split-seed", "2"]))
    assert (ordered.order, ordered.split_seed, ordered.output_dir) == ("1", 2, "outputs/cl_benchmark_order1")


@pytest.mark.parametrize(
    "flag, value, message",
    [("--epochs", "0", "must be at least 1, got 0"), ("--batch-size", "-2", "must be at least 1, got -2"),
     ("--lr", "0", "must be above 0"), ("--weight-decay", "-1", "must be at least 0.0, got -1"),
     ("--max-length", "1", "must be at least 2, got 1"), ("--epochs", "ten", "expected an integer, got 'ten'")],
)
def test_training_flags_out_of_range_stop_before_any_work(flag, value, message, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    from text_domains import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([flag, value])
    assert f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [(["--seed", "3"], "--seed does not apply to tuning"),
     (["--evaluate-on", "test"], "--evaluate-on does not apply to tuning"),
     (["--candidates", '{"mixed_precision": "bf16"}'], "sets ['mixed_precision'], which are not tunable"),
     (["--benchmark", "clinc150", "--candidates", '{"order": "3"}'], "sets ['order'], which clinc150 does not read")],
)
def test_tuning_refuses_what_it_would_ignore(argv, message, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    from tune_text_domains import parse_args

    monkeypatch.setattr(sys, "argv", ["tune_text_domains.py", *argv])
    with pytest.raises(SystemExit):
        parse_args()
    assert message in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["tune_text_domains.py", "--candidates", '{"lr": 0.01}', '{"task_rank": 4}'])
    args, candidates = parse_args()
    assert candidates == [{"lr": 0.01}, {"task_rank": 4}] and (args.seed, args.evaluate_on) == (0, "validation")
