"""The paper's analyses, one module each, as functions returning dataclasses (``moeut analyze`` is the CLI):

* :mod:`~moeut.analysis.residual_norm` — residual and update norms per layer application (App. A.2)
* :mod:`~moeut.analysis.expert_usage` — expert selections per shared layer and repeat (Sec. 4, App. A.6)
* :mod:`~moeut.analysis.layer_similarity` — IoU of a token's expert sets between repeats
* :mod:`~moeut.analysis.token_diversity` — distinct experts per vocabulary item and layer (Fig. 15)
* :mod:`~moeut.analysis.depth` — validation perplexity with the shared layers applied R = 1 … 2×trained times
* :mod:`~moeut.analysis.sweep` — train a list of configurations on one token budget (App. A.5, ablations)
* :mod:`~moeut.analysis.compute` — MACs per token, training MACs, perplexity vs params/MACs (App. A.8)

Example::

    from moeut.analysis import model_batches, residual_norms
    from moeut.run import load_run

    run = load_run("runs/demo/moeut-tiny")
    res = residual_norms(run.model, model_batches(run, "runs/demo/data"))
    print(res.update_norm)

Plots need matplotlib (``pip install 'moeut[analysis]'``); it is imported only when a plot is drawn.
"""

from __future__ import annotations

from moeut.analysis.common import (AnalysisError, applications_of_layer, layer_of_application, model_batches,
                                   open_tokens, repeat_of_application, token_batches)
from moeut.analysis.residual_norm import ResidualNormResult, residual_norms
from moeut.analysis.expert_usage import ExpertUsageResult, expert_usage
from moeut.analysis.layer_similarity import LayerSimilarityResult, layer_similarity
from moeut.analysis.token_diversity import TokenDiversityResult, token_diversity
from moeut.analysis.depth import DepthResult, depth_curve
from moeut.analysis.sweep import SweepEntry, builtin_sweep, load_sweep, run_sweep
from moeut.analysis.compute import ComputeRow, preset_row, run_row

__all__ = ["AnalysisError", "ComputeRow", "DepthResult", "ExpertUsageResult", "LayerSimilarityResult",
           "ResidualNormResult", "SweepEntry", "depth_curve", "TokenDiversityResult", "applications_of_layer", "builtin_sweep", "expert_usage",
           "layer_of_application", "layer_similarity", "load_sweep", "model_batches", "open_tokens",
           "preset_row", "repeat_of_application", "residual_norms", "run_row", "run_sweep", "token_batches",
           "token_diversity"]
