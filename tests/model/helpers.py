from __future__ import annotations

from moeut.model import ModelConfig


def tiny_config(arch: str = "moeut", **kw) -> ModelConfig:
    """A few-thousand-parameter model for fast tests (odd sizes on purpose)."""
    if arch == "dense":
        base = dict(arch="dense", vocab_size=53, d_model=24, n_layers=3, group_size=3, n_heads=3, d_head=10,
                    d_ff=40)
    else:
        base = dict(arch="moeut", vocab_size=53, d_model=24, n_layers=6, group_size=2, n_heads=3, d_head=10,
                    att_n_experts=3, att_k=2, ff_n_experts=7, ff_expert_size=8, ff_k=3)
    return ModelConfig(**{**base, **kw})


def sut_config(**kw) -> ModelConfig:
    """A tiny SUT (4 applications of one layer) for fast tests."""
    base = dict(arch="sut", vocab_size=53, d_model=24, n_layers=4, group_size=1, n_heads=2, d_head=6,
                att_n_experts=4, att_k=2, ff_n_experts=7, ff_expert_size=8, ff_k=3, rel_pos_max=5)
    return ModelConfig(**{**base, **kw})


def decode_in_steps(model, tokens, mask, prefill: int, repeats=None, field: str = "depth"):
    """Prefill ``prefill`` tokens into an empty KV cache, then decode the rest one token at a time (``mask``: the
    left-padding attention mask of the whole sequence). Returns the logits and ``field`` of every position, each
    concatenated over the calls, as the full pass would give them."""
    import torch

    from moeut.model import KVCache

    out = model(tokens[:, :prefill], attention_mask=mask[:, :prefill], cache=KVCache(), repeats=repeats)
    logits, values, cache = [out.logits], [getattr(out, field)], out.cache
    for t in range(prefill, tokens.shape[1]):
        out = model(tokens[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, repeats=repeats)
        logits.append(out.logits)
        values.append(getattr(out, field))
        cache = out.cache
    return torch.cat(logits, 1), torch.cat(values, 1)
