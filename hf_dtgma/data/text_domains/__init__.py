"""The built-in text-domain benchmark: the eight binary domains of the DTG-MA paper, written for this library.

Each domain has 150 hand-written sentences per class in `<task>.json` beside this file. They are split once, with a
fixed seed that does not depend on the run's seed, into 80 train, 30 validation and 40 test sentences per class, so
every run tests on the same held-out sentences and no test sentence is a case or whitespace variant of a training one.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from datasets import Dataset

from ...training.trainer import ContinualTask

TEXT_DOMAIN_TASKS = (
    "sentiment",
    "topic",
    "formality",
    "intent",
    "code_vs_ops",
    "finance_vs_business",
    "legal_vs_policy",
    "short_vs_detailed",
)
SPLIT_SIZES = {"train": 80, "validation": 30, "test": 40}
SPLIT_SEED = 1234
_DATA_DIR = Path(__file__).parent


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form of a sentence (what the disjointness guarantee is checked on)."""
    return re.sub(r"\s+", " ", text.casefold()).strip()


def load_text_domains(num_tasks: int | None = None) -> list[ContinualTask]:
    """The text-domain tasks in the paper's order, each with `text` / `label` splits.

    Args:
        num_tasks: keep only the first `num_tasks` domains (all eight by default).
    """
    names = TEXT_DOMAIN_TASKS[: num_tasks or len(TEXT_DOMAIN_TASKS)]
    if num_tasks is not None and not 1 <= num_tasks <= len(TEXT_DOMAIN_TASKS):
        raise ValueError(f"`num_tasks` must be between 1 and {len(TEXT_DOMAIN_TASKS)}, got {num_tasks}.")
    return [_load_task(name) for name in names]


def _load_task(name: str) -> ContinualTask:
    spec = json.loads((_DATA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    splits: dict[str, dict[str, list]] = {split: {"text": [], "label": []} for split in SPLIT_SIZES}
    for label, label_name in enumerate(spec["labels"]):
        sentences = list(spec["examples"][label_name])
        if len(sentences) < sum(SPLIT_SIZES.values()):
            raise ValueError(
                f"{name}.json has {len(sentences)} {label_name!r} sentences; "
                f"the splits need {sum(SPLIT_SIZES.values())}."
            )
        random.Random(f"{SPLIT_SEED}-{name}-{label_name}").shuffle(sentences)
        start = 0
        for split, size in SPLIT_SIZES.items():
            splits[split]["text"] += sentences[start : start + size]
            splits[split]["label"] += [label] * size
            start += size
    return ContinualTask(
        name=name,
        labels=list(spec["labels"]),
        train=Dataset.from_dict(splits["train"]),
        validation=Dataset.from_dict(splits["validation"]),
        test=Dataset.from_dict(splits["test"]),
    )
