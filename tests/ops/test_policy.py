"""How the torch backend's strategy is chosen: the policy's rules, the environment's overrides (read in one
place), the strategy's op-argument form, and what forward keeps for backward (shared with the fake kernel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moeut.ops import GemmPolicy, Strategy, current_policy, use_policy
from moeut.ops import overrides
from moeut.ops import strategy as st
from moeut.ops.context import GATED_INPUT, INPUT_GATE, NO_GATE, OUTPUT_GATE, RAW_OUTPUT, MatmulContext
from moeut.ops.grouped_mm_layout import grouped_mm_works

CPU = torch.device("cpu")
MANY = 10_000  # slots of a training batch


@pytest.mark.parametrize("policy, dtype, want", [
    (GemmPolicy(), torch.float32, Strategy(st.GROUPED_MM, True)),
    (GemmPolicy(), torch.bfloat16, Strategy(st.BLOCKS, True, 64, 0.5)),
    (GemmPolicy(), torch.float16, Strategy(st.BLOCKS, True, 64, 0.5)),
    (GemmPolicy(), torch.float64, Strategy(st.MM, True)),  # no grouped_mm; the gathered rows are kept on CPU
    (GemmPolicy(save_gathered="never"), torch.float64, Strategy(st.LOOP)),
    (GemmPolicy(save_gathered="never"), torch.float32, Strategy(st.GROUPED_MM, False)),
    (GemmPolicy(gemm="loop"), torch.float32, Strategy(st.LOOP)),  # a forced loop keeps nothing
    (GemmPolicy(gemm="loop"), torch.bfloat16, Strategy(st.LOOP)),
    (GemmPolicy(gemm="grouped_mm"), torch.float64, Strategy(st.MM, True)),  # forced, but fp64 has none
    (GemmPolicy(gemm="grouped_mm"), torch.bfloat16, Strategy(st.BLOCKS, True, 64, 0.5)),  # never on CPU bf16
    (GemmPolicy(max_block_waste=-1), torch.bfloat16, Strategy(st.MM, True, 64)),
    (GemmPolicy(row_bucket=0), torch.bfloat16, Strategy(st.MM, True, 0)),
    (GemmPolicy(row_bucket=-3), torch.bfloat16, Strategy(st.MM, True, 0)),  # negative: exact counts
    (GemmPolicy(row_bucket=32, max_block_waste=0.25), torch.bfloat16, Strategy(st.BLOCKS, True, 32, 0.25)),
])
def test_the_policy_chooses_by_its_documented_rules(policy, dtype, want):
    if want.kernel == st.GROUPED_MM and not grouped_mm_works("cpu", dtype):
        pytest.skip(f"grouped_mm unavailable for cpu/{dtype}")
    assert policy.choose(CPU, dtype, MANY) == want


def test_few_slots_and_the_fused_op():
    policy = GemmPolicy(few_slots=64)
    for fused in (False, True):
        assert policy.choose(CPU, torch.float32, 64, fused=fused) == Strategy(st.FEW_SLOTS)
        assert policy.choose(CPU, torch.float32, 65, fused=fused).kernel != st.FEW_SLOTS
    # the fused σ-MoE op always gathers the sorted rows: where a call would loop, it runs the loop of mm
    assert GemmPolicy(gemm="loop").choose(CPU, torch.float32, MANY, fused=True) == Strategy(st.MM)
    assert GemmPolicy(gemm="loop").choose(CPU, torch.bfloat16, MANY, fused=True) == Strategy(st.BLOCKS, False, 64, 0.5)
    assert "grouped_mm" in GemmPolicy().describe("cpu", torch.float32) or not grouped_mm_works("cpu", torch.float32)


def test_strategy_travels_as_a_string():
    for s in (Strategy(st.LOOP), Strategy(st.GROUPED_MM, True), Strategy(st.MM, True, 64),
              Strategy(st.BLOCKS, False, 4, 100.0), Strategy(st.BLOCKS, True, 64, 0.3), Strategy(st.TRITON)):
        assert st.decode(s.encode()) == s
    assert Strategy(st.BLOCKS, True, 64, 0.5).encode() == "blocks:save=1:bucket=64:waste=0.5"
    with pytest.raises(ValueError, match="not an expert-matmul strategy"):
        st.decode("grouped:save=1")


def test_use_policy_sets_the_process_policy_and_restores_it():
    before = current_policy()
    with use_policy(gemm="loop") as inner:
        assert current_policy() is inner and inner.gemm == "loop" and inner.row_bucket == before.row_bucket
        with use_policy(GemmPolicy(row_bucket=8)):
            assert current_policy() == GemmPolicy(row_bucket=8)
        assert current_policy() is inner
        with pytest.raises(RuntimeError), use_policy(save_gathered="never"):
            raise RuntimeError
        assert current_policy() is inner
    assert current_policy() is before
    with pytest.raises(ValueError, match="gemm must be auto, grouped_mm or loop"):
        with use_policy(gemm="grouped"):
            pass


def test_overrides_parse_every_variable_and_name_a_bad_one():
    env = {"MOEUT_EXPERT_BACKEND": "reference", "MOEUT_GEMM_IMPL": "loop", "MOEUT_SAVE_GATHERED": "never",
           "MOEUT_CPU_ROW_BUCKET": "32", "MOEUT_CPU_MAX_BLOCK_WASTE": "0.25", "MOEUT_DETERMINISTIC": "1",
           "MOEUT_TRITON_AUTOTUNE": "off"}
    got = overrides.read(env)
    assert got == overrides.Overrides("reference", "loop", "never", 32, 0.25, True, "off")
    assert overrides.read({}) == overrides.Overrides()
    assert GemmPolicy.from_overrides(got) == GemmPolicy("loop", "never", 32, 0.25)
    for name, bad in (("MOEUT_GEMM_IMPL", "grouped"), ("MOEUT_SAVE_GATHERED", "gpu"), ("MOEUT_CPU_ROW_BUCKET", "6x"),
                      ("MOEUT_CPU_MAX_BLOCK_WASTE", "half"), ("MOEUT_TRITON_AUTOTUNE", "some")):
        with pytest.raises(ValueError, match=name):
            overrides.read({name: bad})


CHILD = """
import json
import moeut.ops as ops
from moeut.ops import triton_backend
p = ops.current_policy()
print(json.dumps({"policy": [p.gemm, p.save_gathered, p.row_bucket, p.max_block_waste],
                  "backend": ops.default_backend("cpu"), "deterministic": triton_backend.DETERMINISTIC}))
"""


def test_environment_overrides_set_the_policy_at_import():
    """The variables that existed before the policy keep working: set when the process starts."""
    env = {**os.environ, "MOEUT_GEMM_IMPL": "loop", "MOEUT_SAVE_GATHERED": "never", "MOEUT_CPU_ROW_BUCKET": "32",
           "MOEUT_CPU_MAX_BLOCK_WASTE": "0.25", "MOEUT_EXPERT_BACKEND": "reference", "MOEUT_DETERMINISTIC": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"policy": ["loop", "never", 32, 0.25], "backend": "reference",
                                       "deterministic": True}


def _context(d_in, d_out, gated, strategy, need_gate_grad, n=5, s=4):
    x, w = torch.empty(n, 1, d_in), torch.empty(3, d_in, d_out)
    gates = torch.empty(n, s) if gated else None
    return MatmulContext.of(x, w, gates, n * s, 1, strategy, need_gate_grad)


@pytest.mark.parametrize("d_in, d_out, gated, need_c, gate, rows, side", [
    (8, 8, False, False, NO_GATE, True, ""),
    (8, 16, True, True, INPUT_GATE, True, GATED_INPUT),  # ungated rows for ∂c, gated ones for ∂W
    (8, 16, True, False, INPUT_GATE, False, GATED_INPUT),
    (16, 8, True, True, OUTPUT_GATE, True, RAW_OUTPUT),  # ∂c at the narrow width d_out
    (16, 8, True, False, OUTPUT_GATE, True, ""),
])
def test_what_forward_keeps_for_backward(d_in, d_out, gated, need_c, gate, rows, side):
    ctx = _context(d_in, d_out, gated, Strategy(st.GROUPED_MM, True), need_c)
    assert (ctx.gate, ctx.keep_rows, ctx.keep_side) == (gate, rows, side)
    want_side = {GATED_INPUT: (20, d_in), RAW_OUTPUT: (20, d_out)}.get(side, (0, d_in))
    assert ctx.saved_shapes(20) == ((20 if rows else 0, d_in), want_side)
    # strategies that keep nothing, and an empty batch
    for nothing in (_context(d_in, d_out, gated, Strategy(st.GROUPED_MM, False), need_c),
                    _context(d_in, d_out, gated, Strategy(st.LOOP), need_c),
                    _context(d_in, d_out, gated, Strategy(st.GROUPED_MM, True), need_c, n=0)):
        assert not nothing.keep_rows and not nothing.keep_side
        assert nothing.saved_shapes(20) == ((0, d_in), (0, d_in))
