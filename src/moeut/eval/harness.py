"""lm-evaluation-harness client: a ``TemplateLM`` registered as ``"moeut"``, and offline local tasks.

Needs the ``eval`` extra (``pip install 'moeut[eval]'``, i.e. ``lm-eval>=0.4,<0.5``). Importing this module
registers the model::

    import lm_eval, moeut.eval.harness
    lm_eval.simple_evaluate(model="moeut", model_args="pretrained=runs/44m", tasks=["piqa"],
                            task_manager=moeut.eval.harness.task_manager())

or use :func:`run_harness` (what ``moeut eval --harness`` does). Log-likelihoods come from
:func:`moeut.eval.scoring.score_candidates`: requests sharing a context are batched with that context run
once. Tokenisation is lm-eval's own (``TemplateLM._encode_pair``: the context and the whole string are
encoded, the continuation is the difference); an empty context becomes EOS, moeut's document separator.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from moeut.data.errors import DependencyError

    raise DependencyError("lm-evaluation-harness is not installed: pip install 'moeut[eval]' "
                          f"(lm-eval>=0.4,<0.5) to use `moeut eval --harness` ({e})") from None

import torch
from tqdm.auto import tqdm

from moeut.eval.encoding import Encoder, SentencePieceEncoder
from moeut.eval.files import find_task_files
from moeut.eval.harness_data import TASKS_DIR, quiet_git_hash
from moeut.eval.scoring import score_candidates
from moeut.run import load_run

HARNESS_TASKS_DIR = TASKS_DIR
# moeut task name → the lm-eval task (or group) shipped in HARNESS_TASKS_DIR
HARNESS_TASKS = {"lambada": "lambada_openai", "blimp": "blimp", "hellaswag": "hellaswag", "piqa": "piqa",
                 "arc_easy": "arc_easy"}


@register_model("moeut")
class MoEUTHarnessLM(TemplateLM):
    """A moeut checkpoint for lm-eval. ``pretrained``: a run directory or checkpoint file (its run
    directory must hold ``tokenizer.model``, else pass ``tokenizer``; loaded by :func:`moeut.run.load_run`, so
    a tokenizer other than the run's needs ``allow_tokenizer_mismatch=True``). Or pass a loaded ``model`` and
    ``encoder`` (an :class:`~moeut.eval.encoding.Encoder`) directly."""

    def __init__(self, pretrained: str | None = None, tokenizer: str | None = None, batch_size: int | str = 64,
                 max_batch_size: int | None = None, device: str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, backend: str | None = None, model: torch.nn.Module | None = None,
                 encoder: Encoder | None = None, allow_tokenizer_mismatch: bool = False, **_: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("the moeut lm-eval model needs pretrained=RUN_DIR_OR_CHECKPOINT")
            run = load_run(pretrained, tokenizer=tokenizer, device=device or "auto", backend=backend,
                           allow_tokenizer_mismatch=allow_tokenizer_mismatch)
            model = run.model
            encoder = encoder or SentencePieceEncoder(run.tokenizer)
        elif encoder is None:
            if tokenizer is None:
                raise ValueError("pass tokenizer=PATH (or an encoder) with a model object")
            encoder = SentencePieceEncoder.load(tokenizer)
        self.model = model.eval()
        self.encoder = encoder
        self.batch_size = 64 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)

    # ----------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.encoder.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.cfg.context_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.encoder.encode_context(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.encoder.decode_continuation(tokens)

    # ------------------------------------------------------------- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation), context_tokens, continuation_tokens)``. Requests with the
        same context tokens form one question (context run once), at most ``batch_size`` of them."""
        bs = override_bs or self.batch_size
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, _cont) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        questions, members = [], []
        for ctx, idx in groups.items():
            for j in range(0, len(idx), bs):
                chunk = idx[j:j + bs]
                questions.append([(list(ctx) + list(requests[i][2]), len(ctx)) for i in chunk])
                members.append(chunk)
        bar = tqdm(total=len(requests), desc="moeut loglikelihood", disable=disable_tqdm or self.rank != 0)
        def progress(finished: list[int]) -> None:  # the scorer reports questions; the bar counts requests
            bar.update(sum(len(members[q]) for q in finished))

        scored = score_candidates(self.model, questions, batch_size=bs, max_length=self.max_length,
                                  pad_id=self.eot_token_id, progress=None if disable_tqdm else progress)
        bar.close()
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for chunk, cands in zip(members, scored):
            for i, s in zip(chunk, cands):
                out[i] = (s.total, s.is_greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings: lm-eval's disjoint rolling windows of the model's context, the
        first conditioned on EOS."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations with the KV cache, cut at the first stop string."""
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="moeut generate_until", disable=disable_tqdm or self.rank != 0)
        for idx in by_kwargs.values():
            kw = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw["max_gen_toks"])
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            keep = max(1, self.max_length - max_new)
            for j in range(0, len(idx), self.batch_size):
                chunk = idx[j:j + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in chunk]
                new = self.model.generate(prompts, max_new, temperature=temperature, eos_id=self.eot_token_id)
                for i, toks in zip(chunk, new):
                    text = self.tok_decode([t for t in toks if t != self.eot_token_id])
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


def task_manager(data_dir: str | Path | None = None, include_defaults: bool = False):
    """An lm-eval ``TaskManager`` that sees moeut's local task YAMLs (and lm-eval's own only when
    ``include_defaults``: indexing them takes seconds, and they download their data from the Hub)."""
    return TaskManager(include_path=str(HARNESS_TASKS_DIR), include_defaults=include_defaults,
                       metadata={"moeut_data_dir": None if data_dir is None else str(data_dir)})


def harness_task_names(tasks: Sequence[str], data_dir: str | Path | None = None) -> list[str]:
    """moeut task names (``lambada``, …) → lm-eval's (``lambada_openai``, …); other names pass through.
    ``blimp`` is lm-eval's group of 67 paradigms when all 67 files are there, else the paradigms present."""
    out = []
    for t in tasks:
        name = HARNESS_TASKS.get(t, t)
        if name == "blimp":
            shipped = {p.stem for p in (HARNESS_TASKS_DIR / "blimp").glob("*.yaml") if not p.name.startswith("_")}
            present = sorted(p.stem for p in Path(find_task_files("blimp", data_dir).source).glob("*.jsonl"))
            if not shipped <= set(present):
                out += [f"blimp_{p}" for p in present if p in shipped]
                continue
        out.append(name)
    return out


class _QuietCustomDataset:
    """Drops lm-eval's per-task notice that custom datasets take ``--metadata`` (one line per BLiMP paradigm)."""

    def filter(self, record) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def run_harness(tasks: Sequence[str], *, checkpoint: str | Path | None = None, model: torch.nn.Module | None = None,
                encoder: Encoder | None = None, data_dir: str | Path | None = None, limit: int | float | None = None,
                batch_size: int = 64, device: str | None = None, bootstrap_iters: int = 1000,
                verbose: bool = True) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``tasks`` with the moeut model, offline; prints lm-eval's table and
    returns its results dict. Task names may be moeut's (``lambada``) or lm-eval's (``lambada_openai``);
    names that are not shipped with moeut come from lm-eval's own registry (which may need the Hub)."""
    names = harness_task_names(tasks, data_dir)
    logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())
    ours = set(HARNESS_TASKS.values()) | {n for n in names if n.startswith("blimp_")}
    lm = MoEUTHarnessLM(pretrained=None if checkpoint is None else str(checkpoint), model=model, encoder=encoder,
                        batch_size=batch_size, device=device)
    quiet_git_hash()  # no "fatal: not a git repository" when run outside a checkout
    results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, bootstrap_iters=bootstrap_iters,
                                      task_manager=task_manager(data_dir, include_defaults=not set(names) <= ours),
                                      log_samples=False, batch_size=batch_size)
    if verbose and results is not None:
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
    return results
