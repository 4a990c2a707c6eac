"""The network every baseline trains: a plain transformer encoder of DTG-MA's shape with one head per task.

Same input path, widths, depth, heads, feed-forward size, dropout, initialisation and heads (LayerNorm + Linear) as
`DTGMAModel` built from the same `DTGMAConfig`; what differs is the method: no task tokens and no task-graph mask,
the encoder is shared by all tasks, and each head reads the masked mean of the final token states. The projections
are `nn.Linear` modules named `input_proj`, `layers.{i}.{q,k,v,o,fc1,fc2}`, the names PEFT targets and HAT / PackNet
gate or prune.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_dtgma import DTGMAConfig
from ..modeling_dtgma import DTGMALayer, DTGMATaskHead, PatchEmbedder, masked_mean

PROJECTIONS = ("q", "k", "v", "o", "fc1", "fc2")


class EncoderLayer(DTGMALayer):
    """`DTGMALayer`'s modules (pre-norm multi-head self-attention + feed-forward) over input tokens only: no task
    tokens, no task-graph mask, only padding masked."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`x (B, N, D)`, additive padding mask `(B, 1, 1, N)` → `(B, N, D)`."""
        batch, length, hidden = x.shape

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, H, N, d)

        normed = self.attn_norm(x)
        context = F.scaled_dot_product_attention(
            heads(self.q(normed)), heads(self.k(normed)), heads(self.v(normed)), attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        x = x + self.dropout(self.o(context.transpose(1, 2).reshape(batch, length, hidden)))
        return x + self.dropout(self.fc2(self.act(self.fc1(self.ffn_norm(x)))))


class MultiHeadEncoder(nn.Module):
    """Shared encoder + one head per task, on token features or (with `config.image_size`) images.

    Example:

    ```python
    >>> network = MultiHeadEncoder(DTGMAConfig(input_dim=384, hidden_size=64, num_layers=1, num_heads=2))
    >>> network.add_head(3)
    0
    >>> network(inputs_embeds=torch.randn(2, 5, 384), task_ids=0).shape
    torch.Size([2, 3])
    ```
    """

    def __init__(self, config: DTGMAConfig):
        super().__init__()
        self.config = config
        if config.image_size is not None:
            self.patch_embed = PatchEmbedder(
                config.image_size, config.patch_size, config.num_channels, config.input_dim
            )
        self.input_norm = nn.LayerNorm(config.input_dim, eps=config.layer_norm_eps)
        self.input_proj = nn.Linear(config.input_dim, config.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.heads = nn.ModuleList()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """`DTGMAModel`'s initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def add_head(self, num_labels: int) -> int:
        """Append a task head (LayerNorm + Linear to `num_labels`) on the encoder's device; returns its task id."""
        head = DTGMATaskHead(self.config, num_labels)
        head.apply(self._init_weights)
        self.heads.append(head.to(self.input_proj.weight.device))
        return len(self.heads) - 1

    def encoder_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every named parameter shared by all tasks (everything but the heads)."""
        return [(name, param) for name, param in self.named_parameters() if not name.startswith("heads.")]

    def encode_tokens(
        self,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features `(B, N, input_dim)` (+ mask `(B, N)`) or images `(B, C, H, W)` → the final token states
        `(B, N, D)` and which tokens are real `(B, N)` (bool)."""
        if pixel_values is not None:
            inputs_embeds, attention_mask = self.patch_embed(pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        x = self.input_proj(self.input_norm(inputs_embeds.to(self.input_proj.weight.dtype)))
        real = attention_mask.to(x.device).bool()
        mask = torch.zeros((), dtype=x.dtype, device=x.device).masked_fill(~real, float("-inf"))[:, None, None]
        for layer in self.layers:
            x = layer(x, mask)
        return x, real

    def encode(
        self,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token features `(B, N, input_dim)` (+ mask `(B, N)`) or images `(B, C, H, W)` → pooled states `(B, D)`."""
        return masked_mean(*self.encode_tokens(inputs_embeds, attention_mask, pixel_values))

    def classify(self, pooled: torch.Tensor, task_ids: int | torch.Tensor) -> torch.Tensor:
        """Pooled states `(B, D)` → logits: `(B, L_t)` of head `task_ids` (an int), or `(B, L_max)` with each row's
        own head for a `(B,)` tensor of task ids (labels a task lacks are -inf)."""
        if isinstance(task_ids, int):
            return self.head_logits(pooled, task_ids)
        max_labels = max(head.classifier.out_features for head in self.heads)
        logits = pooled.new_full((pooled.shape[0], max_labels), float("-inf"))
        for task in task_ids.unique().tolist():
            rows = (task_ids == task).nonzero().squeeze(1)
            task_logits = self.head_logits(pooled.index_select(0, rows), task)
            logits = logits.index_put(
                (rows[:, None], torch.arange(task_logits.shape[1], device=rows.device)), task_logits
            )
        return logits

    def head_logits(self, pooled: torch.Tensor, task: int) -> torch.Tensor:
        """Head `task` on pooled states `(B, D)` → `(B, L_task)`."""
        head = self.heads[task]
        return head.classifier(head.norm(pooled))

    def forward(
        self,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        task_ids: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Logits of head `task_ids` (see `classify`)."""
        return self.classify(self.encode(inputs_embeds, attention_mask, pixel_values), task_ids)

