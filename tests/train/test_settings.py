"""One definition per setting: every TrainConfig field declares its help, flag and resume rule once, and the
command line, --help and the resume check all follow it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from moeut.cli.settings_flags import add_setting_flags, given_settings
from moeut.cli.train import add_arguments
from moeut.settings import settings_of
from moeut.train import TrainConfig
from moeut.train.resume import RESUMABLE_CHANGES

# a value for each field's flag that differs from its default and is valid on its own
EXAMPLES = {"preset": "dense-tiny", "out": "runs/x", "steps": 77, "batch_size": 8, "seq_len": 64, "grad_accum": 2,
            "lr": 1e-3, "optimizer": "muon", "muon_lr": 0.02, "muon_weight_decay": 0.1, "muon_momentum": 0.9,
            "muon_lr_scale": "original", "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1, "warmup_steps": 7,
            "final_lr_ratio": 0.2, "grad_clip": 0.5, "eval_every": 9, "eval_batches": 3, "save_every": 11,
            "save_every_minutes": 2.5, "keep_checkpoints": 5, "log_every": 4, "routing_every": 6,
            "residual_norm_every": 12, "seed": 3, "device": "cpu", "precision": "bf16", "backend": "torch",
            "fsdp": True, "compile": True, "activation_checkpointing": 2, "schedule": "wsd", "decay_steps": 10,
            "decay_fraction": 0.3, "decay_shape": "cosine", "peak_tflops": 100.0, "init_from": "runs/y",
            "depth_sampling": "uniform:1-3", "wandb_project": "p", "wandb_run_name": "n", "wandb_entity": "e"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_every_field_is_defined_as_a_setting():
    assert [f.name for f, _ in settings_of(TrainConfig)] == [f.name for f in dataclasses.fields(TrainConfig)]


def test_every_flag_sets_its_field():
    cli_fields = [f.name for f, s in settings_of(TrainConfig) if s.cli]
    assert sorted(cli_fields) == sorted(EXAMPLES)
    for name, value in EXAMPLES.items():
        flag = "--" + name.replace("_", "-")
        argv = [flag] if value is True else [flag, *map(str, value if isinstance(value, tuple) else [value])]
        given = given_settings(_parser().parse_args(argv), TrainConfig)
        assert given == {name: value}, name


def test_flags_left_out_are_not_given_so_a_config_file_or_saved_run_fills_them():
    assert given_settings(_parser().parse_args([]), TrainConfig) == {}


@pytest.mark.parametrize("alias, field, value", [("--warmup", "warmup_steps", 5), ("--clip", "grad_clip", 0.3),
                                                 ("--keep", "keep_checkpoints", 2)])
def test_established_flag_spellings_still_work(alias, field, value):
    assert given_settings(_parser().parse_args([alias, str(value)]), TrainConfig) == {field: value}


def test_help_shows_each_settings_text_and_default():
    text = " ".join(_parser().format_help().split())
    for f, s in settings_of(TrainConfig):
        if s.cli:
            assert " ".join(s.help.split()) in text, f.name
    assert "optimizer steps (default: 1000)" in text
    assert "linear warmup steps (default: the preset's recipe" in text


def test_resume_rules_come_from_the_definitions():
    assert RESUMABLE_CHANGES == tuple(f.name for f, s in settings_of(TrainConfig) if s.resumable)
    assert {"out", "steps", "log_every", "wandb_project"} <= set(RESUMABLE_CHANGES)
    assert not {"lr", "seed", "preset", "batch_size", "precision"} & set(RESUMABLE_CHANGES)


def test_a_generated_flag_for_a_new_field(monkeypatch):
    """A field added with setting() gets its flag, help and parsing with no other edit."""
    from moeut.settings import setting

    @dataclasses.dataclass
    class Cfg:
        width: int | None = setting(None, help="the width")
        ratio: float = setting(0.5, help="a ratio")

    p = argparse.ArgumentParser()
    add_setting_flags(p, Cfg)
    assert given_settings(p.parse_args(["--width", "3", "--ratio", "0.25"]), Cfg) == {"width": 3, "ratio": 0.25}
    assert "a ratio (default: 0.5)" in " ".join(p.format_help().split())
