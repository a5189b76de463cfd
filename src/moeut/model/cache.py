"""Key/value cache for incremental decoding.

A shared layer runs n_layers/G times per token, and each application has its own keys and values, so the
cache is keyed by the *absolute* layer application ``r·G + g`` (not by the module). Keys are stored
already rotated at their absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [B, H, T_past, d_h]


@dataclass
class KVCache:
    layers: dict[int, LayerKV] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of cached positions (0 when empty)."""
        for k, _ in self.layers.values():
            return k.shape[2]
        return 0

    def get(self, layer_application: int) -> LayerKV | None:
        return self.layers.get(layer_application)
