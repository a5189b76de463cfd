"""The paper's analyses, one module each, as functions returning dataclasses (``moeut analyze`` is the CLI):

* :mod:`~moeut.analysis.residual_norm` — residual and update norms per layer application (App. A.2)
* :mod:`~moeut.analysis.expert_usage` — expert selections per shared layer and repeat (Sec. 4, App. A.6)
* :mod:`~moeut.analysis.layer_similarity` — IoU of a token's expert sets between repeats
* :mod:`~moeut.analysis.token_diversity` — distinct experts per vocabulary item and layer (Fig. 15)
* :mod:`~moeut.analysis.sweep` — train a list of configurations on one token budget (App. A.5, ablations)
* :mod:`~moeut.analysis.wallclock` — time per training iteration and peak memory (App. A.7)
* :mod:`~moeut.analysis.compute` — MACs per token, training MACs, perplexity vs params/MACs (App. A.8)

Example::

    from moeut.analysis import load_for_analysis, model_batches, residual_norms
    m = load_for_analysis("runs/demo/moeut-tiny")
    res = residual_norms(m.model, model_batches(m, "runs/demo/data"))
    print(res.update_norm)

Plots need matplotlib (``pip install 'moeut[analysis]'``); it is imported only when a plot is drawn.
Attributes load lazily so that ``moeut --help`` does not import torch through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AnalysisError": "common", "layer_of_application": "common", "repeat_of_application": "common",
    "applications_of_layer": "common", "load_for_analysis": "common", "model_batches": "common",
    "token_batches": "common", "open_tokens": "common",
    "residual_norms": "residual_norm", "residual_norm_metrics": "residual_norm", "ResidualNormResult": "residual_norm",
    "expert_usage": "expert_usage", "ExpertUsageResult": "expert_usage",
    "layer_similarity": "layer_similarity", "LayerSimilarityResult": "layer_similarity",
    "token_diversity": "token_diversity", "TokenDiversityResult": "token_diversity",
    "run_sweep": "sweep", "SweepEntry": "sweep", "builtin_sweep": "sweep", "load_sweep": "sweep",
    "wallclock": "wallclock", "WallclockRow": "wallclock",
    "run_row": "compute", "preset_row": "compute", "ComputeRow": "compute",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moeut.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moeut.analysis.{_EXPORTS[name]}"), name)
