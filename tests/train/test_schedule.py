import pytest

from moeut.train.schedule import lr_at


def test_linear_warmup_then_cosine_to_ten_percent():
    peak, total, warm = 1.0, 1000, 100
    assert lr_at(0, peak=peak, total_steps=total, warmup=warm) == pytest.approx(0.01)
    assert lr_at(99, peak=peak, total_steps=total, warmup=warm) == pytest.approx(1.0)
    assert lr_at(100, peak=peak, total_steps=total, warmup=warm) == pytest.approx(1.0)
    assert lr_at(550, peak=peak, total_steps=total, warmup=warm) == pytest.approx(0.55)
    assert lr_at(1000, peak=peak, total_steps=total, warmup=warm) == pytest.approx(0.1)
    lrs = [lr_at(s, peak=peak, total_steps=total, warmup=warm) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup_starts_at_peak():
    assert lr_at(0, peak=2.5e-4, total_steps=10, warmup=0) == pytest.approx(2.5e-4)
