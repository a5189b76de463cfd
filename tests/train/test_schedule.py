import warnings

import pytest
import torch

from moeut.train.schedule import lr_at


def _training_code_lrs(peak: float, total: int, warmup: int, final_ratio: float, steps: list[int]) -> list[float]:
    """What the authors' training code sets before step i: CosineAnnealingLR(T_max=total, eta_min) stepped to
    epoch max(0, i − warmup), then, during warmup, lr · (i + 1) / warmup."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=peak)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=final_ratio * peak)
    out = []
    for i in steps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # step(epoch) is deprecated; the training code calls it so
            sched.step(max(0, i - warmup))
        lr = opt.param_groups[0]["lr"]
        out.append(peak / warmup * (i + 1) if i < warmup else lr)
    return out


@pytest.mark.parametrize("total,warmup", [(100_000, 4000), (1000, 100), (500, 50), (10, 0)])
def test_lr_matches_the_training_codes_cosine_annealing(total, warmup):
    steps = sorted({0, 1, warmup - 1, warmup, warmup + 1, total // 3, total // 2, 86_000 % total, total - 1} - {-1})
    want = _training_code_lrs(2.5e-4, total, warmup, 0.1, steps)
    got = [lr_at(s, peak=2.5e-4, total_steps=total, warmup=warmup, final_ratio=0.1) for s in steps]
    assert got == pytest.approx(want, rel=1e-9, abs=0)


def test_paper_schedule_ends_above_the_minimum_with_warmup():
    # T_max = total steps, evaluated from the end of warmup: the last step is at ≈ 0.1036 · lr, not 0.1 · lr
    last = lr_at(99_999, peak=1.0, total_steps=100_000, warmup=4000)
    assert last == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 95_999 / 100_000)).item()))
    assert 0.1035 < last < 0.1037
    # without warmup it reaches (almost) exactly the minimum
    assert lr_at(99_999, peak=1.0, total_steps=100_000, warmup=0) == pytest.approx(0.1, abs=1e-9)


def test_linear_warmup_then_monotone_cosine():
    peak, total, warm = 1.0, 1000, 100
    assert lr_at(0, peak=peak, total_steps=total, warmup=warm) == pytest.approx(0.01)
    assert lr_at(99, peak=peak, total_steps=total, warmup=warm) == pytest.approx(1.0)
    assert lr_at(100, peak=peak, total_steps=total, warmup=warm) == pytest.approx(1.0)
    # halfway through T_max (epoch 500 = step 600): the midpoint between peak and the minimum
    assert lr_at(600, peak=peak, total_steps=total, warmup=warm) == pytest.approx(0.55)
    lrs = [lr_at(s, peak=peak, total_steps=total, warmup=warm) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup_starts_at_peak():
    assert lr_at(0, peak=2.5e-4, total_steps=10, warmup=0) == pytest.approx(2.5e-4)


def test_non_positive_total_is_refused():
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, peak=1.0, total_steps=0, warmup=0)
