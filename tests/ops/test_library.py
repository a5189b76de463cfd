"""The ``moeut::expert_matmul`` custom op: its registration passes opcheck, and torch.compile runs MoE
layers and the whole model without graph breaks, matching eager."""

from __future__ import annotations

import shutil

import pytest
import torch

from moeut.ops import Strategy, current_policy, make_plan, use_policy
from moeut.ops import strategy as st

ON_GPU = torch.cuda.is_available()


def _op_args(n, g_in, s, g_out, d_in, d_out, e, gated, *, device="cpu", dtype=torch.float32,
             strategy: Strategy | None = None, seed=0):
    """Arguments of ``moeut::expert_matmul`` for a random case, under ``strategy`` (default: the policy's)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g_in, d_in, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(e, d_in, d_out, generator=g) / d_in ** 0.5).to(device, dtype).requires_grad_()
    ids = torch.randint(0, e, (n, s), generator=g).to(device)
    gates = torch.rand(n, s, generator=g).to(device, dtype).requires_grad_() if gated else None
    plan = make_plan(ids, e)
    strategy = strategy or current_policy().choose(x.device, dtype, n * s)
    return (x, w, gates, plan.perm, plan.inv_perm, plan.offsets, g_out, strategy.encode(), gated)


CASES = [(13, 1, 4, 4, 16, 8, 5, False), (13, 4, 4, 1, 8, 16, 5, True), (11, 1, 4, 2, 16, 16, 3, True),
         (7, 2, 4, 1, 16, 8, 6, True)]
# every kernel of the op; BLOCKS with small blocks, so these tiny cases use them (and the kept rows then have a
# routing-dependent count: a dynamic size in the fake kernel)
STRATEGIES = [Strategy(st.LOOP), Strategy(st.GROUPED_MM), Strategy(st.GROUPED_MM, save_rows=True),
              Strategy(st.MM, save_rows=True), Strategy(st.BLOCKS, True, bucket=4, max_block_waste=100.0)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.encode())
def test_opcheck_passes_for_the_torch_backend(case, strategy):
    torch.library.opcheck(torch.ops.moeut.expert_matmul.default, _op_args(*case, strategy=strategy))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_passes_on_cuda(case, backend):
    strategy = Strategy(st.TRITON) if backend == "triton" else None
    torch.library.opcheck(torch.ops.moeut.expert_matmul.default, _op_args(*case, device="cuda", strategy=strategy))


def _tiny_model(device="cpu"):
    from moeut.model import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("moeut-tiny", vocab_size=64, d_model=64, n_heads=2, d_head=16, ff_n_experts=8,
                                ff_k=2, att_n_experts=3, n_layers=4, group_size=2)
    return build_model(cfg).to(device)


def _compile_and_compare(device: str, bf16: bool = False, backend: str | None = None) -> None:
    import contextlib

    import torch._dynamo

    torch._dynamo.reset()
    model = _tiny_model(device)
    tokens = torch.randint(0, 64, (2, 24), device=device)
    targets = torch.randint(0, 64, (2, 24), device=device)

    def step(m):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = m(tokens).loss(targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = step(model)
    explanation = torch._dynamo.explain(model)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # inductor needs a C++ compiler on CPU; without one, aot_eager still traces the op's fake and autograd
    if backend is None:
        backend = "inductor" if device == "cuda" or shutil.which("g++") or shutil.which("c++") else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss, grads = step(compiled)
    tol = dict(atol=2e-2, rtol=2e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, eager_loss, **tol)
    tol = dict(atol=5e-2, rtol=5e-2) if bf16 else dict(atol=1e-4, rtol=1e-4)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_compile_runs_the_model_without_graph_breaks_and_matches_eager():
    _compile_and_compare("cpu")  # few_slots=0 (conftest): the sorted path, through the custom ops


@pytest.mark.slow
def test_torch_compile_under_cpu_bf16_autocast():
    """CPU bf16: the rows kept for backward have a routing-dependent count (the block layout), which the
    fake kernels give as a dynamic size; compiled forward and backward still match eager."""
    with use_policy(row_bucket=4):  # small blocks, so this tiny batch uses them
        assert current_policy().choose(torch.device("cpu"), torch.bfloat16, 96).kernel == st.BLOCKS
        _compile_and_compare("cpu", bf16=True, backend="aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_torch_compile_on_cuda_with_the_default_backend():
    _compile_and_compare("cuda")
