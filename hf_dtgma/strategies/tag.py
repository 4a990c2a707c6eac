"""`tag`, Task-based Accumulated Gradients (Malviya et al., CoLLAs 2022): a task-aware optimizer on the shared encoder.

The optimizer keeps, for the current task and per parameter tensor, a first moment m_t (EMA of the gradients, β1)
and a second moment v_t (EMA of their squares, β2), both started afresh at each task. At a task boundary it stores
the task's first moment normalised to unit length, m̂_τ = m_τ / ‖m_τ‖, and its second moment v̂_τ. On a later task t
each step is scaled by how the current direction relates to every task's so far, the current one included:

    α_τ = exp(−b · cos(m_t, m̂_τ))                                  per earlier task τ < t, per tensor
    α_t = exp(−b · cos(m_t, m_t)) = exp(−b)                        the current task
    TAG-RMSProp:  θ ← θ − η · g / (sqrt(α_t v_t + Σ_τ α_τ v̂_τ) + ε)
    TAG-Adam:     θ ← θ − η · m̃_t / (sqrt(α_t ṽ_t + Σ_τ α_τ v̂_τ) + ε)   (m̃, ṽ: bias-corrected within the task)

A direction opposed to an earlier task's (cos < 0) gets a large α, a large denominator and a small step, which
protects that task; one aligned with it (cos → 1, α_τ → α_t) gets a larger step than plain Adam would take, which
lets related tasks transfer. On the first task there is no τ and no scaling: TAG-RMSProp is RMSProp
(`torch.optim.RMSprop`'s update) and TAG-Adam is Adam.

What is kept from the paper and its authors' code (pranshu28/TAG, `tag_update.py`): per-task moments, the normalised
stored first moments, α = exp(−b·cos) over every task's second moment with exp(−b) on the current task's, both
variants with their β2 (0.999 for TAG-Adam, 0.99 for TAG-RMSProp). What changes: decoupled weight decay (as the
AdamW every other method trains with), Adam's bias correction counted per task (the authors' code restarts it every
epoch and applies the current one to the stored moments too), and the cosine is computed per parameter tensor on
the device without any host synchronisation per step.
The network, heads, batches and schedule are the other baselines' (`SharedEncoderStrategy`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Retrain, SharedEncoderStrategy


class TAGOptimizer(torch.optim.Optimizer):
    """TAG-RMSProp (`variant="rmsprop"`) or TAG-Adam (`variant="adam"`), with a `task_boundary()` hook.

    Args:
        params: parameters or parameter groups, as for any `torch.optim.Optimizer`.
        lr: step size η.
        b: the relatedness temperature of α_τ = exp(−b · cos).
        betas: (β1, β2) of the first and second moments.
        eps: added to the denominator's square root.
        weight_decay: decoupled (AdamW-style) weight decay.
        variant: "rmsprop" (steps along the gradient) or "adam" (along the bias-corrected first moment).
        memory: earlier tasks' stored moments `{param: {"m": (τ, numel), "v": (τ, *shape)}}` (another TAG optimizer's
            `memory`, to continue a task sequence in a new optimizer).

    Example:

    ```python
    >>> weight = nn.Parameter(torch.zeros(3))
    >>> optimizer = TAGOptimizer([weight], lr=0.1, b=5.0)
    >>> weight.grad = torch.ones(3); optimizer.step()
    >>> optimizer.task_boundary()  # the first task ends: its moments are stored, the next task starts afresh
    ```
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        b: float = 5.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variant: str = "adam",
        memory: dict[nn.Parameter, dict[str, torch.Tensor]] | None = None,
    ):
        if variant not in ("adam", "rmsprop"):
            raise ValueError(f"TAG variant must be 'adam' or 'rmsprop', not {variant!r}.")
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(
                f"Invalid TAG settings: lr={lr}, eps={eps}, betas={betas} (need lr, eps >= 0, 0 <= beta < 1)."
            )
        super().__init__(params, dict(lr=lr, b=b, betas=betas, eps=eps, weight_decay=weight_decay, variant=variant))
        self.memory: dict[nn.Parameter, dict[str, torch.Tensor]] = memory if memory is not None else {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(param)
                    state["v"] = torch.zeros_like(param)
                state["step"] += 1
                m, v = state["m"], state["v"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["variant"] == "adam":
                    direction = m / (1 - beta1 ** state["step"])
                    second = v / (1 - beta2 ** state["step"])
                else:
                    direction, second = grad, v
                stored = self.memory.get(param)
                if stored is not None:  # a later task: α_t = exp(−b) on its own moment, α_τ on each earlier one's
                    alpha = self.relatedness(m, stored["m"], group["b"])  # (τ,)
                    earlier = (alpha @ stored["v"].flatten(1)).view_as(param)
                    second = earlier.add_(second, alpha=math.exp(-group["b"]))
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.addcdiv_(direction, second.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss

    @staticmethod
    def relatedness(moment: torch.Tensor, stored_directions: torch.Tensor, b: float) -> torch.Tensor:
        """α_τ = exp(−b · cos(m_t, m̂_τ)) for each earlier task: `moment` any shape, `stored_directions` `(τ, numel)`
        unit rows → `(τ,)`. A zero moment has cosine 0 with everything (α = 1)."""
        flat = moment.flatten()
        cosine = stored_directions @ flat / flat.norm().clamp_min(torch.finfo(flat.dtype).tiny)
        return torch.exp(-b * cosine)

    @torch.no_grad()
    def task_boundary(self) -> None:
        """End the current task: store each parameter's normalised first moment and its second moment (bias-corrected
        for TAG-Adam), and start the next task's moments from zero."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                m = state["m"].flatten()
                direction = (m / m.norm().clamp_min(torch.finfo(m.dtype).tiny))[None]
                second = state["v"] / (1 - beta2 ** state["step"]) if group["variant"] == "adam" else state["v"].clone()
                stored = self.memory.get(param)
                self.memory[param] = {
                    "m": direction if stored is None else torch.cat([stored["m"], direction]),
                    "v": second[None] if stored is None else torch.cat([stored["v"], second[None]]),
                }
                self.state[param] = {}


@dataclass
class TAGConfig:
    """Args:
    b: relatedness temperature of α = exp(−b·cos) (the paper searches 1 to 7).
    variant: "adam" (TAG-Adam) or "rmsprop" (TAG-RMSProp).
    beta1: first-moment EMA factor.
    beta2: second-moment EMA factor (default: the authors', 0.999 for TAG-Adam and 0.99 for TAG-RMSProp).
    """

    b: float = 5.0
    variant: str = "adam"
    beta1: float = 0.9
    beta2: float | None = None


class TAGStrategy(SharedEncoderStrategy):
    """The shared encoder and per-task heads of the baselines, trained with `TAGOptimizer`; its task memory carries
    over from one task's optimizer to the next."""

    name: ClassVar[str] = "tag"
    config_class: ClassVar[type] = TAGConfig

    def __init__(self, model_config, config: TAGConfig | None = None):
        super().__init__(model_config, config)
        self.optimizer: TAGOptimizer | None = None

    @property
    def beta2(self) -> float:
        """The second-moment factor: `TAGConfig.beta2`, or the authors' default for the variant."""
        if self.config.beta2 is not None:
            return self.config.beta2
        return 0.999 if self.config.variant == "adam" else 0.99

    def make_optimizer(self, parameter_groups: list[dict[str, Any]], learning_rate: float) -> torch.optim.Optimizer:
        config = self.config
        memory = self.optimizer.memory if self.optimizer is not None else None
        self.optimizer = TAGOptimizer(
            parameter_groups, lr=learning_rate, b=config.b, betas=(config.beta1, self.beta2),
            variant=config.variant, memory=memory,
        )
        return self.optimizer

    def end_task(self, index: int, tasks: list, retrain: Retrain) -> None:
        if self.optimizer is not None:
            self.optimizer.task_boundary()
