"""A tiny trained-looking run directory (SentencePiece tokenizer + checkpoint) for the integration tests."""

from __future__ import annotations

from pathlib import Path

import torch

from moeut.data.tokenizer import TokenizerConfig, train_tokenizer
from moeut.model import ModelConfig, build_model
from moeut.run.checkpoint import save_checkpoint
from tests.data.helpers import make_documents

# odd sizes on purpose: RoPE on 4 of 10 channels, 3 heads, 7 experts, 6 applications of 2 shared layers
TINY = {
    "moeut": dict(arch="moeut", d_model=24, n_layers=6, group_size=2, n_heads=3, d_head=10, att_n_experts=3,
                  att_k=2, ff_n_experts=7, ff_expert_size=8, ff_k=3, context_length=64),
    "dense": dict(arch="dense", d_model=24, n_layers=3, group_size=3, n_heads=3, d_head=10, d_ff=40,
                  context_length=64),
}
STEP = 7


def logits_tol(want: torch.Tensor) -> float:
    """How far the exported model's fp32 logits may be from moeut's: 1e-5 plus 4e-6 (about 30 fp32 ulps) of
    the largest logit. The two implementations sum each token's expert outputs in different orders (moeut's
    CPU path with an embedding bag, the export with its own unsort), so they agree to rounding, not bitwise."""
    return 1e-5 + 4e-6 * want.abs().max().item()


def make_tokenizer(root: Path):
    return train_tokenizer(make_documents(300), root, TokenizerConfig(vocab_size=400))


def make_run(run_dir: Path, tokenizer, arch: str = "moeut", seed: int = 0, cfg: ModelConfig | None = None) -> Path:
    """Write ``run_dir`` like `moeut train` does: tokenizer files and ``checkpoints/ckpt_*.pt``; the model is
    ``cfg`` (any arch) or the tiny preset of ``arch``."""
    cfg = cfg or ModelConfig(vocab_size=tokenizer.vocab_size, **TINY[arch])
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # a sharper next-token distribution: greedy paths far from ties
        model.lm_head.weight.mul_(20)
    tokenizer.save(run_dir)
    save_checkpoint(run_dir, STEP, {"model": model.state_dict(), "model_config": cfg.to_json(), "train_config": "{}",
                                    "tokenizer_sha256": tokenizer.sha256})
    return run_dir


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` as one left-padded batch and its attention mask, as transformers' generate() takes them."""
    width = max(map(len, prompts))
    tokens = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return tokens, mask


def until_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    """Each row cut after its first ``eos`` (included): moeut stops a row there, transformers pads it."""
    return [r[:r.index(eos) + 1] if eos in r else r for r in rows]
