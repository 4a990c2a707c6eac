"""`finetune`: the lower bound. The shared encoder keeps training on each new task with nothing to protect the old
ones; only the heads are per task (old heads never train again). Its forgetting is what every other method removes."""

from __future__ import annotations

from typing import ClassVar

from .base import SharedEncoderStrategy


class FinetuneStrategy(SharedEncoderStrategy):
    name: ClassVar[str] = "finetune"
