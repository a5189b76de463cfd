"""FSDP2 and shared layers: each distinct layer is all-gathered once per training step, not once per application;
why FSDP2's "returned a view tensor" warning is a false alarm for the moeut modules, and that only it is silenced."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.run_helpers import torchrun_cmd

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")


def _counts(*flags: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    cmd = torchrun_cmd(2, str(ROOT / "tests" / "train" / "fsdp_count_child.py"), *flags)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_shared_layers_are_gathered_once_per_step_on_two_gloo_ranks():
    before = _counts("--per-application", "--applications", "3")
    after = _counts("--applications", "3")
    r, g = after["applications"], after["distinct_layers"]
    assert (r, g) == (3, 2)
    for step in before["per_step"]:  # FSDP2 defaults: every application, forward and backward, plus the root
        assert step["all_gathers"] == 2 * r * g + 1
    for step in after["per_step"]:  # once per distinct layer, plus the root; one reduce-scatter each
        assert step["all_gathers"] == g + 1 and step["reduce_scatters"] == g + 1
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)  # same numbers, fewer collectives


# ------------------------------------------------------------------ FSDP2's view-output warning

def _backward_graph(roots: list[torch.Tensor]) -> set:
    """Every autograd node the backward pass of ``roots`` visits."""
    seen, todo = set(), [t.grad_fn for t in roots if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("preset, overrides, checkpointed", [
    ("moeut-tiny", {}, False), ("moeut-tiny", {"norm_placement": "pre"}, False),
    ("moeut-tiny", {"norm_placement": "post"}, False), ("moeut-tiny-act", {}, False), ("dense-tiny", {}, False),
    ("sigma-moe-tiny", {}, False), ("sut-tiny", {}, False), ("sut-tiny-noact", {}, False), ("moeut-tiny", {}, True),
], ids=["moeut", "moeut-pre", "moeut-post", "moeut-act", "dense", "sigma-moe", "sut", "sut-noact",
        "moeut-checkpointed"])
def test_view_outputs_of_fsdp_units_feed_their_main_outputs(preset, overrides, checkpointed):
    """The premise of ``ignore_fsdp_view_output_warning``: in a training forward, every grad-requiring view that
    a module wrap_model shards (each shared layer, the LM) returns is computed on the way to a non-view output
    of that same call. FSDP2 hooks every output; the non-view's hook then runs the module's pre-backward
    (all-gather) before any of the module's backward nodes, even if an in-place op on a view dropped that
    view's hook. A module returning a view that does not feed a non-view output (or only views) fails here:
    for it the warning would be real."""
    from torch.distributed.fsdp._common_utils import collect_grad_tensors  # what FSDP2 hooks and checks

    from moeut.model import build_model
    from moeut.model.config import ModelConfig
    from moeut.train.activation_checkpointing import apply_activation_checkpointing

    model = build_model(ModelConfig.from_name(preset, vocab_size=64, **overrides)).train()
    apply_activation_checkpointing(model, 1 if checkpointed else 0)
    calls: list[tuple[str, object]] = []
    for unit in (*model.layers, model):  # the modules wrap_model passes to fully_shard
        unit.register_forward_hook(lambda m, _args, out: calls.append((type(m).__name__, out)))
    tokens = torch.randint(0, 64, (2, 17))
    model(tokens[:, :-1], targets=tokens[:, 1:])  # as train_step calls it
    assert calls[-1][0] == type(model).__name__ and len(calls) > 1
    views_seen = 0
    for name, out in calls:
        tensors = collect_grad_tensors(out)
        views = [t for t in tensors if t._base is not None]
        mains = [t for t in tensors if t._base is None]
        assert mains, f"{name} returned only views: FSDP2's pre-backward hook could be lost with them"
        graph = _backward_graph(mains)
        for v in views:
            assert v.grad_fn in graph, (f"{name} returned a view {tuple(v.shape)} ({type(v.grad_fn).__name__}) "
                                        "that does not feed its non-view outputs: FSDP2's warning is real for it")
        views_seen += len(views)
    assert views_seen, "no view outputs at all: the warning filter in wrap_model may be dead code now"


def test_view_warning_filter_is_narrow():
    """Only FSDP2's view warning for the named classes is ignored: the same warning for another wrapped class,
    and any other warning from FSDP2, still show."""
    import warnings

    from moeut.train.distributed import _VIEW_OUTPUT_WARNING, ignore_fsdp_view_output_warning

    origin = "torch.distributed.fsdp._fully_shard._fsdp_state"

    def emit(text: str, module: str = origin) -> None:
        warnings.warn_explicit(text, UserWarning, "_fsdp_state.py", 331, module=module)

    tail = ". An in-place op on this view (e.g., `x += y`) will silently drop the pre-backward hook"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        ignore_fsdp_view_output_warning({"FSDPMoEUTLayer", "FSDPMoEUTLM"})
        emit(_VIEW_OUTPUT_WARNING.format("FSDPMoEUTLayer") + tail)
        emit(_VIEW_OUTPUT_WARNING.format("FSDPMoEUTLM") + tail)
        emit(_VIEW_OUTPUT_WARNING.format("FSDPMyBlock") + tail)
        emit(_VIEW_OUTPUT_WARNING.format("FSDPMoEUTLayerX") + tail)  # a prefix of a silenced name is not enough
        emit("FSDP2 something else about FSDPMoEUTLayer")
        emit(_VIEW_OUTPUT_WARNING.format("FSDPMoEUTLayer") + tail, module="user_code")
    assert [str(w.message)[:44] for w in shown] == [
        "FSDP2-wrapped module (FSDPMyBlock) returned ", "FSDP2-wrapped module (FSDPMoEUTLayerX) retur",
        "FSDP2 something else about FSDPMoEUTLayer", "FSDP2-wrapped module (FSDPMoEUTLayer) return"]
