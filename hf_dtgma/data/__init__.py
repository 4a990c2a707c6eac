"""Benchmark loaders: each turns a benchmark into an ordered list of `ContinualTask`s with train / validation / test
splits as `datasets.Dataset`s (a `text` or image column and a `label` column)."""

from .text_domains import TEXT_DOMAIN_TASKS, load_text_domains

__all__ = ["TEXT_DOMAIN_TASKS", "load_text_domains"]
