"""Export a moeut run to a Hugging Face model directory, and load such a directory back into moeut.

An exported directory holds

* ``config.json`` (``model_type: "moeut"``, ``auto_map`` to the two code files, ``max_position_embeddings``,
  the moeut step and tokenizer checksum), ``generation_config.json``;
* ``model.safetensors``: the weights under transformers names (``model.embed_tokens``, ``model.layers.{g}.…``,
  ``model.norm``, ``lm_head``; inside a layer the names are moeut's);
* ``configuration_moeut.py`` / ``modeling_moeut.py``: self-contained copies (torch + transformers only);
* ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``, the SentencePiece
  ``tokenizer.model``) for ``AutoTokenizer``; ``README.md``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from moeut.data import Tokenizer
from moeut.integrations.hf.tokenizer import check_round_trip, write_tokenizer_files
from moeut.run import LoadedRun, list_checkpoints, load_run, write_model_run
from moeut.run.hf_format import (HF_NAMES, WEIGHTS, WEIGHTS_INDEX, HFFormatError, load_hf_model,
                                 need, to_hf_state_dict)
from moeut.run.layout import HF_CONFIG, TOKENIZER_MODEL
from moeut.version import __version__

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_moeut.py", "modeling_moeut.py")
AUTO_MAP = {
    "AutoConfig": "configuration_moeut.MoEUTConfig",
    "AutoModel": "modeling_moeut.MoEUTModel",
    "AutoModelForCausalLM": "modeling_moeut.MoEUTForCausalLM",
}
_DTYPES = ("float32", "bfloat16", "float16")
EXPORTABLE_ARCHS = ("moeut", "dense", "sut")  # what modeling_moeut.py implements


class ExportError(HFFormatError):
    """The export cannot be written or does not reproduce the moeut model; the message says why."""


# ----------------------------------------------------------------------------------- config and weights
def hf_config_dict(cfg, *, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                   dtype: str = "float32", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of an export of a model with :class:`moeut.ModelConfig` ``cfg``."""
    d: dict[str, Any] = {"architectures": ["MoEUTForCausalLM"], "auto_map": dict(AUTO_MAP), "model_type": "moeut"}
    for key, value in cfg.to_dict().items():
        d[HF_NAMES.get(key, key)] = value
    d.update(layer_norm_eps=1e-5, use_cache=True, output_router_logits=False, tie_word_embeddings=False,
             bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, torch_dtype=dtype)
    try:
        d["transformers_version"] = version("transformers")
    except PackageNotFoundError:  # transformers not installed: the field is informative only
        pass
    d.update(extra or {})
    return d


# ------------------------------------------------------------------------------------------------ export
def export_hf(checkpoint: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
              dtype: str = "float32", verify: bool = True, overwrite: bool = False,
              allow_tokenizer_mismatch: bool = False, on_load: Callable[[LoadedRun], None] | None = None) -> Path:
    """Write the Hugging Face model directory of a run (its newest checkpoint) or of one checkpoint file.

    ``on_load`` is called with the loaded run before anything is written (``moeut export-hf`` says which
    checkpoint file and step it exports with it).

    ``dtype``: the weights' storage type (``float32`` keeps the trained fp32 weights exactly). ``verify``
    loads the directory back with transformers and checks that its logits match moeut's (≤ 1e-4, fp32, on
    a left-padded batch) and that ``AutoTokenizer`` encodes and decodes like the SentencePiece model;
    a mismatch raises :class:`ExportError`. Returns ``out_dir``.
    """
    safetensors_torch = need("safetensors.torch", "export-hf")
    need("tokenizers", "export-hf")
    if verify:
        need("transformers", "checking the export (pass --no-verify to skip it)")
    if dtype not in _DTYPES:
        raise ExportError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; choose another --out or pass --force to overwrite")

    run = load_run(checkpoint, tokenizer=tokenizer, device="cpu", allow_tokenizer_mismatch=allow_tokenizer_mismatch)
    if on_load is not None:
        on_load(run)
    model, tok = run.model, run.tokenizer
    if model.cfg.arch not in EXPORTABLE_ARCHS:
        raise ExportError(f"{checkpoint}: arch {model.cfg.arch!r} has no exported modeling code "
                          f"(export-hf writes {', '.join(EXPORTABLE_ARCHS)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, WEIGHTS_INDEX):  # a previous export's weights must not survive next to the new ones
        (out_dir / name).unlink(missing_ok=True)

    # buffers (loss-free balancing's selection biases: small steps of the rate, which rounding would undo) stay fp32
    keep = set(to_hf_state_dict(dict(model.named_buffers())))
    tensors = {k: v.detach().to(torch.float32 if k in keep else getattr(torch, dtype)).contiguous()
               for k, v in to_hf_state_dict(model.state_dict()).items()}
    safetensors_torch.save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out_dir / WEIGHTS, 0o666 & ~umask)  # safetensors creates the file 0600; like the other files
    for name in CODE_FILES:
        shutil.copyfile(HERE / name, out_dir / name)

    ids = {name: (i if i >= 0 else None) for name, i in
           (("bos_id", tok.bos_id), ("eos_id", tok.eos_id), ("pad_id", tok.pad_id))}
    if ids["pad_id"] is None:
        ids["pad_id"] = ids["eos_id"]
    extra = {"moeut_version": __version__, "moeut_step": run.step, "moeut_tokenizer_sha256": tok.sha256}
    config = hf_config_dict(model.cfg, dtype=dtype, extra=extra, **ids)
    (out_dir / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
    if "transformers_version" in config:
        generation["transformers_version"] = config["transformers_version"]
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(tok.model_path, out_dir, model_max_length=model.cfg.context_length)
    (out_dir / "README.md").write_text(_model_card(model, run, dtype))
    if verify:
        verify_export(out_dir, model, tok.model_path)
    return out_dir


def verify_export(out_dir: str | Path, model, sentencepiece_model: str | Path, *, atol: float = 1e-4) -> None:
    """Load ``out_dir`` with transformers (the package's copy of the exported classes, in fp32; nothing is
    registered) and compare its logits with ``model``'s on a left-padded batch, and ``AutoTokenizer`` with the
    SentencePiece model."""
    from transformers import AutoTokenizer  # transformers is optional (the 'hf' extra)
    from transformers.utils import logging as hf_logging

    from moeut.integrations.hf.configuration_moeut import MoEUTConfig  # these two import transformers at their top
    from moeut.integrations.hf.modeling_moeut import MoEUTForCausalLM

    out_dir = Path(out_dir)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        dtype_kw = "dtype" if _is_v5() else "torch_dtype"
        hf = MoEUTForCausalLM.from_pretrained(str(out_dir), **{dtype_kw: torch.float32}).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    ref = _rounded_like(model, json.loads((out_dir / HF_CONFIG).read_text()).get("torch_dtype", "float32"))
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        want = ref(tokens, attention_mask=mask).logits
        got = hf(input_ids=tokens, attention_mask=mask).logits
    err = (want - got).abs().max().item()
    if not err <= atol:
        raise ExportError(f"the exported model's logits differ from moeut's by {err:.3g} (> {atol}); "
                          f"the export in {out_dir} is wrong")

    # the config passed in: AutoTokenizer would otherwise ask about the remote code of config.json
    at = AutoTokenizer.from_pretrained(str(out_dir), config=MoEUTConfig.from_pretrained(str(out_dir)))
    bad = check_round_trip(sentencepiece_model, lambda t: at(t)["input_ids"], at.decode)
    if bad:
        raise ExportError(f"AutoTokenizer.from_pretrained({str(out_dir)!r}) differs from the SentencePiece model on "
                          f"{len(bad)} test text(s), e.g. {bad[0]!r}; pass --no-verify to keep the export anyway")


def _is_v5() -> bool:
    return int(version("transformers").split(".")[0]) >= 5


def _rounded_like(model, dtype: str):
    """``model`` itself for fp32 exports; else an fp32 copy with weights rounded through ``dtype``."""
    if dtype == "float32":
        return model.eval()
    ref = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
    return ref


def _model_card(model, run, dtype: str) -> str:
    cfg = model.cfg
    n = model.num_params()
    return f"""---
library_name: transformers
tags: [moeut, mixture-of-experts, universal-transformer]
---

# MoEUT language model

A MoEUT (Mixture-of-Experts Universal Transformer, Csordás et al., NeurIPS 2024) model exported by
`moeut export-hf` from `{run.source.name}` (step {run.step}).
{n / 1e6:.2f}M parameters, {cfg.arch}, d_model {cfg.d_model}, {cfg.n_layers} layer applications of
{cfg.group_size} shared layers, vocabulary {cfg.vocab_size}, trained context {cfg.context_length}; weights in {dtype}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
ids = tok("Once upon a time", return_tensors="pt")
print(tok.decode(model.generate(**ids, max_new_tokens=40, do_sample=True, top_k=40)[0]))
```

With moeut installed, `import moeut.integrations.hf as m; m.register()` makes the model loadable without
`trust_remote_code`, and `moeut generate --checkpoint PATH` samples from it. The tokenizer adds no BOS/EOS.
`aux_loss` in the outputs is MoEUT's load-balancing regulariser; pass `output_router_logits=True` to include it
in `loss` (the training objective).
"""


# ------------------------------------------------------------------------------------------------ import
def import_hf(hf_dir: str | Path, *, backend: str | None = None) -> torch.nn.Module:
    """A moeut model (fp32, eval mode) with the weights of an exported (or transformers-saved) MoEUT
    directory. Needs safetensors, not transformers."""
    return load_hf_model(hf_dir, backend=backend)[0]


def import_hf_run(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Turn an exported directory back into a moeut run directory (``tokenizer.model`` + ``tokenizer.json``,
    ``model_config.json``, ``checkpoints/ckpt_<step>.pt``) that every verb reads (:func:`moeut.run.load_run`).
    The checkpoint has no optimizer state (it cannot be resumed). Returns the checkpoint path."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if list_checkpoints(run_dir):
        raise ExportError(f"{run_dir} already holds checkpoints; choose another directory")
    model, hf_cfg = load_hf_model(hf_dir)
    tok_file = hf_dir / TOKENIZER_MODEL
    tok = Tokenizer(tok_file) if tok_file.is_file() else None
    return write_model_run(run_dir, model, tokenizer=tok, step=int(hf_cfg.get("moeut_step") or 0),
                           extra={"imported_from": str(hf_dir)})
