"""The metrics of continual learning, computed from the accuracy matrix.

`R[i][j]` is the accuracy on task j after training task i (j ≤ i; rows are lower-triangular lists). With T tasks:

* average accuracy  A_T = mean_j R[T-1][j]
* average forgetting F = mean_{j<T-1} ( max_{j ≤ i < T-1} R[i][j] − R[T-1][j] )
* backward transfer BWT = mean_{j<T-1} ( R[T-1][j] − R[j][j] )
* forward transfer  FWT = mean_j ( R[j][j] − reference[j] ), against a model trained from scratch on task j alone.

All values are fractions in [0, 1] (BWT and FWT in [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence

AccuracyMatrix = Sequence[Sequence[float]]


def _check(matrix: AccuracyMatrix) -> None:
    if not matrix:
        raise ValueError("The accuracy matrix is empty: train at least one task.")
    for i, row in enumerate(matrix):
        if len(row) != i + 1:
            raise ValueError(
                f"Row {i} of the accuracy matrix must hold {i + 1} accuracies (tasks 0..{i}), got {len(row)}."
            )


def average_accuracy(matrix: AccuracyMatrix) -> float:
    """Mean accuracy over all tasks after the last one was trained."""
    _check(matrix)
    return sum(matrix[-1]) / len(matrix[-1])


def forgetting_per_task(matrix: AccuracyMatrix) -> list[float]:
    """For each task but the last: its best accuracy before the last task, minus its final accuracy."""
    _check(matrix)
    last = len(matrix) - 1
    return [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]


def average_forgetting(matrix: AccuracyMatrix) -> float:
    """Mean of `forgetting_per_task` (0.0 with a single task)."""
    values = forgetting_per_task(matrix)
    return sum(values) / len(values) if values else 0.0


def backward_transfer(matrix: AccuracyMatrix) -> float:
    """Mean change of each earlier task's accuracy from just after it was learned to the end (0.0 with one task)."""
    _check(matrix)
    last = len(matrix) - 1
    values = [matrix[last][j] - matrix[j][j] for j in range(last)]
    return sum(values) / len(values) if values else 0.0


def forward_transfer(matrix: AccuracyMatrix, reference: Sequence[float]) -> float:
    """Mean of `R[j][j] − reference[j]`, where `reference[j]` is task j's accuracy when trained from scratch."""
    _check(matrix)
    if len(reference) != len(matrix):
        raise ValueError(f"`reference` needs one accuracy per task ({len(matrix)}), got {len(reference)}.")
    return sum(matrix[j][j] - reference[j] for j in range(len(matrix))) / len(matrix)


def summarize(matrix: AccuracyMatrix, task_names: Sequence[str], reference: Sequence[float] | None = None) -> dict:
    """Every metric of `matrix`, overall and per task, as a JSON-ready dict."""
    forgetting = forgetting_per_task(matrix) + [0.0]
    summary = {
        "accuracy_matrix": [list(map(float, row)) for row in matrix],
        "average_accuracy": average_accuracy(matrix),
        "average_forgetting": average_forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "per_task": {
            name: {"accuracy_when_learned": matrix[j][j], "final_accuracy": matrix[-1][j], "forgetting": forgetting[j]}
            for j, name in enumerate(task_names[: len(matrix)])
        },
    }
    if reference is not None:
        summary["fwt"] = forward_transfer(matrix, reference)
    return summary
