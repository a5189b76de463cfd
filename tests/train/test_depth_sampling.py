"""Training with a depth drawn per step (Huginn-style): the laws, their determinism, and a run that uses them."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from moeut.cli import main
from moeut.model import ConfigError
from moeut.run import latest_checkpoint, list_checkpoints
from moeut.train import TrainConfig
from moeut.train.depth_sampling import DepthSampler, DepthSamplingError
from tests.train.conftest import train_args


@pytest.mark.parametrize("spec, law, low, high", [("uniform:1-4", "uniform", 1, 4), ("uniform:3-3", "uniform", 3, 3),
                                                  ("lognormal-poisson:2:6", "lognormal-poisson", 1, 6),
                                                  ("lognormal-poisson:3.5:8:0.3", "lognormal-poisson", 1, 8)])
def test_specs_parse(spec, law, low, high):
    s = DepthSampler.parse(spec)
    assert (s.law, s.low, s.high) == (law, low, high)


@pytest.mark.parametrize("spec", ["uniform", "uniform:4-1", "uniform:0-2", "poisson:2", "lognormal-poisson:1:4",
                                  "lognormal-poisson:5:4", "lognormal-poisson:2", "lognormal-poisson:2:4:-1"])
def test_bad_specs_say_the_accepted_forms(spec):
    with pytest.raises(DepthSamplingError, match="depth sampling"):
        DepthSampler.parse(spec)


def test_draws_are_a_function_of_seed_and_step_and_leave_the_global_rng_alone():
    s = DepthSampler.parse("uniform:1-4")
    state = torch.get_rng_state()
    a = [s.repeats(0, step) for step in range(200)]
    assert torch.equal(state, torch.get_rng_state())
    assert a == [s.repeats(0, step) for step in range(200)]
    assert a != [s.repeats(1, step) for step in range(200)]
    assert set(a) == {1, 2, 3, 4} and abs(statistics.mean(a) - 2.5) < 0.25


def test_lognormal_poisson_has_the_mean_it_is_given():
    s = DepthSampler.parse("lognormal-poisson:3:20")
    draws = [s.repeats(7, step) for step in range(4000)]
    assert min(draws) >= 1 and max(draws) <= 20
    assert abs(statistics.mean(draws) - 3) < 0.1
    assert len(set(draws)) >= 5  # a spread, not a constant


def test_config_checks_the_spec_and_the_architecture():
    with pytest.raises(ConfigError, match="depth_sampling"):
        TrainConfig(preset="moeut-tiny", depth_sampling="uniform:2")
    with pytest.raises(ConfigError, match="dense baseline"):
        TrainConfig(preset="dense-tiny", depth_sampling="uniform:1-3")


@pytest.mark.slow
def test_training_runs_each_step_at_its_drawn_depth_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    seen = []
    from moeut.model.lm import MoEUTLM

    forward = MoEUTLM.forward

    def spy(self, tokens, **kw):
        if self.training:
            seen.append(kw.get("repeats"))
        return forward(self, tokens, **kw)

    monkeypatch.setattr(MoEUTLM, "forward", spy)
    args = lambda run: train_args(tiny_data, run, steps=8, save_every=4, depth_sampling="uniform:1-3")  # noqa: E731
    ref = tmp_path / "ref"
    assert main(args(ref)) == 0
    sampler = DepthSampler.parse("uniform:1-3")
    assert seen == [sampler.repeats(0, step) for step in range(8)]
    logged = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [m["depth/repeats"] for m in logged if "train_loss" in m] == seen

    run = tmp_path / "run"
    assert main(args(run)) == 0
    list_checkpoints(run)[-1].unlink()  # as if stopped after the step-4 checkpoint
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    a, b = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
