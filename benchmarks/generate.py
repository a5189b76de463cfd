"""Generation speed with and without the KV cache: 512 new tokens from ``moeut-small`` (random init).

Prints one JSON object to stdout. ``python benchmarks/generate.py`` (defaults: moeut-small, a 16-token
prompt, 512 new tokens, greedy, batch 1, CPU) or e.g. ``--device cuda``, ``--threads 1``, ``--quick``.

Without the cache every step re-runs the whole sequence (``generate(..., use_cache=False)``), so its cost
grows with the length; with it each step runs one token against the cached keys and values of every layer
application. Both runs are greedy from the same prompt; ``identical_tokens`` says whether they agree (with
random weights near-ties can differ in the last bits, which the tests check on sharper models).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="moeut-small")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--backend", default=None, help="expert-matmul backend (default automatic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="64 new tokens: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens = 64

    from moeut.runtime import tune_malloc

    malloc_tuned = tune_malloc()
    import torch

    from moeut.model import ModelConfig, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_name(args.preset)
    model = build_model(cfg, backend=args.backend).to(device).eval()
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(4, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()

    def run(use_cache: bool, n: int) -> tuple[float, list[list[int]]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompts, n, temperature=0, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    run(True, 8)  # warm-up (allocator, kernels)
    run(False, 8)
    t_cache, with_cache = run(True, args.new_tokens)
    t_plain, without = run(False, args.new_tokens)
    new = args.batch * args.new_tokens
    diverge = next((i for i, (a, b) in enumerate(zip(with_cache[0], without[0])) if a != b), None)
    result = {
        "benchmark": "generate",
        "preset": args.preset,
        "params": model.num_params(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "backend": args.backend or "auto",
        "batch": args.batch,
        "prompt_tokens": args.prompt_len,
        "new_tokens": args.new_tokens,
        "with_cache": {"seconds": round(t_cache, 3), "tokens_per_s": round(new / t_cache, 1)},
        "without_cache": {"seconds": round(t_plain, 3), "tokens_per_s": round(new / t_plain, 1)},
        "speedup": round(t_plain / t_cache, 2),
        "identical_tokens": with_cache == without,
        "first_divergence": diverge,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "malloc_tuned": malloc_tuned,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
