"""`dwa`, Dynamic Weight Allocation (Geilert, "Pay attention to the task"): HAT-style allocation of the shared
encoder's weights, with the weight masks generated from the input instead of looked up by task id.

The mechanism, from the paper:

* A small embedding network reads the input (the mean of its token features, or of its patch embeddings) and gives
  a context vector z(x). For every gated dense layer W (`input_proj` and each layer's q, k, v, o, fc1, fc2) a
  generator maps z(x) to a rank-1 weight mask `M(x) = σ(s·a(x)) σ(s·b(x))ᵀ` (a: one logit per output unit, b: one
  per input unit), so the layer computes `σ(s·a) ⊙ (W (σ(s·b) ⊙ h) + bias)`: one mask per example, no task id.
* s anneals within each epoch from 1/s_max to s_max, as HAT's; evaluation uses s_max (near-binary masks).
* What a task used is recorded when it ends (the largest gate each unit took over its training data, an upper
  bound on `M(x)`'s entries); later tasks update each weight only by `1 − a_<t[out] · a_<t[in]` and each bias by
  `1 − a_<t[out]` (`UpdateMask`, as for HAT), and the LayerNorms freeze after the first task.
* The sparsity term `c · Σ M (1 − a_<t) / Σ (1 − a_<t)` (per unit, averaged over the batch) keeps masks small and off
  the weights earlier tasks use; the triplet term (margin m, batch-hard, on L2-normalised z over the batch's
  labels) organises the context space semantically, so similar inputs get similar masks.
* The embedding network and generators are shared by all tasks, so a quadratic penalty `λ/2 · Σ Ω (θ − θ*)²`
  weighted by their diagonal Fisher keeps old inputs' masks where they were.

Defects of the public code, fixed here:

* The Fisher information was accumulated into the previous task's buffer without being zeroed, so every task's
  importance also counted every earlier task's again (and grew with the number of batches). Here each task's Fisher
  is measured from zero, per example, on at most `importance_samples` examples, and combined online
  `Ω ← decay · Ω + F_t`.
* The sparsity penalty had its sign inverted (it rewarded dense masks). Here it penalises mask density.

What changes, and why: AdamW (the shared optimizer) instead of SGD, hence the update mask (see `hat`); HAT's
gradient compensation for the annealed slope targets free embeddings and has no counterpart for a generator's
outputs, so the generated logits are bounded softly instead (`6·tanh(a/6)`, the ±6 of HAT's clamp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_dtgma import masked_mean
from .base import Retrain, SharedEncoderStrategy, UpdateMask, model_inputs
from .hat import READS, freeze_ungated
from .network import PROJECTIONS


class MaskGenerator(nn.Module):
    """Input → context z `(B, C)` → per gated layer the gate logits of its output and input units."""

    def __init__(self, input_dim: int, context_dim: int, shapes: dict[str, tuple[int, int]]):
        super().__init__()
        self.embed = nn.Sequential(
            nn.LayerNorm(input_dim), nn.Linear(input_dim, context_dim), nn.GELU(), nn.Linear(context_dim, context_dim)
        )
        self.out_units = nn.ModuleDict({key: nn.Linear(context_dim, out) for key, (out, _) in shapes.items()})
        self.in_units = nn.ModuleDict({key: nn.Linear(context_dim, inputs) for key, (_, inputs) in shapes.items()})

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Pooled inputs `(B, input_dim)` → z `(B, C)` and `{key: (a (B, out), b (B, in))}`, bounded to ±6."""
        z = self.embed(pooled)

        def bounded(logits: torch.Tensor) -> torch.Tensor:
            return 6.0 * torch.tanh(logits / 6.0)

        return z, {key: (bounded(self.out_units[key](z)), bounded(self.in_units[key](z))) for key in self.out_units}


def batch_hard_triplet(z: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss on L2-normalised `z (B, C)`: each anchor's farthest same-label and nearest other-label
    example, `relu(d+ − d− + margin)`, averaged over anchors that have both (0 if none has)."""
    z = F.normalize(z.float(), dim=1)
    distance = torch.cdist(z, z)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    positive = distance.masked_fill(~same | eye, float("-inf")).amax(1)
    negative = distance.masked_fill(same, float("inf")).amin(1)
    valid = torch.isfinite(positive) & torch.isfinite(negative)
    losses = F.relu(positive - negative + margin)
    return (losses * valid).sum() / valid.sum().clamp_min(1)


@dataclass
class DWAConfig:
    """Args:
    context_dim: width of the embedding network's context z.
    s_max: the largest gate slope (annealed per batch, as HAT).
    sparsity: c, the weight of the sparsity term.
    triplet: weight of the triplet term.
    margin: triplet margin (on unit-length contexts).
    penalty: λ of the Fisher penalty on the embedding network and generators.
    decay: γ of the online Fisher accumulation.
    importance_samples: training examples each task's Fisher is measured on.
    """

    context_dim: int = 32
    s_max: float = 400.0
    sparsity: float = 0.75
    triplet: float = 0.1
    margin: float = 0.2
    penalty: float = 1000.0
    decay: float = 1.0
    importance_samples: int = 256


class DWAStrategy(SharedEncoderStrategy):
    name: ClassVar[str] = "dwa"
    config_class: ClassVar[type] = DWAConfig

    def __init__(self, model_config, config: DWAConfig | None = None):
        super().__init__(model_config, config)
        self.gated = ["input_proj"] + [f"layers.{i}.{p}" for i in range(model_config.num_layers) for p in PROJECTIONS]
        # Layers reading another gated layer's units (o reads v, fc2 reads fc1) gate their inputs too.
        self.in_gated = {name for name in self.gated if READS.get(name.rsplit(".", 1)[-1]) is not None}
        modules = dict(self.network.named_modules())
        shapes = {self._key(name): (modules[name].out_features, modules[name].in_features) for name in self.gated}
        self.generator = MaskGenerator(model_config.input_dim, self.config.context_dim, shapes)
        self.module = nn.ModuleDict({"network": self.network, "generator": self.generator})
        self.used: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # a_<t of each gated layer's (out, in) units
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.update_mask = UpdateMask()
        self._gates: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._s = self.config.s_max
        for name in self.gated:
            modules[name].register_forward_pre_hook(self._gate_inputs(name))
            modules[name].register_forward_hook(self._gate_outputs(name))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    # ------------------------------------------------------------------ masks from the input

    def _gate_inputs(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor]):
            if self._gates is None:
                return None
            gate = self._gates[name][1]
            return (args[0] * gate.view(gate.shape[0], *[1] * (args[0].dim() - 2), -1).to(args[0].dtype),)

        return hook

    def _gate_outputs(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor | None:
            if self._gates is None:
                return None
            gate = self._gates[name][0]
            return output * gate.view(gate.shape[0], *[1] * (output.dim() - 2), -1).to(output.dtype)

        return hook

    def pooled_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the embedding network reads: the mean of the token features (or of the patch embeddings) `(B, D_in)`."""
        if "pixel_values" in inputs:
            tokens, mask = self.network.patch_embed(inputs["pixel_values"])
        else:
            tokens, mask = inputs["inputs_embeds"], inputs.get("attention_mask")
            if mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return masked_mean(tokens.to(self.network.input_proj.weight.dtype), mask.bool())

    def masks(
        self, inputs: dict[str, torch.Tensor], s: float
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The context z `(B, C)` and each gated layer's gates `{name: (σ(s·a) (B, out), σ(s·b) (B, in))}`; a layer
        that reads a LayerNorm output (every unit non-zero) gets input gates of ones, as HAT's input side."""
        z, logits = self.generator(self.pooled_inputs(inputs))
        gates = {}
        for name in self.gated:
            out_logits, in_logits = logits[self._key(name)]
            in_gate = torch.sigmoid(s * in_logits) if name in self.in_gated else torch.ones_like(in_logits)
            gates[name] = (torch.sigmoid(s * out_logits), in_gate)
        return z, gates

    def _masked_logits(self, inputs: dict[str, torch.Tensor], index: int, gates) -> torch.Tensor:
        self._gates = gates
        try:
            return self.network(**inputs, task_ids=index)
        finally:
            self._gates = None

    # ------------------------------------------------------------------ training

    def begin_task(self, index: int, tasks: list) -> None:
        super().begin_task(index, tasks)
        if index > 0:
            freeze_ungated(self.network, self.gated)
            self.update_mask.set(self._weight_multipliers())

    def _weight_multipliers(self) -> dict[nn.Parameter, torch.Tensor]:
        modules = dict(self.network.named_modules())
        multipliers = {}
        for name in self.gated:
            out_used, in_used = self.used[name]
            multipliers[modules[name].weight] = 1 - out_used[:, None] * in_used[None, :]
            multipliers[modules[name].bias] = 1 - out_used
        return multipliers

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], index: int, progress: float
    ) -> torch.Tensor:
        config = self.config
        self._s = 1 / config.s_max + (config.s_max - 1 / config.s_max) * progress
        inputs = model_inputs(batch)
        z, gates = self.masks(inputs, self._s)
        loss = self.classification_loss(self._masked_logits(inputs, index, gates), batch["labels"])
        loss = (
            loss
            + config.sparsity * self.sparsity(gates)
            + config.triplet * batch_hard_triplet(z, batch["labels"], config.margin)
        )
        if self.importance:
            loss = loss + config.penalty / 2 * self.penalty()
        return loss

    def sparsity(self, gates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Mean mask density on the units earlier tasks left free: `Σ gate · (1 − a_<t) / Σ (1 − a_<t)` per example,
        averaged over the batch (positive: denser masks cost more)."""
        used, free = 0.0, 0.0
        for name, pair in gates.items():
            for side in (0, 1) if name in self.in_gated else (0,):
                available = 1 - self.used[name][side] if self.used else torch.ones_like(pair[side][0])
                used = used + (pair[side] * available).sum(1)
                free = free + available.sum()
        return (used / free).mean()

    def penalty(self) -> torch.Tensor:
        return sum(
            (self.importance[name] * (param - self.anchor[name]) ** 2).sum()
            for name, param in self.generator.named_parameters()
        )

    def before_optimizer_step(self) -> None:
        self.update_mask.before_step()

    def after_optimizer_step(self) -> None:
        self.update_mask.after_step()

    def end_task(self, index: int, tasks: list, retrain: Retrain) -> None:
        new = self.units_used(tasks[index].train)
        self.used = (
            {name: tuple(torch.maximum(old, now) for old, now in zip(self.used[name], new[name])) for name in new}
            if self.used
            else new
        )
        fisher = self.task_fisher(tasks[index].train, index)
        self.importance = (
            {name: self.config.decay * self.importance[name] + value for name, value in fisher.items()}
            if self.importance
            else fisher
        )
        self.anchor = {name: param.detach().clone() for name, param in self.generator.named_parameters()}

    @torch.no_grad()
    def units_used(self, dataset) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The largest gate each unit takes over `dataset` at s_max: `{name: (out (out,), in (in,))}`."""
        was_training = self.module.training
        self.module.eval()
        device = self.network.input_proj.weight.device
        used: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for batch in self.batches(dataset, 256):
            _, gates = self.masks(
                {name: value.to(device) for name, value in model_inputs(batch).items()}, self.config.s_max
            )
            for name, (out_gate, in_gate) in gates.items():
                now = (out_gate.amax(0), in_gate.amax(0))
                used[name] = tuple(torch.maximum(a, b) for a, b in zip(used[name], now)) if name in used else now
        self.module.train(was_training)
        return used

    def task_fisher(self, dataset, index: int) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the embedding network and generators on task `index`, measured from zero:
        the mean over at most `importance_samples` examples of each example's squared gradient of −log p(y | x)."""
        was_training = self.module.training
        self.module.eval()
        device = self.network.input_proj.weight.device
        samples = min(self.config.importance_samples, len(dataset))
        fisher = {name: torch.zeros_like(param) for name, param in self.generator.named_parameters()}
        for batch in self.batches(dataset.shuffle(seed=index).select(range(samples)), 1):
            inputs = {name: value.to(device) for name, value in model_inputs(batch).items()}
            _, gates = self.masks(inputs, self.config.s_max)
            loss = F.cross_entropy(self._masked_logits(inputs, index, gates).float(), batch["labels"].to(device))
            gradients = torch.autograd.grad(loss, list(self.generator.parameters()), allow_unused=True)
            for (name, _), gradient in zip(self.generator.named_parameters(), gradients):
                if gradient is not None:
                    fisher[name] += gradient**2
        self.module.train(was_training)
        return {name: value / samples for name, value in fisher.items()}

    # ------------------------------------------------------------------ evaluation

    def logits(self, inputs: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        _, gates = self.masks(inputs, self.config.s_max)
        return self._masked_logits(inputs, index, gates)

    def all_logits(self, inputs: dict[str, torch.Tensor], num_tasks: int) -> list[torch.Tensor]:
        """The masks depend on the input, not the task: one masked encoder pass read by every head."""
        _, gates = self.masks(inputs, self.config.s_max)
        self._gates = gates
        try:
            pooled = self.network.encode(**inputs)
        finally:
            self._gates = None
        return [self.network.head_logits(pooled, index) for index in range(num_tasks)]

    def parameter_counts(self, task_names: list[str]) -> dict:
        counts = super().parameter_counts(task_names)
        generator = sum(param.numel() for param in self.generator.parameters())
        return {**counts, "shared": counts["shared"] + generator, "total": counts["total"] + generator}
