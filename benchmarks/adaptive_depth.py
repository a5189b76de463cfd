"""What adaptive depth saves: the adaptive preset (halted tokens skip their work) with halting forced to a mean
depth, against fixed-depth MoEUT and the dense baseline — training-step time, executed MACs per token, decoding.

For ``moeut-tiny-adaptive`` (at most 4 group applications) the halting gate is overridden
(:func:`moeut.model.act.forcing_depth`): every token halts at a depth drawn so that the mean is the target —
uniform over ``{lo, …, hi}`` with ``lo + hi = 2·mean`` as wide as the maximum allows (mean 2 of 4: 1, 2 or 3; mean
1.5: 1 or 2; mean 3: 2, 3 or 4), or the two integers around the mean when that is not possible. The rows:

* ``step_ms``: one training step as ``moeut train`` runs it (:func:`moeut.train.train_step`: forward, loss,
  backward, clipping, AdamW) on a new random batch, median of the timed steps; the median over ``--rounds``
  interleaved rounds (every configuration once per round, so a busy moment hits them alike);
* ``layer_macs_per_token`` / ``macs_per_token``: forward MACs per token that ran, of the layers alone and with the
  output head (:func:`moeut.model.accounting.executed_macs_per_token`; the fixed-depth models' ``moeut info``);
* ``decode_tok_per_s``: greedy decoding with the KV cache, ``--decode-batch`` sequences from a one-token prompt,
  new tokens per second (each new token's depth drawn as above).

Prints one JSON object with ``rows`` ``{"model", "mean_depth", "max_depth", "step_ms", "layer_macs_per_token",
"macs_per_token", "decode_tok_per_s"}`` and ``ratios``: each adaptive row against the adaptive model at full depth.

    python benchmarks/adaptive_depth.py                   # CPU, 16 x 256, fp32, 3 rounds
    python benchmarks/adaptive_depth.py --quick           # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)

import torch  # noqa: E402

from moeut.model import KVCache, ModelConfig, build_model  # noqa: E402
from moeut.model.accounting import executed_macs_per_token, model_stats  # noqa: E402
from moeut.model.act import forcing_depth  # noqa: E402
from moeut.runtime import cpu_model, tune_malloc  # noqa: E402
from moeut.train import train_step  # noqa: E402

ADAPTIVE = "moeut-tiny-adaptive"
FIXED = ("moeut-tiny", "dense-tiny")


def depth_support(mean: float, max_depth: int) -> list[int]:
    """The depths a token draws from (uniformly) for a forced mean depth."""
    if not 1 <= mean <= max_depth:
        raise ValueError(f"mean depth {mean} outside 1 … {max_depth}")
    lo = max(1, math.ceil(2 * mean - max_depth))
    hi = 2 * mean - lo
    if hi == int(hi):
        return list(range(lo, int(hi) + 1))
    return [math.floor(mean), math.ceil(mean)]  # weights below make the mean exact


def draw_depths(mean: float, max_depth: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Per-token forced depths ``shape`` with the given mean (in expectation; exactly for the uniform case)."""
    support = depth_support(mean, max_depth)
    if len(support) == 2 and support[0] + support[1] != 2 * mean:
        p_hi = mean - support[0]
        return support[0] + (torch.rand(shape, generator=gen) < p_hi).long()
    return torch.tensor(support)[torch.randint(len(support), shape, generator=gen)]


class Config:
    """One row: a preset and, for the adaptive one, a forced mean depth."""

    def __init__(self, preset: str, mean_depth: float | None, args: argparse.Namespace):
        self.preset, self.mean = preset, mean_depth
        torch.manual_seed(0)
        self.cfg = ModelConfig.from_name(preset)
        self.model = build_model(self.cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=2.5e-4, weight_decay=0.01)
        self.max_depth = self.cfg.n_repeats
        self.gen = torch.Generator().manual_seed(1)
        self.args = args
        self.step_ms: list[float] = []
        self.executed: list[torch.Tensor] = []

    @property
    def forced(self) -> bool:
        return self.mean is not None

    def _depths(self, shape: tuple[int, ...]) -> torch.Tensor:
        return draw_depths(self.mean, self.max_depth, shape, self.gen)

    def time_steps(self) -> None:
        a = self.args
        for i in range(a.warmup + a.reps):
            batch = torch.randint(0, self.cfg.vocab_size, (a.batch, a.seq_len + 1), generator=self.gen)
            depth = self._depths((a.batch, a.seq_len)) if self.forced else None
            start = time.perf_counter()
            if self.forced:
                with forcing_depth(self.model, depth):
                    train_step(self.model, self.opt, batch, grad_clip=0.25)
            else:
                train_step(self.model, self.opt, batch, grad_clip=0.25)
            if i >= a.warmup:
                self.step_ms.append((time.perf_counter() - start) * 1e3)
                if self.forced:
                    self.executed.append(depth.flatten().float())

    @torch.no_grad()
    def decode_tok_per_s(self) -> float:
        a = self.args
        self.model.eval()
        tokens = torch.randint(0, self.cfg.vocab_size, (a.decode_batch, 1), generator=self.gen)
        cache, n_new = KVCache(), a.decode_tokens
        start = time.perf_counter()
        for _ in range(n_new):
            if self.forced:
                with forcing_depth(self.model, self._depths(tuple(tokens.shape))):
                    out = self.model(tokens, cache=cache)
            else:
                out = self.model(tokens, cache=cache)
            cache, tokens = out.cache, out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        self.model.train()
        return a.decode_batch * n_new / elapsed

    def row(self, decode: float) -> dict:
        if self.forced:
            macs = executed_macs_per_token(self.cfg, torch.cat(self.executed), self.args.seq_len)
            mean = torch.cat(self.executed).mean().item()
        else:
            st = model_stats(self.cfg, self.args.seq_len)
            macs = {"layer_macs_per_token": st["macs_per_token_layers"], "macs_per_token": st["macs_per_token"]}
            mean = self.cfg.n_repeats if self.cfg.is_moe else 1
        return {"model": self.preset, "mean_depth": round(mean, 4), "max_depth": self.max_depth,
                "step_ms": round(statistics.median(self.step_ms), 2),
                "layer_macs_per_token": round(macs["layer_macs_per_token"]),
                "macs_per_token": round(macs["macs_per_token"]), "decode_tok_per_s": round(decode, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=float, nargs="+", default=[1, 1.5, 2, 3, 4],
                    help="forced mean depths of the adaptive preset (group applications, of at most 4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 x 32, 1 rep, 1 round, 4 decoded tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.warmup, args.reps, args.rounds = 2, 32, 1, 1, 1
        args.decode_batch, args.decode_tokens = 2, 4
    tuned = tune_malloc()
    configs = [Config(ADAPTIVE, m, args) for m in args.depths] + [Config(p, None, args) for p in FIXED]
    decode = {id(c): [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            print(f"round {r + 1}/{args.rounds}: {c.preset} mean depth {c.mean}", file=sys.stderr, flush=True)
            c.time_steps()
            decode[id(c)].append(c.decode_tok_per_s())
    rows = [c.row(statistics.median(decode[id(c)])) for c in configs]
    full = next((r for r in rows if r["model"] == ADAPTIVE and r["mean_depth"] == 4.0), None)
    ratios = []
    if full is not None:
        for r in rows:
            if r["model"] == ADAPTIVE:
                ratios.append({"mean_depth": r["mean_depth"],
                               "step_time": round(r["step_ms"] / full["step_ms"], 3),
                               "layer_macs": round(r["layer_macs_per_token"] / full["layer_macs_per_token"], 3),
                               "macs": round(r["macs_per_token"] / full["macs_per_token"], 3)})
    print(json.dumps({"machine": {"cpu": cpu_model(), "platform": platform.platform(), "torch": torch.__version__,
                                  "threads": torch.get_num_threads(), "malloc_tuned": tuned},
                      "setup": {"batch": args.batch, "seq_len": args.seq_len, "reps": args.reps,
                                "rounds": args.rounds, "precision": "fp32"},
                      "rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
