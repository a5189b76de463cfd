"""``--init-from RUN_OR_CHECKPOINT``: start a run from trained weights only (continued pretraining, fine-tuning).

The source is anything :func:`moeut.run.load_run` reads (a moeut run directory or checkpoint file, a directory
written by ``moeut export-hf``, a run written by ``moeut import-paper``). Only the weights are taken: the
optimizer, the schedule, the step and the data start afresh. The model configuration of the new run must be
the source's (the error names every differing field), and the new data's tokenizer must be the one the
source was trained with (its recorded sha256) unless the mismatch is allowed.
"""

from __future__ import annotations

import sys

import torch

from moeut.errors import MoeutError
from moeut.model.config import ModelConfig
from moeut.run.loader import OVERRIDE_FLAG, load_run


class InitFromError(MoeutError, ValueError):
    """The ``--init-from`` source cannot start this run; the message names the fields or files."""


def config_differences(want: ModelConfig, have: ModelConfig) -> dict[str, tuple[object, object]]:
    """Fields whose values differ: name → (this run's value, the source's value)."""
    a, b = want.to_dict(), have.to_dict()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def load_init_weights(model_cfg: ModelConfig, source: str, data_tokenizer_sha256: str, *,
                      allow_tokenizer_mismatch: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of ``source`` for a model built from ``model_cfg`` (checked: configuration, tokenizer), and
    a one-line description of where they came from."""
    try:
        loaded = load_run(source, device="cpu", require_tokenizer=False,
                          allow_tokenizer_mismatch=allow_tokenizer_mismatch)
    except (FileNotFoundError, MoeutError) as e:
        raise InitFromError(f"--init-from {source}: {e}") from e
    diff = config_differences(model_cfg, loaded.config)
    if diff:
        listed = ", ".join(f"{k} (this run {a!r}, source {b!r})" for k, (a, b) in diff.items())
        fix = " ".join(f"--model {k}={b}" for k, (a, b) in diff.items() if k not in ("arch", "vocab_size"))
        raise InitFromError(f"--init-from {source}: the model configuration differs in {listed}. Use the source's "
                            f"preset and overrides (its model_config.json)" + (f", e.g. {fix}" if fix else "")
                            + "; vocab_size follows the data's tokenizer")
    recorded = loaded.tokenizer_sha256 or (loaded.tokenizer.sha256 if loaded.tokenizer is not None else None)
    if recorded is None:
        print(f"warning: --init-from {source} records no tokenizer: cannot check that the data's tokenizer is the "
              f"one it was trained with", file=sys.stderr)
    elif recorded != data_tokenizer_sha256:
        msg = (f"--init-from {source} was trained with tokenizer sha256 {recorded[:12]}…, but the data is tokenized "
               f"with {data_tokenizer_sha256[:12]}…")
        if not allow_tokenizer_mismatch:
            raise InitFromError(f"{msg}: its embeddings would mean nothing on these tokens. Prepare the data with "
                                f"the source's tokenizer (`moeut prepare --tokenizer "
                                f"{loaded.run_dir}/tokenizer.model`), or pass {OVERRIDE_FLAG} if you really mean it")
        print(f"warning: {msg} (continuing: {OVERRIDE_FLAG})", file=sys.stderr)
    step = f" step {loaded.step}" if loaded.step is not None else ""
    return loaded.model.state_dict(), f"weights from {loaded.source}{step} ({loaded.kind})"
