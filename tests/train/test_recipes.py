"""Every preset carries its training recipe; the settings a user leaves out come from it."""

from __future__ import annotations

import pytest

from moeut.cli import main
from moeut.model.presets import PRESETS, RECIPES, Recipe
from moeut.train import TrainConfig
from tests.train.conftest import train_args


def test_every_preset_has_an_explicit_recipe():
    assert set(RECIPES) == set(PRESETS)
    assert all(isinstance(r, Recipe) for r in RECIPES.values())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_train_config_takes_the_presets_recipe(preset):
    cfg, recipe = TrainConfig(preset=preset), RECIPES[preset]
    assert (cfg.warmup_steps, cfg.grad_clip, cfg.lr) == (recipe.warmup_steps, recipe.grad_clip, recipe.lr)
    if "-44m" in preset:  # the paper: no warmup, κ = 0.1 at 44M
        assert (cfg.warmup_steps, cfg.grad_clip) == (0, 0.1)
    elif preset.endswith(("-tiny", "-tiny-act", "-tiny-adaptive", "-tiny-noact", "-small")):  # CPU: brief warmup
        assert cfg.warmup_steps <= 100
    else:  # the paper from 126M up: 4000 warmup steps, κ = 0.25
        assert (cfg.warmup_steps, cfg.grad_clip) == (4000, 0.25)


def test_act_presets_train_like_their_twins():
    assert TrainConfig(preset="moeut-tiny-act").warmup_steps == TrainConfig(preset="moeut-tiny").warmup_steps
    assert TrainConfig(preset="moeut-tiny-adaptive").warmup_steps == TrainConfig(preset="moeut-tiny").warmup_steps
    assert TrainConfig(preset="moeut-44m-act").warmup_steps == TrainConfig(preset="moeut-44m").warmup_steps


def test_explicit_settings_win_over_the_recipe():
    cfg = TrainConfig(preset="moeut-244m", warmup_steps=10, grad_clip=0.5, lr=1e-3)
    assert (cfg.warmup_steps, cfg.grad_clip, cfg.lr) == (10, 0.5, 1e-3)


def test_warmup_longer_than_the_run_is_warned_with_the_fix(tiny_data, tmp_path, capsys):
    assert main(train_args(tiny_data, tmp_path / "run", steps=4, warmup=8)) == 0
    out = capsys.readouterr().out
    assert "warning    warmup 8 >= steps 4: the learning rate never reaches --lr 0.003" in out
    assert "pass --warmup N with N < --steps" in out
    assert main(train_args(tiny_data, tmp_path / "ok", steps=4, warmup=2)) == 0
    assert "warmup 2 >=" not in capsys.readouterr().out
