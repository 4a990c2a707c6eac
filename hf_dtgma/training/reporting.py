"""Results of a run on disk: `results.json`, `results.md`, the accuracy-matrix heatmap, the model and its adapters."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..files import write_json_atomic, write_text_atomic
from ..hub import render_model_card
from ..modeling_dtgma import DTGMAModel, atomic_path


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def results_markdown(results: dict) -> str:
    """A readable summary: settings, metrics and the accuracy matrix (percent)."""
    task_il = results["task_il"]
    names = list(task_il["per_task"])
    lines = [
        f"# {results.get('benchmark', 'run')}: DTG-MA continual learning",
        "",
        f"Backbone: `{results.get('backbone', {}).get('name', 'features given')}`"
        + (
            f" (fallback: {results['backbone']['fallback_reason']})"
            if results.get("backbone", {}).get("fallback_reason")
            else ""
        ),
        f"Seed {results.get('seed')}, {results.get('num_processes', 1)} process(es), "
        f"{results.get('seconds_total', 0):.0f} s in total.",
        "",
        "| metric (task-incremental) | value |",
        "|---|---:|",
        f"| average accuracy | {_percent(task_il['average_accuracy'])}% |",
        f"| average forgetting | {_percent(task_il['average_forgetting'])} |",
        f"| backward transfer | {_percent(task_il['bwt'])} |",
        f"| parameters (total) | {results['parameters']['total']:,} |",
        f"| parameters per task | {min(results['parameters']['per_task'].values()):,}"
        f"–{max(results['parameters']['per_task'].values()):,} |",
        "",
        "Accuracy matrix (%, row i: after training task i; "
        f"column j: {results.get('config', {}).get('evaluate_on', 'test')} "
        "accuracy on task j):",
        "",
        "| after ↓ / on → | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for i, row in enumerate(task_il["accuracy_matrix"]):
        cells = [_percent(value) for value in row] + [""] * (len(names) - len(row))
        lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    if "class_il" in results:
        lines += ["", *routing_markdown(results)]
    return "\n".join(lines) + "\n"


def routing_markdown(results: dict) -> list[str]:
    """Class-incremental accuracy (no task id) and, where measured, each router and the out-of-scope rejection."""
    routing, class_il = results.get("routing", {}), results["class_il"]
    lines = [
        f"Class-incremental (no task id; router `{routing.get('router')}`): average accuracy "
        f"{_percent(class_il['average_accuracy'])}%, task identified {_percent(routing.get('task_accuracy', 0))}%, "
        f"average forgetting {_percent(class_il['average_forgetting'])}.",
    ]
    splits = [split for split in ("validation", "test") if split in routing]
    if splits:
        lines += [
            "",
            "| router | " + " | ".join(f"task identified ({s}) | class-incremental ({s})" for s in splits) + " |",
            "|---|" + "---:|---:|" * len(splits),
        ]
        for router in routing[splits[0]]:
            cells = [
                f"{_percent(routing[s][router]['task_accuracy'])}% | "
                f"{_percent(routing[s][router]['class_il_accuracy'])}%"
                for s in splits
            ]
            lines.append(f"| {router} | " + " | ".join(cells) + " |")
    if "out_of_scope" in routing:
        oos, threshold = routing["out_of_scope"], routing["reject_threshold"]
        lines += ["", f"Out of scope ({oos['examples']} inputs of no task): AUROC {oos['auroc']:.4f}; at the threshold "
                  f"{threshold['value']:.3f} ({threshold['calibrated_on']}) {_percent(oos['rejected_at_threshold'])}% "
                  "of them are rejected."]
    return lines


def plot_accuracy_matrix(matrix: list[list[float]], names: list[str], path: Path, title: str = "") -> None:
    """Save the lower-triangular accuracy matrix as an annotated heatmap (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(names), len(names)), np.nan)
    for i, row in enumerate(matrix):
        grid[i, : len(row)] = 100 * np.asarray(row)
    size = max(4.0, 0.7 * len(names) + 2)
    figure, axis = plt.subplots(figsize=(size, size * 0.85))
    image = axis.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for i in range(len(matrix)):
        for j in range(len(matrix[i])):
            axis.text(
                j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color="white" if grid[i, j] < 60 else "black",
                fontsize=8,
            )
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("evaluated on task")
    axis.set_ylabel("after training task")
    axis.set_title(title or "accuracy matrix (%)")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)


def write_run_outputs(model: DTGMAModel, results: dict, output_dir: str | os.PathLike) -> None:
    """Write `results.json`, `results.md`, `accuracy_matrix.png`, the final model with its model card (`model/`,
    `model/README.md`: a folder ready for the Hub) and one adapter folder per task (`adapters/<task>/`) to
    `output_dir`. An earlier run's adapters of tasks this model does not have are removed, so the folder describes
    one run."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "results.json", results)
    write_text_atomic(output_dir / "results.md", results_markdown(results))
    names = list(results["task_il"]["per_task"])
    plot_accuracy_matrix(
        results["task_il"]["accuracy_matrix"], names, output_dir / "accuracy_matrix.png", results.get("benchmark", "")
    )
    model.save_pretrained(output_dir / "model")
    write_text_atomic(output_dir / "model" / "README.md", str(render_model_card(model, results)))
    for stale in (output_dir / "adapters").glob("*/adapter_config.json"):  # an earlier run's task, not this model's
        if stale.parent.name not in model.tasks:  # (removed first: on a case-insensitive disk "News" is "news")
            shutil.rmtree(stale.parent)
    for name in model.tasks:
        model.save_task(name, output_dir / "adapters" / name)
