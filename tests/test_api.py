"""The public API's contracts: task registry, parameter growth, and clear errors on bad input."""

import pytest
import torch

from conftest import INPUT_DIM, make_features, make_model

from hf_dtgma import DTGMAConfig, DTGMAModel

REFERENCE_PER_TASK = 1_577_472  # DTG-MA reference: full Q/K/V/O + FFN per task, hidden 256, 2 layers


def test_task_registry(two_task_model):
    assert two_task_model.tasks == ["sentiment", "topic"]
    assert two_task_model.task_labels("topic") == ["finance", "science", "sports"]
    assert two_task_model.task_index("topic") == 1
    assert two_task_model.config.tasks[0] == {"name": "sentiment", "labels": ["positive", "negative"], "frozen": True}


def test_per_task_growth_against_the_reference():
    def per_task(mode):
        model = DTGMAModel(DTGMAConfig(input_dim=384, hidden_size=256, num_layers=2, num_heads=4, task_param_mode=mode))
        before = model.num_parameters()
        model.add_task("t", labels=["a", "b"])
        assert model.num_parameters() - before == model.num_task_parameters("t")
        return model.num_task_parameters("t")

    token_and_head = 256 + (2 * 256) + (2 * 256 + 2)  # task token, head LayerNorm, head Linear
    assert per_task("full") == REFERENCE_PER_TASK + token_and_head
    lowrank = per_task("lowrank")
    assert lowrank == 2 * (4 * 8 * (256 + 256) + 2 * 8 * (256 + 1024)) + token_and_head
    assert lowrank * 20 < REFERENCE_PER_TASK


def test_loss_and_gradients_reach_only_the_trained_task():
    model = make_model()
    model.add_task("a", labels=["x", "y"])
    model.add_task("b", labels=["x", "y", "z"], freeze_previous=False)
    features, mask = make_features(batch=4)
    out = model(
        inputs_embeds=features, attention_mask=mask, task_ids=torch.tensor([1, 1, 1, 1]),
        labels=torch.tensor([0, 2, 1, 2]),
    )
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.task_adapters[0].parameters())
    assert model.task_adapters[1].head.classifier.weight.grad.abs().sum() > 0
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m.add_task("sentiment", labels=["a", "b"]), ValueError, "already registered"),
        (lambda m: m.add_task("new", labels=[]), ValueError, "empty"),
        (lambda m: m.add_task("new", labels=["a", "a"]), ValueError, r"duplicated labels \['a'\]"),
        (lambda m: m.add_task("new", labels="ab"), ValueError, "list of label names"),
        (lambda m: m.add_task("", labels=["a"]), ValueError, "non-empty string"),
        (lambda m: m.task_labels("weather"),
         KeyError, r"Unknown task 'weather'. Known tasks: \['sentiment', 'topic'\]"),
        (lambda m: m.freeze_task("weather"), KeyError, "Known tasks"),
        (lambda m: m(inputs_embeds=torch.randn(2, 4, INPUT_DIM + 1)),
         ValueError, "Feature width 13 differs from config.input_dim=12"),
        (lambda m: m(inputs_embeds=torch.randn(2, INPUT_DIM)), ValueError, r"\(batch, tokens, 12\)"),
        (lambda m: m(inputs_embeds=torch.randn(2, 4, INPUT_DIM), attention_mask=torch.ones(2, 5)),
         ValueError, "attention_mask` must have shape"),
        (lambda m: m(inputs_embeds=torch.randn(2, 4, INPUT_DIM),
                     attention_mask=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])),
         ValueError, r"rows \[1\] have no real token"),
        (lambda m: m(inputs_embeds=torch.randn(2, 4, INPUT_DIM), task_ids=torch.tensor([0, 2])),
         ValueError, "out of range"),
        (lambda m: m(inputs_embeds=torch.randn(2, 4, INPUT_DIM), task_ids=torch.tensor([0])),
         ValueError, r"shape \(2,\)"),
        (lambda m: m(inputs_embeds=torch.randn(2, 4, INPUT_DIM), task_ids="weather"), KeyError, "Unknown task"),
        (lambda m: m(inputs_embeds=torch.randn(2, 4, INPUT_DIM), task_ids=0, labels=torch.tensor([0, 2])),
         ValueError, "label indices"),
        (lambda m: m(inputs_embeds=torch.randn(2, 4, INPUT_DIM), labels=torch.tensor([0, 1])),
         ValueError, "need `task_ids`"),
        (lambda m: m(), ValueError, "exactly one of"),
        (lambda m: m(pixel_values=torch.randn(2, 1, 28, 28)), ValueError,
         r"need a backbone.*For images, build the model with its own patch embedder.*DTGMAConfig\(image_size="),
    ],
)
def test_bad_input_gets_a_clear_error(two_task_model, call, error, message):
    with pytest.raises(error, match=message):
        call(two_task_model)


def test_a_model_without_tasks_says_what_to_do():
    with pytest.raises(ValueError, match="add_task"):
        make_model()(inputs_embeds=torch.randn(1, 3, INPUT_DIM))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=30, num_heads=4), "divisible"),
        (dict(task_param_mode="huge"), "task_param_mode"),
        (dict(shared_training="sometimes"), "shared_training"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_hidden_layers=0), "num_layers"),
        (dict(intermediate_size=-4), "`intermediate_size` must be a positive integer, got -4"),
        (dict(hidden_act="GELU"), "`hidden_act` must be an activation of transformers.activations.ACT2FN"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DTGMAConfig(**kwargs)


def test_config_takes_the_usual_transformers_names(tmp_path):
    config = DTGMAConfig(
        input_dim=INPUT_DIM, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, hidden_dropout_prob=0.3,
        attention_probs_dropout_prob=0.2,
    )
    assert (config.num_layers, config.num_heads, config.hidden_dropout, config.attention_dropout) == (3, 2, 0.3, 0.2)
    assert config.num_hidden_layers == 3 and len(DTGMAModel(config).layers) == 3
    config.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert '"num_layers": 3' in saved and "num_hidden_layers" not in saved
    assert DTGMAConfig.from_pretrained(tmp_path).num_layers == 3
