"""Load-balancing modes (``entropy_reg_mode``): per sequence (the paper's), over the micro-batch, and over the
global batch of every data-parallel rank; 2 gloo ranks under DDP give the loss and gradients of 1 process."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeut.model import ConfigError, MoEUTLM
from moeut.model.regularizer import entropy_of_mean_softmax
from tests.model.helpers import sut_config, tiny_config

B, T = 4, 9


def _logits(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, 3, 5, generator=g) * 2 for _ in range(2)]  # 2 repeats, 3 heads, 5 experts


def _neg_entropy(p: torch.Tensor) -> torch.Tensor:
    return (p * p.log()).sum(-1)


def test_modes_pool_where_they_say():
    logits = _logits()
    x = torch.cat(logits, dim=1).softmax(-1)  # [B, R·T, H, E]
    per_seq = _neg_entropy(x.mean(1)).mean()
    whole = _neg_entropy(x.flatten(0, 1).mean(0)).mean()
    torch.testing.assert_close(entropy_of_mean_softmax(logits, "sequence"), per_seq)
    torch.testing.assert_close(entropy_of_mean_softmax(logits, "batch"), whole)
    torch.testing.assert_close(entropy_of_mean_softmax(logits, "global"), whole)  # no process group: = batch
    assert abs(per_seq - whole) > 1e-3
    assert whole <= per_seq + 1e-6  # concavity: the pooled marginal has at least the mean per-sequence entropy


def test_the_mode_reaches_the_models_regulariser_and_is_validated():
    torch.manual_seed(0)
    tokens = torch.randint(0, 53, (B, T))
    regs = {}
    for mode in ("sequence", "batch"):
        torch.manual_seed(1)
        regs[mode] = MoEUTLM(tiny_config(entropy_reg_mode=mode)).train()(tokens).reg_loss
    assert abs(regs["sequence"] - regs["batch"]) > 1e-6
    with pytest.raises(ConfigError, match="entropy_reg_mode"):
        tiny_config(entropy_reg_mode="token")
    with pytest.raises(ConfigError, match="only MoEUT"):
        sut_config(entropy_reg_mode="global")


def _reference(mode: str):
    torch.manual_seed(5)
    model = MoEUTLM(tiny_config(entropy_reg_mode=mode)).train()
    tokens = torch.randint(0, 53, (B, T + 1), generator=torch.Generator().manual_seed(9))
    out = model(tokens[:, :-1])
    loss = out.loss(tokens[:, 1:])
    loss.backward()
    return model, tokens, out.reg_loss.item(), loss.item()


def _rank(rank: int, world: int, init: str, mode: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _rank_step(rank, world, mode, result)
        dist.barrier()  # every rank's collectives are done before the group goes
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: torch 2.13 can deadlock there when the DDP reducer's last reference to
    # the gloo group goes while a gloo worker thread still waits for the GIL to free a tensor (seen in CI:
    # ~ProcessGroupGloo joining a thread blocked in ~AsyncWork). The results are on disk.
    os._exit(0)


def _rank_step(rank: int, world: int, mode: str, result: str) -> None:
    torch.manual_seed(5)
    model = MoEUTLM(tiny_config(entropy_reg_mode=mode)).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    tokens = torch.randint(0, 53, (B, T + 1), generator=torch.Generator().manual_seed(9))
    mine = tokens.chunk(world)[rank]
    out = ddp(mine[:, :-1])
    loss = out.loss(mine[:, 1:])
    loss.backward()  # DDP averages the gradients over the ranks
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.save({"reg": out.reg_loss.item(), "loss": float(total) / world,
                "grads": {k: p.grad for k, p in model.named_parameters()}}, f"{result}.{rank}")


def _two_ranks(tmp_path, mode: str) -> list[dict]:
    init = f"file://{tmp_path / f'pg_{mode}'}"
    result = str(tmp_path / f"res_{mode}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(2, init, mode, result), nprocs=2, join=True)
    return [torch.load(f"{result}.{r}") for r in range(2)]


@pytest.mark.slow
def test_global_mode_on_two_gloo_ranks_equals_one_process(tmp_path):
    model, _, reg, loss = _reference("global")
    ranks = _two_ranks(tmp_path, "global")
    for res in ranks:  # every rank sees the regulariser of the whole global batch
        assert res["reg"] == pytest.approx(reg, rel=1e-5, abs=1e-7)
        assert res["loss"] == pytest.approx(loss, rel=1e-5)
        for k, p in model.named_parameters():
            torch.testing.assert_close(res["grads"][k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_batch_mode_on_two_ranks_is_per_rank_and_differs_from_one_process(tmp_path):
    _, tokens, reg, _ = _reference("batch")
    ranks = _two_ranks(tmp_path, "batch")
    assert ranks[0]["reg"] != pytest.approx(ranks[1]["reg"], rel=1e-4)  # each rank pools its own micro-batch
    assert (ranks[0]["reg"] + ranks[1]["reg"]) / 2 != pytest.approx(reg, rel=1e-4)
    # ... and each equals the batch-mode regulariser of its half computed alone
    torch.manual_seed(5)
    model = MoEUTLM(tiny_config(entropy_reg_mode="batch")).train()
    half = tokens.chunk(2)[0]
    assert model(half[:, :-1]).reg_loss.item() == pytest.approx(ranks[0]["reg"], rel=1e-5)


def test_global_log_mean_is_stable_for_large_logits():
    logits = [torch.full((2, 3, 4), 80.0), torch.zeros(2, 3, 4)]
    logits[0][..., 0] = 200.0
    val = entropy_of_mean_softmax(logits, "batch")
    assert math.isfinite(val.item()) and val.item() <= 0
