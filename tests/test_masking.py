"""Must-show 1: the task-graph mask is real."""

import torch

from conftest import make_features, make_model, train_steps

from hf_dtgma.modeling_dtgma import task_graph_mask


def test_mask_values_and_structure():
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mask = task_graph_mask(num_task_groups=2, tokens_per_task=2, attention_mask=attention_mask)
    assert mask.shape == (2, 1, 8, 8)
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    allowed = mask[0, 0] == 0
    # task 0's tokens (rows 0-1) read each other and real inputs, never task 1's tokens (cols 2-3) nor padding
    assert allowed[0, :2].all() and not allowed[0, 2:4].any() and allowed[0, 4:7].all() and not allowed[0, 7]
    assert not allowed[2, :2].any() and allowed[2, 2:4].all()
    # input tokens read real input tokens only
    assert not allowed[4:, :4].any() and allowed[4:, 4:7].all() and not allowed[4:, 7].any()
    assert (mask[1, 0, :, 7] == 0).all()  # no padding in row 1


def test_blocked_positions_get_exactly_zero_attention(two_task_model):
    features, mask = make_features(batch=4, tokens=6)
    mask[0, 4:] = 0
    out = two_task_model(inputs_embeds=features, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2
    for weights in out.attentions:  # (B, heads, S, S), S = 2 task tokens + 6 inputs
        assert weights.shape == (4, 2, 8, 8)
        assert torch.all(weights[:, :, 0, 1] == 0) and torch.all(weights[:, :, 1, 0] == 0)  # task ↮ other task
        assert torch.all(weights[:, :, 2:, :2] == 0)  # inputs never read task tokens
        assert torch.all(weights[0, :, :, 2 + 4 :] == 0)  # padding is never read
        assert torch.all(weights[:, :, 0, 2:][mask.bool()[:, None].expand(-1, 2, -1)] > 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 2, 8))


def test_other_tasks_tokens_do_not_change_a_tasks_logits(two_task_model):
    features, mask = make_features(tokens=5)
    before = two_task_model(inputs_embeds=features, attention_mask=mask).logits[:, 0]
    with torch.no_grad():
        two_task_model.task_adapters[1].task_tokens.mul_(-7.0).add_(3.0)
    after = two_task_model(inputs_embeds=features, attention_mask=mask).logits
    assert torch.equal(after[:, 0], before)
    changed_input = features.clone()
    changed_input[:, 0] = torch.randn(changed_input[:, 0].shape, generator=torch.Generator().manual_seed(5))
    moved = two_task_model(inputs_embeds=changed_input, attention_mask=mask).logits[:, 0]
    assert not torch.allclose(moved, before)


def test_padding_content_is_ignored(two_task_model):
    features, mask = make_features()
    noisy = features.clone()
    noisy[mask == 0] = 100.0
    clean = two_task_model(inputs_embeds=features, attention_mask=mask).logits
    torch.testing.assert_close(two_task_model(inputs_embeds=noisy, attention_mask=mask).logits, clean)


def test_sdpa_path_matches_explicit_attention():
    model = make_model(num_task_tokens=2)
    model.add_task("a", labels=["x", "y"])
    train_steps(model, "a", steps=3)
    model.add_task("b", labels=["x", "y", "z"])
    features, mask = make_features()
    fast = model(inputs_embeds=features, attention_mask=mask).logits
    explicit = model(inputs_embeds=features, attention_mask=mask, output_attentions=True).logits
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-6)
