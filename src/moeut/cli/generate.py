"""``moeut generate``: sample from a trained model, streaming the text to the terminal as tokens arrive.

    moeut generate --checkpoint runs/demo/moeut-tiny --prompt "Once upon a time"
    moeut generate --checkpoint RUN --prompt A --prompt B --temperature 0 --max-new-tokens 50
    moeut generate --checkpoint RUN --interactive            # a prompt loop (empty line or EOF ends it)
    moeut generate --checkpoint RUN --prompt A --repeats 4   # shared layers applied 4 times (depth at inference)

``--checkpoint`` is a run directory (newest checkpoint), a checkpoint file, or a directory written by
``moeut export-hf``. Generation uses the KV cache (:func:`moeut.model.generate.generate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from moeut.cli.common import UsageError, add_repeats_flag, add_run_flags, load_run_from_args, positive
from moeut.run import LoadedRun
from moeut.run.checkpoint import CorruptCheckpointError


HELP = "sample from a trained model, streaming tokens as they are produced"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Sample continuations of prompts from a trained model, streamed as they are generated."
    add_run_flags(parser)
    add_repeats_flag(parser)
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="prompt text (repeatable; an empty prompt starts a new document)")
    parser.add_argument("--interactive", action="store_true", help="read prompts from the terminal in a loop")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample from the k most likely tokens (default 40; 0 = all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep tokens holding this "
                        "much probability (default: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-document token")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line per prompt (prompt, completion, token ids) instead of streaming")


class TextStreamer:
    """Prints the text of a growing token sequence as tokens arrive.

    The whole sequence is decoded each time and only the new suffix is written, so pieces that change how
    their neighbours decode come out right; while the text ends in an incomplete UTF-8 sequence (byte-fallback
    pieces of one character), printing waits for the rest.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], out: TextIO, stop_id: int | None = None):
        self.tokenizer, self.out, self.stop_id = tokenizer, out, stop_id
        self.ids = list(prompt_ids)
        self.stopped = False
        self.printed = tokenizer.decode(self.ids)
        self.out.write(self.printed)
        self.out.flush()

    def __call__(self, next_tokens) -> None:
        """Receive one step's new token (a ``[1]`` tensor, as ``generate(on_token=...)`` passes it)."""
        t = int(next_tokens.reshape(-1)[0])
        if self.stopped or t == self.stop_id:
            self.stopped = True
            return
        self.ids.append(t)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        else:  # an earlier piece decodes differently now: print from where the texts diverge
            common = 0
            while common < min(len(text), len(self.printed)) and text[common] == self.printed[common]:
                common += 1
            self.out.write(text[common:])
        self.out.flush()
        self.printed = text

    def finish(self) -> None:
        """Flush what is left (even an incomplete character) and end the line."""
        self._emit(self.tokenizer.decode(self.ids))
        self.out.write("\n")
        self.out.flush()


def _prompt_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return ids if ids else [tokenizer.eos_id]  # an empty prompt: the start of a new document


def generate_text(run: LoadedRun, text: str, args: argparse.Namespace, out: TextIO | None) -> dict[str, Any]:
    """Generate one completion of ``text``; streamed to ``out`` when given. Returns prompt, completion, ids."""
    model, tok = run.model, run.tokenizer
    ids = _prompt_ids(tok, text)
    stop = None if args.ignore_eos else tok.eos_id
    if len(ids) + args.max_new_tokens > model.cfg.context_length:
        print(f"note: {len(ids)} prompt + {args.max_new_tokens} new tokens exceed the trained context of "
              f"{model.cfg.context_length} tokens", file=sys.stderr)
    streamer = TextStreamer(tok, ids, out, stop) if out is not None else None
    t0 = time.perf_counter()
    new = model.generate([ids], args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, top_p=args.top_p, eos_id=stop, seed=args.seed,
                         on_token=streamer)[0]
    dt = time.perf_counter() - t0
    if streamer is not None:
        streamer.finish()
        print(f"[{len(new)} tokens, {len(new) / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    body = [t for t in new if t != stop]
    return {"prompt": text, "completion": tok.decode(ids + body)[len(tok.decode(ids)):], "prompt_ids": ids,
            "new_ids": new, "stopped_at_eos": bool(new and stop is not None and new[-1] == stop),
            "seconds": dt}


def run(args: argparse.Namespace) -> int:
    if not args.prompt and not args.interactive:
        raise UsageError("nothing to do: pass --prompt TEXT (repeatable) or --interactive")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = no limit), got {args.top_k}")
    positive("repeats", args.repeats)
    try:
        loaded = load_run_from_args(args)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e}; to sample from another checkpoint, pass its file "
                                     f"(RUN/checkpoints/ckpt_*.pt) with --checkpoint") from e

    def one(text: str) -> None:
        if args.json:
            res = generate_text(loaded, text, args, None)
            print(json.dumps({k: res[k] for k in ("prompt", "completion", "prompt_ids", "new_ids", "stopped_at_eos")},
                             ensure_ascii=False), flush=True)
        else:
            generate_text(loaded, text, args, sys.stdout)

    for text in args.prompt:
        one(text)
    if args.interactive:
        if not args.json:
            print(f"moeut generate: {loaded.describe()}, {loaded.model.num_params() / 1e6:.1f}M parameters. "
                  f"Enter a prompt; an empty line or Ctrl-D ends.", file=sys.stderr)
        while True:
            try:
                text = input("> " if sys.stdin.isatty() else "")
            except (EOFError, KeyboardInterrupt):
                break
            if not text.strip():
                break
            one(text)
    return 0
