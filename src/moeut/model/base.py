"""What every moeut language model shares (MoEUT, dense, SUT): the output of a forward pass and the methods
around it (sampling, parameter counts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeut.model.cache import KVCache
from moeut.model.generate import generate
from moeut.model.head_loss import chunked_cross_entropy, cross_entropy
from moeut.model.layer import LayerRouting


@dataclass
class LMOutput:
    """What a moeut language model returns.

    The regulariser and the routing counts are computed only in training mode or when the caller asks for
    the routing (``output_routing=True``); otherwise (plain evaluation, generation) both are None and
    nothing is spent on them. The logits never depend on it.
    """

    # [B, T, vocab]; None only when the forward pass got ``targets`` and ran the head in recomputed chunks
    # (:attr:`LanguageModel.head_chunk_tokens`), so that the logits of the whole batch never existed
    logits: torch.Tensor | None
    # scalar fp32, the auxiliary loss of the training objective: MoEUT γ·Σ_MLP + δ·Σ_attention entropy
    # regularisers (a zero tensor for dense), SUT mutual-information + ACT losses. None when not computed.
    reg_loss: torch.Tensor | None
    cache: KVCache | None = None  # updated cache when one was passed in
    # Routing statistics for logging, per layer application (no gradient): "ffn" [n_layers, N_E],
    # "att_v" and "att_o" [n_layers, H·N_A] (SUT: "ffn", "att"). None for the dense baseline and when the
    # regulariser is not computed.
    expert_counts: dict[str, torch.Tensor] | None = None
    # Only when asked for (analyses): the residual stream entering each layer application plus the final
    # one (n_layers + 1 tensors [B, T, d], before the output LayerNorm), and each application's routing
    # in application order (None entries for the dense baseline).
    hidden_states: list[torch.Tensor] | None = None
    routing: list[LayerRouting | None] | None = None
    # ACT models only (always, no gradient needed): each token's expected number of applications [B, T] fp32,
    # counting the first: MoEUT 1 … R group applications, SUT 1 … n_layers layer applications. Else None.
    depth: torch.Tensor | None = None
    # MoEUT-ACT only: each token's number of group applications that actually ran [B, T] fp32 — where it froze
    # under act_halting="skip", every application under "frozen" (a frozen token is still computed). Else None.
    executed_depth: torch.Tensor | None = None
    # Only when the forward pass got ``targets``: the mean next-token cross-entropy, fp32 (no regulariser).
    ce: torch.Tensor | None = None

    def loss(self, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """The training objective: mean next-token cross-entropy (fp32) plus ``reg_loss`` when it was computed
        (training mode or ``output_routing=True``). In plain eval mode it is the cross-entropy alone."""
        if self.logits is None:
            raise ValueError("this output has no logits (the head ran in chunks): use its `ce`")
        ce = cross_entropy(self.logits, targets, ignore_index)
        return ce if self.reg_loss is None else ce + self.reg_loss


# How a layer application is run: ``runner(application_index, layer, *args, **kwargs)`` returns what
# ``layer(*args, **kwargs)`` returns. Set from outside the model (activation checkpointing, see
# :mod:`moeut.train.activation_checkpointing`); it must not change the result, only how it is computed.
LayerRunner = Callable[..., Any]


class LanguageModel(nn.Module):
    """What every moeut language model offers around its forward pass (MoEUT, dense, SUT): sampling and
    parameter counts. Subclasses have ``embedding`` and an untied ``lm_head``, and run every layer application
    through :meth:`apply_layer`."""

    # None: call the layer. A component outside the model may set a :data:`LayerRunner` here (the model
    # itself stays single-device code that knows nothing of recomputation).
    layer_runner: LayerRunner | None = None
    # 0: the forward pass computes the whole batch's logits. > 0 (set from outside, with activation
    # checkpointing): when the forward pass gets ``targets``, the head and the cross-entropy run over chunks of
    # this many tokens, recomputed in the backward pass, and the output's logits are None.
    head_chunk_tokens: int = 0

    def apply_layer(self, idx: int, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run layer application ``idx`` (absolute, 0 … n_layers − 1) of the shared ``layer``."""
        if self.layer_runner is None:
            return layer(*args, **kwargs)
        return self.layer_runner(idx, layer, *args, **kwargs)

    def head(self, features: torch.Tensor, targets: torch.Tensor | None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, mean cross-entropy) of the output head on ``features`` (after the output norm). The
        cross-entropy only with ``targets``; the logits are None when the head runs in chunks."""
        if targets is None:
            return self.lm_head(features), None
        if self.head_chunk_tokens > 0 and torch.is_grad_enabled():
            return None, chunked_cross_entropy(self.lm_head, features, targets, self.head_chunk_tokens)
        logits = self.lm_head(features)
        return logits, cross_entropy(logits, targets)

    def generate(self, prompts, max_new_tokens: int, **kw) -> list[list[int]]:
        """Sample continuations of token-id prompts with the KV cache; see :func:`moeut.model.generate.generate`."""
        return generate(self, prompts, max_new_tokens, **kw)

    def set_repeats(self, repeats: int) -> "LanguageModel":
        """Apply the G shared layers ``repeats`` times from now on (depth at inference): the model's config
        becomes :meth:`ModelConfig.with_repeats` of it, so everything that reads ``cfg.n_layers`` (cache,
        analyses, accounting) sees the new depth. The weights are untouched. Returns the model."""
        self.cfg = self.cfg.with_repeats(repeats)
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embedding.weight.numel() + self.lm_head.weight.numel() + self.lm_head.bias.numel()
        return n
