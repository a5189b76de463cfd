"""Activation checkpointing per layer *application* (``--activation-checkpointing [K]``), applied from outside
the model.

A universal transformer's activation memory grows with the number of layer applications (n_layers), not
the number of distinct layers (G), so the unit of recomputation is one application ``idx`` of a shared
layer: every K-th application (``idx % K == 0``; K = 1: all of them) keeps only its inputs in the forward
pass and is run again during the backward pass (:func:`torch.utils.checkpoint.checkpoint`,
``use_reentrant=False``, RNG state preserved, autocast state replayed).

Why the result is unchanged: a layer returns everything it computes for the loss and for logging (its
output, the routing logits feeding the regulariser, the selected expert indices feeding the routing
counts) and stores nothing on modules. The forward pass returns those values once; the recomputation in
the backward pass only rebuilds the tensors autograd saved and discards its outputs, so nothing is counted
twice. Wrapping the shared module itself (torchtitan's ``checkpoint_wrapper``) would rename the parameters
in the state dict and could not tell one application of a layer from another, hence the model's
:attr:`~moeut.model.base.LanguageModel.layer_runner` hook.

Once the layers are recomputed, the largest tensors left are the output head's: logits, log-softmax and their
gradients, each ``[tokens, vocab]`` fp32. So the head and the cross-entropy are recomputed too, in chunks of
tokens (:attr:`~moeut.model.base.LanguageModel.head_chunk_tokens`, :mod:`moeut.model.head_loss`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moeut.model.base import LanguageModel


class CheckpointEveryK:
    """A :data:`~moeut.model.base.LayerRunner` that recomputes every ``every``-th layer application."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"activation checkpointing every {every} layer applications: must be >= 1")
        self.every = every

    def __call__(self, idx: int, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if idx % self.every or not torch.is_grad_enabled():  # evaluation and generation: nothing to save
            return layer(*args, **kwargs)
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)


# Tokens per chunk of the recomputed output head + cross-entropy (:mod:`moeut.model.head_loss`): 1024 tokens ×
# a vocabulary of 8000 is a 33 MB fp32 chunk of logits, against 131 MB for a whole batch of 8 × 512.
HEAD_CHUNK_TOKENS = 1024


def apply_activation_checkpointing(model: nn.Module, every: int) -> None:
    """Recompute every ``every``-th layer application of ``model`` in the backward pass, and the output head
    with the cross-entropy in chunks of :data:`HEAD_CHUNK_TOKENS` tokens (0 = off, both)."""
    if not isinstance(model, LanguageModel):
        raise TypeError(f"activation checkpointing needs a moeut language model, got {type(model).__name__}")
    model.layer_runner = CheckpointEveryK(every) if every > 0 else None
    model.head_chunk_tokens = HEAD_CHUNK_TOKENS if every > 0 else 0
