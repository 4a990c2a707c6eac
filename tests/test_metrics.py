"""Must-show 5: the metrics against a hand-computed accuracy matrix."""

import pytest

from hf_dtgma.training.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting_per_task,
    forward_transfer,
    summarize,
)

# R[i][j]: accuracy on task j after training task i.
R = [
    [0.90],
    [0.80, 0.70],
    [0.60, 0.75, 0.95],
]


def test_hand_computed_values():
    assert average_accuracy(R) == pytest.approx((0.60 + 0.75 + 0.95) / 3)
    # task 0: best before the end max(0.90, 0.80) = 0.90 → 0.90 - 0.60; task 1: best 0.70 → 0.70 - 0.75
    assert forgetting_per_task(R) == pytest.approx([0.30, -0.05])
    assert average_forgetting(R) == pytest.approx((0.30 - 0.05) / 2)
    assert backward_transfer(R) == pytest.approx(((0.60 - 0.90) + (0.75 - 0.70)) / 2)
    assert forward_transfer(R, reference=[0.85, 0.70, 0.90]) == pytest.approx(((0.90 - 0.85) + 0 + (0.95 - 0.90)) / 3)


def test_summary_and_single_task():
    summary = summarize(R, ["a", "b", "c"], reference=[0.9, 0.7, 0.95])
    assert summary["per_task"]["a"] == {
        "accuracy_when_learned": 0.90, "final_accuracy": 0.60, "forgetting": pytest.approx(0.30)
    }
    assert summary["per_task"]["c"]["forgetting"] == 0.0 and summary["fwt"] == pytest.approx(0.0)
    assert average_forgetting([[0.5]]) == 0.0 and backward_transfer([[0.5]]) == 0.0


@pytest.mark.parametrize("matrix", [[], [[0.5], [0.5]], [[0.5, 0.4]]])
def test_malformed_matrices_are_refused(matrix):
    with pytest.raises(ValueError):
        average_accuracy(matrix)
