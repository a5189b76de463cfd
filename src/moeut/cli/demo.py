"""``moeut demo``: the main job in one command — tokenizer, shards, training, validation perplexity, a sample.

Everything lands in one run directory (default ``runs/demo``): ``data/`` (tokenizer and shards) and one
training run per model. Re-running the command continues or re-reports the same runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from moeut.data import prepare
from moeut.fileio import atomic_write_json
from moeut.run import load_run
from moeut.runtime import tune_malloc
from moeut.train import TrainConfig, train

HELP = "the main job: tokenizer + shards, train moeut-tiny, validation perplexity, a sample (about 9 minutes on 2 CPU cores)"
DEMO_PROMPT = "Once upon a time, there was a little"


def add_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--input", nargs="+", default=None, metavar="PATH",
                      help="text to train on (default: the built-in corpus; see `moeut prepare --help`)")
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--seq-len", type=int, default=256)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--compare-dense", action="store_true", help="also train dense-tiny on the same tokens")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--max-new-tokens", type=int, default=60)
    demo.add_argument("--backend", default=None, help="expert-matmul backend (default: automatic)")


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, inputs=args.input, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
             lr=args.lr, seed=args.seed, compare_dense=args.compare_dense, prompt=args.prompt,
             max_new_tokens=args.max_new_tokens, backend=args.backend)
    return 0


def run_demo(out: str | Path = "runs/demo", *, inputs: list[str] | None = None, steps: int = 500,
             batch_size: int = 16, seq_len: int = 256, lr: float = 2e-3, seed: int = 0,
             compare_dense: bool = False, prompt: str = DEMO_PROMPT, max_new_tokens: int = 60,
             backend: str | None = None) -> dict[str, Any]:
    tune_malloc()
    out = Path(out)
    t_start = time.perf_counter()
    data = out / "data"
    if (data / "prepare.json").exists():
        print(f"[1/3] using the prepared data in {data}")
    else:
        print(f"[1/3] training a BPE-8000 tokenizer and writing token shards to {data}"
              + ("" if inputs else " (built-in corpus: Wikipedia, C4, TinyStories, code)"))
        prepare(inputs, data, val_fraction=0.05, seed=seed)

    presets = ["moeut-tiny"] + (["dense-tiny"] if compare_dense else [])
    results: dict[str, dict[str, Any]] = {}
    for i, preset in enumerate(presets):
        print(f"\n[2/3] training {preset} for {steps} steps ({steps * batch_size * seq_len:,} tokens)"
              + (" — the dense baseline on the same tokens" if i else ""))
        cfg = TrainConfig(preset=preset, data=str(data), out=str(out / preset), steps=steps, batch_size=batch_size,
                          seq_len=seq_len, lr=lr, warmup_steps=min(50, steps // 10), eval_every=max(1, steps // 5),
                          eval_batches=8, save_every=max(1, steps // 5), seed=seed, backend=backend)
        results[preset] = train(cfg, resume=True)

    print("\n[3/3] sampling from moeut-tiny with the KV cache")
    loaded = load_run(out / "moeut-tiny", device="cpu", backend=backend)
    tokenizer = loaded.tokenizer
    ids = tokenizer.encode(prompt)
    new = loaded.model.generate([ids], max_new_tokens, temperature=0.8, top_k=40, seed=seed,
                                eos_id=tokenizer.eos_id)[0]
    sample = tokenizer.decode(ids + [t for t in new if t != tokenizer.eos_id])
    print(f"\n--- sample ---\n{sample}\n--------------")

    print(f"\n{'model':<12}{'params':>9}{'active/tok':>12}{'val ppl':>10}{'tok/s':>9}{'train s':>9}")
    for preset, s in results.items():
        print(f"{preset:<12}{s['params_total'] / 1e6:>8.2f}M{s['active_params_per_token'] / 1e6:>11.2f}M"
              f"{s['val_ppl']:>10.2f}{s['tok_per_s']:>9,.0f}{s['wall_time_s']:>9.0f}")
    summary = {"runs": results, "sample": sample, "prompt": prompt, "wall_time_s": time.perf_counter() - t_start,
               "torch": torch.__version__}
    atomic_write_json(out / "demo.json", summary)
    print(f"\neverything is in {out}/ (summary: {out / 'demo.json'})")
    return summary
