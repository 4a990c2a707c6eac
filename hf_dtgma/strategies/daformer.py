"""`daformer`, DAFormer (Wang et al., IEEE TMM): dual attention in the final encoder block of a DyTox-style model,
with K-nearest-neighbour-invariant distillation.

The mechanism, from the paper (DAFormer-M, one external key set per task):

* The last self-attention block attends twice with the same queries: over the sample's own tokens (sample-dependent
  keys and values: ordinary attention) and over learned key/value slots that belong to no sample (sample-agnostic
  memory). Each task adds `memory_slots` new key/value slots; earlier tasks' slots are frozen, so what they stored
  stays, while the new slots absorb the new task.
* K-nearest-neighbour-invariant distillation: for each example of a batch, its k nearest neighbours in the old
  model's feature space (cosine, within the batch); the new model must keep the same neighbourhood, i.e. the same
  distribution of similarities over those k neighbours (KL of the temperature-τ softmaxes), on the encoder's
  mean-pooled token states. The authors' public code omits this term; it is here.
* Everything else is DyTox's (`hf_dtgma.strategies.dytox`): task tokens read by the Task-Attention Block, per-task
  sigmoid heads, the divergence head, logit distillation weighted by old/total classes, a herded rehearsal memory
  (`memory_per_class`) and class-balanced fine-tuning.

What changes, and why: the two attentions' contexts are summed before the block's output projection (one
projection, as the baselines' blocks); the memory slots live in key and value space directly (no projection of a
sample-agnostic slot is needed); the neighbourhoods are taken within each training batch (rehearsed examples
included), not over the whole data set, so the term costs one B×B similarity matrix per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_dtgma import DTGMAConfig
from ..modeling_dtgma import masked_mean
from .dytox import DyToxConfig, DyToxNetwork, DyToxStrategy
from .network import EncoderLayer


class DualAttentionLayer(EncoderLayer):
    """A self-attention block whose queries also read learned, sample-agnostic key/value slots (one set per task)."""

    def __init__(self, config: DTGMAConfig):
        super().__init__(config)
        self.memory_keys = nn.ParameterList()
        self.memory_values = nn.ParameterList()

    def add_memory(self, slots: int, scale: float) -> None:
        """A new task's `slots` key and value vectors, ~ N(0, scale)."""
        device, hidden = self.q.weight.device, self.q.out_features
        self.memory_keys.append(nn.Parameter(torch.randn(slots, hidden, device=device) * scale))
        self.memory_values.append(nn.Parameter(torch.randn(slots, hidden, device=device) * scale))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`x (B, N, D)`, additive padding mask `(B, 1, 1, N)` → `(B, N, D)`."""
        batch, length, hidden = x.shape

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(states.shape[0], states.shape[1], self.num_heads, -1).transpose(1, 2)

        normed = self.attn_norm(x)
        queries = heads(self.q(normed))
        dropout = self.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(
            queries, heads(self.k(normed)), heads(self.v(normed)), attn_mask=mask, dropout_p=dropout
        )
        if len(self.memory_keys):
            keys = heads(torch.cat(list(self.memory_keys))[None].to(x.dtype)).expand(batch, -1, -1, -1)
            values = heads(torch.cat(list(self.memory_values))[None].to(x.dtype)).expand(batch, -1, -1, -1)
            context = context + F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout)
        x = x + self.dropout(self.o(context.transpose(1, 2).reshape(batch, length, hidden)))
        return x + self.dropout(self.fc2(self.act(self.fc1(self.ffn_norm(x)))))


class DAFormerNetwork(DyToxNetwork):
    """DyTox's network with `DualAttentionLayer` as its last self-attention block (needs `num_layers >= 2`); each
    task adds `memory_slots` key/value slots to it."""

    def __init__(self, config: DTGMAConfig, memory_slots: int = 8):
        if config.num_layers < 2:
            raise ValueError(
                f"DAFormer puts its dual attention in the last self-attention block before the task-attention block, "
                f"so it needs num_layers >= 2 (got {config.num_layers}); pass --num-layers 2 or more."
            )
        super().__init__(config)
        self.memory_slots = memory_slots
        self.layers[-1] = DualAttentionLayer(config)
        self.layers[-1].apply(self._init_weights)

    @property
    def dual(self) -> DualAttentionLayer:
        return self.layers[-1]

    def add_task(self, num_labels: int) -> int:
        self.dual.add_memory(self.memory_slots, self.config.initializer_range)
        return super().add_task(num_labels)

    def encoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, param) for name, param in super().encoder_parameters() if ".memory_" not in name]


@dataclass
class DAFormerConfig(DyToxConfig):
    """DyTox's hyperparameters, and:
    memory_slots: learned key/value slots each task adds to the dual attention.
    knn: neighbours per example kept by the KNN-invariant distillation.
    knn_weight: weight of that term.
    knn_tau: temperature of the neighbour similarity distributions.
    """

    memory_slots: int = 8
    knn: int = 5
    knn_weight: float = 1.0
    knn_tau: float = 0.1


def knn_invariant_distillation(new: torch.Tensor, old: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """KL between each example's similarity distribution over its k nearest neighbours in `old (B, F)` under the old
    and the new features `new (B, F)` (cosine similarities, temperature `tau`). 0 for a batch of one."""
    batch = new.shape[0]
    k = min(k, batch - 1)
    if k < 1:
        return new.new_zeros(())
    old, new = F.normalize(old.float(), dim=1), F.normalize(new.float(), dim=1)
    self_pairs = torch.eye(batch, dtype=torch.bool, device=new.device)
    old_similarity = (old @ old.T).masked_fill(self_pairs, float("-inf"))
    neighbours = old_similarity.topk(k, dim=1).indices  # (B, k)
    target = F.log_softmax(old_similarity.gather(1, neighbours) / tau, dim=1)
    prediction = F.log_softmax((new @ new.T).gather(1, neighbours) / tau, dim=1)
    return F.kl_div(prediction, target, reduction="batchmean", log_target=True)


class DAFormerStrategy(DyToxStrategy):
    name: ClassVar[str] = "daformer"
    config_class: ClassVar[type] = DAFormerConfig

    def build_network(self) -> DAFormerNetwork:
        return DAFormerNetwork(self.model_config, memory_slots=self.config.memory_slots)

    def begin_task(self, index: int, tasks: list) -> None:
        super().begin_task(index, tasks)
        for number, (keys, values) in enumerate(zip(self.network.dual.memory_keys, self.network.dual.memory_values)):
            keys.requires_grad_(number == index)
            values.requires_grad_(number == index)

    def feature_distillation(self, x: torch.Tensor, teacher_x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        config = self.config
        return config.knn_weight * knn_invariant_distillation(
            masked_mean(x, real), masked_mean(teacher_x, real), config.knn, config.knn_tau
        )

    def parameter_counts(self, task_names: list[str]) -> dict:
        counts = super().parameter_counts(task_names)
        dual = self.network.dual
        for index, name in enumerate(task_names):
            counts["per_task"][name] += dual.memory_keys[index].numel() + dual.memory_values[index].numel()
        counts["total"] = counts["shared"] + sum(counts["per_task"].values())
        return counts
