"""Autoregressive sampling with the KV cache: greedy, temperature, top-k, top-p, EOS, left-padded batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from moeut.model.cache import KVCache


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from ``logits`` ``[B, V]``: argmax when ``temperature == 0``, else sample from
    the temperature-scaled distribution restricted to the top-k tokens and the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (keeps the top one)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None, pad_id: int = 0, use_cache: bool = True,
             repeats: int | None = None, on_token: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens per prompt.

    Prompts of different lengths are left-padded and masked (RoPE positions count real tokens only), so
    a batch gives the same tokens as running each prompt alone. ``temperature=0`` is greedy. A row stops
    at ``eos_id`` (which is included). ``on_token`` receives each step's ``[B]`` new tokens (streaming).
    ``use_cache=False`` recomputes the whole sequence every step (a slow check of the cache). ``repeats``:
    apply the shared layers that many times (depth at inference; None = the model's configured depth).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt (token ids)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[i, T - len(p):] = 1
    padded = bool((mask == 0).any())

    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache() if use_cache else None
    step_input, full = tokens, tokens
    for _ in range(max_new_tokens):
        if use_cache:
            res = model(step_input, cache=cache, attention_mask=mask if padded else None, repeats=repeats)
            cache = res.cache
        else:
            res = model(full, attention_mask=mask if padded else None, repeats=repeats)
        nxt = sample_next(res.logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        if on_token is not None:
            on_token(nxt)
        for i in range(B):
            if not done[i]:
                out[i].append(int(nxt[i]))
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()):
            break
        step_input = nxt[:, None]
        full = torch.cat([full, step_input], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
    model.train(was_training)
    return out
