"""Benchmark loaders: each turns a benchmark into an ordered list of `ContinualTask`s with train / validation / test
splits as `datasets.Dataset`s (a `text` or image column and a `label` column)."""

from .cl_benchmark import CL_BENCHMARK_ORDERS, load_cl_benchmark
from .clinc150 import load_clinc150, load_clinc150_out_of_scope
from .custom import load_custom
from .text_domains import TEXT_DOMAIN_TASKS, load_text_domains
from .vision import (
    VISION_BENCHMARKS,
    RandomShift,
    load_omniglot,
    load_permuted_mnist,
    load_split_cifar100,
    load_split_fashion_mnist,
    load_split_mnist,
)

__all__ = [
    "CL_BENCHMARK_ORDERS",
    "RandomShift",
    "TEXT_DOMAIN_TASKS",
    "VISION_BENCHMARKS",
    "load_cl_benchmark",
    "load_clinc150",
    "load_clinc150_out_of_scope",
    "load_custom",
    "load_omniglot",
    "load_permuted_mnist",
    "load_split_cifar100",
    "load_split_fashion_mnist",
    "load_split_mnist",
    "load_text_domains",
]
