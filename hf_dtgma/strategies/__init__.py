"""Continual-learning methods, one small module each, all trained by the same `ContinualTrainer` on the same
frozen-backbone features, batches, epochs, early stopping and per-task heads.

    >>> from hf_dtgma.strategies import build_strategy, STRATEGIES
    >>> sorted(STRATEGIES)[:3]
    ['adapter', 'daformer', 'derpp']
    >>> ewc = build_strategy("ewc", DTGMAConfig(input_dim=384), penalty=1000.0)

`build_strategy(name, model_config, **hyperparameters)` builds one from the `DTGMAConfig` that fixes the widths (the
baselines' encoder has DTG-MA's shape) and the method's own hyperparameters (its `config_class` dataclass).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..configuration_dtgma import DTGMAConfig
from .base import ContinualStrategy, SharedEncoderStrategy
from .daformer import DAFormerStrategy
from .derpp import DERPPStrategy
from .dtgma import DTGMAFullStrategy, DTGMAStrategy
from .dwa import DWAStrategy
from .dytox import DyToxStrategy
from .finetune import FinetuneStrategy
from .hat import HATStrategy
from .joint import JointStrategy
from .lwf import LwFStrategy
from .packnet import PackNetStrategy
from .peft_adapters import IA3AdapterStrategy, LoRAStrategy
from .regularization import EWCStrategy, MASStrategy
from .tag import TAGStrategy

STRATEGIES: dict[str, type[ContinualStrategy]] = {
    strategy.name: strategy
    for strategy in (
        DTGMAStrategy, DTGMAFullStrategy, JointStrategy, FinetuneStrategy, EWCStrategy, MASStrategy, LwFStrategy,
        HATStrategy, PackNetStrategy, DERPPStrategy, LoRAStrategy, IA3AdapterStrategy, DyToxStrategy, TAGStrategy,
        DAFormerStrategy, DWAStrategy,
    )
}


def register_strategy(strategy: type[ContinualStrategy]) -> type[ContinualStrategy]:
    """Make `strategy` (a `ContinualStrategy` subclass with a unique `name`) available to `build_strategy` and
    `scripts/compare.py`. Usable as a class decorator."""
    if not strategy.name:
        raise ValueError(f"{strategy.__name__} needs a `name` to be registered.")
    if STRATEGIES.get(strategy.name, strategy) is not strategy:
        raise ValueError(
            f"A strategy named {strategy.name!r} is already registered ({STRATEGIES[strategy.name].__name__})."
        )
    STRATEGIES[strategy.name] = strategy
    return strategy


def build_strategy(name: str, model_config: DTGMAConfig, **hyperparameters: Any) -> ContinualStrategy:
    """The strategy `name` on a model of `model_config`'s shape, with `hyperparameters` overriding its defaults."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}. Known strategies: {', '.join(sorted(STRATEGIES))}.")
    strategy = STRATEGIES[name]
    fields = {field.name for field in dataclasses.fields(strategy.config_class)}
    unknown = sorted(set(hyperparameters) - fields)
    if unknown:
        raise ValueError(
            f"{name} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"its hyperparameters: {sorted(fields) or 'none'}."
        )
    return strategy(model_config, strategy.config_class(**hyperparameters))


__all__ = ["STRATEGIES", "ContinualStrategy", "SharedEncoderStrategy", "build_strategy", "register_strategy"]
