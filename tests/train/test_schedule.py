import math
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


# ------------------------------------------------------------------ WSD
from moeut.model.config import ConfigError  # noqa: E402
from moeut.train.config import TrainConfig  # noqa: E402
from moeut.train.schedule import LRSchedule, wsd_lr_at  # noqa: E402


@pytest.mark.parametrize("shape, step, want", [
    ("linear", 0, 0.1),  # warmup: (0 + 1) / 10
    ("linear", 9, 1.0),
    ("linear", 10, 1.0),  # stable
    ("linear", 79, 1.0),  # last stable step (the decay starts at 100 − 20 = 80)
    ("linear", 80, 0.1 + 0.9 * (1 - 1 / 20)),
    ("linear", 89, 0.1 + 0.9 * 0.5),
    ("linear", 99, 0.1),  # the floor exactly at the last step
    ("cosine", 80, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 20))),
    ("cosine", 89, 0.1 + 0.9 * 0.5),
    ("cosine", 99, 0.1),
])
def test_wsd_learning_rates_at_chosen_steps(shape, step, want):
    got = wsd_lr_at(step, peak=1.0, total_steps=100, warmup=10, decay_steps=20, final_ratio=0.1, shape=shape)
    assert got == pytest.approx(want, rel=1e-12)


def test_wsd_from_train_config_decay_fraction_and_steps():
    frac = TrainConfig(steps=100, warmup_steps=10, lr=1.0, schedule="wsd", decay_fraction=0.2).lr_schedule()
    steps = TrainConfig(steps=100, warmup_steps=10, lr=1.0, schedule="wsd", decay_steps=20).lr_schedule()
    default = TrainConfig(steps=100, warmup_steps=10, lr=1.0, schedule="wsd").lr_schedule()
    assert frac == steps == default and frac.decay_start == 80
    assert [frac.lr(s) for s in range(100)] == [wsd_lr_at(s, peak=1.0, total_steps=100, warmup=10, decay_steps=20)
                                                for s in range(100)]
    cosine = TrainConfig(steps=100, warmup_steps=10, lr=1.0).lr_schedule()
    assert cosine.lr(50) == lr_at(50, peak=1.0, total_steps=100, warmup=10)


def test_wsd_extension_keeps_the_past_until_the_decay():
    short = LRSchedule("wsd", 1.0, 100, 10, 0.1, 20)
    longer = LRSchedule("wsd", 1.0, 200, 10, 0.1, 20)
    assert short.first_difference(longer, 80) is None  # resume at 80: nothing taken so far changes
    assert short.first_difference(longer, 81) == 80  # the decay had started at step 80
    cos_a, cos_b = LRSchedule("cosine", 1.0, 100, 10), LRSchedule("cosine", 1.0, 200, 10)
    assert cos_a.first_difference(cos_b, 10) is None  # still in warmup
    assert cos_a.first_difference(cos_b, 12) == 11  # the cosine depends on the total from the first step after warmup


@pytest.mark.parametrize("kw, message", [
    (dict(schedule="linear"), "TrainConfig.schedule"),
    (dict(decay_steps=10), "setting of --schedule wsd"),
    (dict(schedule="wsd", decay_steps=10, decay_fraction=0.1), "not both"),
    (dict(schedule="wsd", decay_steps=200), "TrainConfig.decay_steps"),
    (dict(schedule="wsd", decay_fraction=0.95, warmup_steps=10), "TrainConfig.warmup_steps"),
    (dict(schedule="wsd", decay_shape="step"), "TrainConfig.decay_shape"),
    (dict(activation_checkpointing=-1), "TrainConfig.activation_checkpointing"),
    (dict(peak_tflops=0.0), "TrainConfig.peak_tflops"),
])
def test_bad_schedule_settings_name_the_field(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(steps=100, **kw)
