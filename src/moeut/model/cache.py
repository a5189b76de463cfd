"""Key/value cache for incremental decoding.

A shared layer runs n_layers/G times per token (``repeats`` times when the depth is chosen at inference),
and each application has its own keys and values, so the cache is keyed by the *absolute* layer application
``r·G + g`` (not by the module). Keys are stored already rotated at their absolute positions.
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

    def check_depth(self, applications: int) -> None:
        """Raise unless the cache is empty or holds exactly ``applications`` layer applications (decoding must
        keep the depth, ``repeats``, that filled the cache)."""
        if self.layers and len(self.layers) != applications:
            raise ValueError(f"the KV cache holds {len(self.layers)} layer applications but this forward pass runs "
                             f"{applications}: decode with the same repeats that built the cache")
