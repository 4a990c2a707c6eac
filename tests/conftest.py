import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

from hf_dtgma import DTGMAConfig, DTGMAModel
from hf_dtgma.training import ContinualTask

INPUT_DIM = 12


def make_model(seed: int = 0, **overrides) -> DTGMAModel:
    """A tiny DTG-MA model (no tasks yet), deterministic for a given seed."""
    torch.manual_seed(seed)
    config = dict(input_dim=INPUT_DIM, hidden_size=16, num_layers=2, num_heads=2, task_rank=4, hidden_dropout=0.0)
    config.update(overrides)
    return DTGMAModel(DTGMAConfig(**config))


BLOCK_HF_DTGMA = """
import sys
sys.modules["hf_dtgma"] = None  # hf_dtgma is not importable in this process
try:
    import hf_dtgma
    raise SystemExit("hf_dtgma should not be importable")
except ImportError:
    pass
"""


def run_without_hf_dtgma(code: str, workdir: Path) -> None:
    """Run `code` in a fresh, offline Python process in `workdir` where `hf_dtgma` cannot be imported (a user with only
    transformers installed; its remote-code modules go to `workdir/modules`), and fail the test if the process fails."""
    env = {**os.environ, "HF_MODULES_CACHE": str(workdir / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    script = BLOCK_HF_DTGMA + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def make_features(batch: int = 5, tokens: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token features and a mask with some right padding (every row keeps >= 2 real tokens)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, tokens, INPUT_DIM, generator=generator)
    lengths = torch.randint(2, tokens + 1, (batch,), generator=generator)
    mask = (torch.arange(tokens)[None] < lengths[:, None]).long()
    return features, mask


def train_steps(model: DTGMAModel, task: str, steps: int = 15, seed: int = 2) -> None:
    """A few AdamW steps on random labels of `task`, over every parameter that requires grad."""
    model.train()
    features, mask = make_features(batch=8, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(model.task_labels(task)), (8,), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss = model(inputs_embeds=features, attention_mask=mask, task_ids=task, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture
def two_task_model() -> DTGMAModel:
    model = make_model()
    model.add_task("sentiment", labels=["positive", "negative"])
    model.add_task("topic", labels=["finance", "science", "sports"])
    return model.eval()


WORDS = "the market rallied a new comet was found stocks fell after rates rose team won final match".split()
TEXTS = ["the market rallied", "a new comet was found after the match", "stocks fell", "team won the final"]


def tiny_qwen() -> tuple[Qwen2Model, PreTrainedTokenizerFast]:
    """A random 2-layer Qwen2 and a word-level tokenizer built in code (no download)."""
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{word: i + 3 for i, word in enumerate(dict.fromkeys(WORDS))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2Model(config).eval(), hf_tokenizer


DIM = 8


def synthetic_tasks(num_tasks: int = 3, sizes=(32, 8, 12), seed: int = 0) -> list[ContinualTask]:
    """Binary tasks on variable-length token features: each class shifts its tokens by its own mean vector."""
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(num_tasks):
        means = 0.6 * rng.normal(size=(2, DIM))  # overlapping classes: accuracies well below 1
        splits = []
        for per_class in sizes:
            features, labels = [], []
            for label in (0, 1):
                for _ in range(per_class):
                    tokens = rng.normal(size=(int(rng.integers(2, 6)), DIM)) + means[label]
                    features.append(tokens.astype(np.float16))
                    labels.append(label)
            splits.append(Dataset.from_dict({"features": features, "label": labels}))
        tasks.append(ContinualTask(f"task{t}", ["no", "yes"], *splits))
    return tasks
