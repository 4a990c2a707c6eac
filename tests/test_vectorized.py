"""Must-show 3: a mixed-task batch and the all-tasks pass equal one task at a time."""

import pytest
import torch

from conftest import make_features, make_model, train_steps


@pytest.fixture(params=["lowrank", "full"])
def trained_model(request):
    model = make_model(task_param_mode=request.param, num_task_tokens=2)
    for name, labels in (("a", ["x", "y"]), ("b", ["p", "q", "r"]), ("c", ["u", "v", "w", "z"])):
        model.add_task(name, labels=labels)
        train_steps(model, name, steps=4)
    return model


def test_mixed_batch_equals_per_task(trained_model):
    features, mask = make_features(batch=7)
    task_ids = torch.tensor([2, 0, 1, 1, 0, 2, 0])
    mixed = trained_model(inputs_embeds=features, attention_mask=mask, task_ids=task_ids).logits
    assert mixed.shape == (7, 4)
    for task in range(3):
        rows = task_ids == task
        alone = trained_model(inputs_embeds=features[rows], attention_mask=mask[rows], task_ids=task).logits
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-5)


def test_all_tasks_pass_equals_stacked_per_task(trained_model):
    features, mask = make_features(batch=5)
    together = trained_model(inputs_embeds=features, attention_mask=mask)
    assert together.logits.shape == (5, 3, 4) and together.task_states.shape == (5, 3, 16)
    one_by_one = torch.stack(
        [trained_model(inputs_embeds=features, attention_mask=mask, task_ids=t).logits for t in range(3)], dim=1
    )
    torch.testing.assert_close(together.logits, one_by_one, rtol=1e-5, atol=1e-5)
    assert torch.isinf(together.logits[:, 0, 2:]).all() and torch.isinf(together.logits[:, 1, 3:]).all()


def test_task_names_and_scalar_ids_select_the_same_task(trained_model):
    features, mask = make_features(batch=3)
    by_name = trained_model(inputs_embeds=features, attention_mask=mask, task_ids="b").logits
    by_id = trained_model(inputs_embeds=features, attention_mask=mask, task_ids=torch.tensor([1, 1, 1])).logits
    assert torch.equal(by_name, by_id)


def test_hidden_states_cover_the_whole_sequence(trained_model):
    features, mask = make_features(batch=2, tokens=4)
    out = trained_model(inputs_embeds=features, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 3 * 2 + 4, 16)
