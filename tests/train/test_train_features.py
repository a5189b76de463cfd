"""`moeut train` pretraining features end to end: systems metrics, activation checkpointing, the WSD
schedule and the resume rule for changed steps, --init-from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeut.cli import main
from moeut.data import BatchSampler, TokenDataset, prepare
from moeut.model import build_model
from moeut.model.accounting import model_stats
from moeut.run import latest_checkpoint
from moeut.train import TrainConfig, train_step
from moeut.train.systems import peak_for_name, train_flops_per_token
from tests.data.helpers import make_documents
from tests.train.conftest import TINY_MODEL, train_args


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_lines(run: Path) -> list[dict]:
    return [m for m in _metrics(run) if "train_loss" in m]


# ------------------------------------------------------------------ metrics

@pytest.mark.slow
def test_every_logged_step_carries_the_systems_metrics(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, steps=3, eval_every=0, save_every=3)) == 0
    lines = _train_lines(run)
    assert len(lines) == 3
    for m in lines:
        assert m["grad_norm"] > 0 and m["tok_per_s"] > 0 and m["tflops"] > 0
        assert m["mfu"] is None  # CPU, no --peak-tflops
        assert isinstance(m["peak_memory_bytes"], int) and m["peak_memory_bytes"] >= 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("peak_memory_bytes", "tflops", "mfu", "grad_norm", "tok_per_s", "peak_memory_kind"):
        assert key in summary
    assert summary["peak_memory_kind"].startswith("cpu peak RSS")


@pytest.mark.slow
def test_mfu_is_tflops_over_the_given_peak(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main([*train_args(tiny_data, run, steps=2, eval_every=0, save_every=2), "--peak-tflops", "0.5"]) == 0
    for m in _train_lines(run):
        assert m["mfu"] == pytest.approx(m["tflops"] / 0.5, rel=1e-12)


def test_flops_convention_and_peak_table():
    cfg = TrainConfig(preset="moeut-tiny", model_overrides=TINY_MODEL).model_config()
    assert train_flops_per_token(cfg, 32) == 6 * model_stats(cfg, context=32)["macs_per_token"]
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA H200") == 989.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("NVIDIA L4") == 121.0
    assert peak_for_name("NVIDIA A10") == 125.0
    assert peak_for_name("NVIDIA A10G") is None  # not the A10, and not guessed
    assert peak_for_name("Some Future Accelerator") is None


@pytest.mark.slow
@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_flagged(tiny_data, tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr("moeut.train.console.cpu_has_native_bf16", lambda: native)
    assert main([*train_args(tiny_data, tmp_path / "run", steps=1, eval_every=0, save_every=1),
                 "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "bf16 autocast" in out
    assert ("no native bf16" in out) == (not native)
    assert "runs bf16 natively" not in out


@pytest.mark.slow
def test_training_on_a_cpu_tunes_malloc(tiny_data, tmp_path, monkeypatch):
    """`moeut train` on a CPU keeps glibc from mmap-ing every large tensor, as `moeut demo` does (without it a
    bf16 demo-sized run spent a third of its time in the kernel)."""
    calls = []
    monkeypatch.setattr("moeut.train.trainer.tune_malloc", lambda: calls.append(1) or True)
    assert main(train_args(tiny_data, tmp_path / "run", steps=1, eval_every=0, save_every=1)) == 0
    assert calls == [1]


@pytest.mark.slow
@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_fp32_on_a_cpu_and_points_to_bf16_where_it_is_native(tiny_data, tmp_path, capsys,
                                                                                monkeypatch, native):
    monkeypatch.setattr("moeut.train.console.cpu_has_native_bf16", lambda: native)
    assert main(train_args(tiny_data, tmp_path / "run", steps=1, eval_every=0, save_every=1)) == 0
    out = capsys.readouterr().out
    assert "(fp32)" in out and "bf16 autocast" not in out
    assert ("--precision bf16 trains faster here" in out) == native


# ------------------------------------------------------------------ activation checkpointing

@pytest.mark.slow
def test_activation_checkpointing_trains_exactly_as_without(tiny_data, tmp_path):
    plain, ac = tmp_path / "plain", tmp_path / "ac"
    common = dict(steps=4, eval_every=0, save_every=4, routing_every=2)
    assert main(train_args(tiny_data, plain, **common)) == 0
    assert main([*train_args(tiny_data, ac, **common), "--activation-checkpointing"]) == 0
    a, b = _train_lines(plain), _train_lines(ac)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for k in ("train_loss", "reg_loss", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-6, abs=1e-12), k
        routing = {k for k in x if k.startswith("routing/")}
        assert routing == {k for k in y if k.startswith("routing/")}
        for k in routing:  # the routing counts of each application, counted once
            assert y[k] == x[k], k
    wa, wb = latest_checkpoint(plain)[1]["model"], latest_checkpoint(ac)[1]["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)
    assert json.loads((ac / "train_config.json").read_text())["activation_checkpointing"] == 1


# ------------------------------------------------------------------ schedules and resume

@pytest.mark.slow
def test_resume_with_other_steps_of_a_cosine_run_is_refused_with_the_way_out(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run, steps=4, eval_every=0, save_every=2, warmup=0)) == 0
    capsys.readouterr()
    assert main([*train_args(tiny_data, run, steps=6, eval_every=0, save_every=2, warmup=0), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "--schedule wsd" in err and "--allow-schedule-change" in err
    assert latest_checkpoint(run)[1]["step"] == 4
    assert main([*train_args(tiny_data, run, steps=6, eval_every=0, save_every=2, warmup=0), "--resume",
                 "--allow-schedule-change"]) == 0
    assert latest_checkpoint(run)[1]["step"] == 6


@pytest.mark.slow
def test_wsd_run_extends_while_its_decay_has_not_started(tiny_data, tmp_path, capsys):
    wsd = ["--schedule", "wsd", "--decay-steps", "2"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    # a run of 8 steps stopped at step 4 (its last checkpoint), before its decay at step 6; extended to 12 steps
    assert main([*train_args(tiny_data, run, steps=8, eval_every=0, save_every=4, warmup=0), *wsd]) == 0
    latest_checkpoint(run)[0].unlink()
    assert latest_checkpoint(run)[1]["step"] == 4
    assert main([*train_args(tiny_data, run, steps=12, eval_every=0, save_every=4, warmup=0), *wsd, "--resume"]) == 0
    assert main([*train_args(tiny_data, ref, steps=12, eval_every=0, save_every=4, warmup=0), *wsd]) == 0
    got, want = _train_lines(run), _train_lines(ref)
    assert [m["lr"] for m in got] == [m["lr"] for m in want]
    assert [m["lr"] for m in got][:10] == [3e-3] * 10 and got[-1]["lr"] == pytest.approx(3e-4)
    # ... but not once its decay has started: 12 steps done, the decay began at step 10
    capsys.readouterr()
    assert main([*train_args(tiny_data, run, steps=20, eval_every=0, save_every=4, warmup=0), *wsd,
                 "--resume"]) == 1
    err = capsys.readouterr().err
    assert "decay started at step 10" in err and "--allow-schedule-change" in err


# ------------------------------------------------------------------ init-from

@pytest.fixture(scope="module")
def source_run(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("source") / "run"
    assert main(train_args(tiny_data, run, steps=4, eval_every=0, save_every=4)) == 0
    return run


@pytest.mark.slow
def test_init_from_takes_the_weights_and_a_fresh_optimizer(tiny_data, source_run, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_data, run, steps=1, eval_every=0, save_every=1, seed=7, lr=1e-3, warmup=0)
    assert main([*args, "--init-from", str(source_run)]) == 0
    state = latest_checkpoint(run)[1]
    assert state["step"] == 1
    assert all(s["step"] == 1 for s in state["optimizer"]["state"].values())  # one AdamW step, not 4 + 1

    # the same step by hand: the source's weights at step 0, a new AdamW, the new run's first batch
    cfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    src = latest_checkpoint(source_run)[1]["model"]
    model = build_model(cfg.model_config().replace(vocab_size=400))
    model.load_state_dict(src)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr_schedule().lr(0), betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    batch = BatchSampler(TokenDataset.open(tiny_data / "train"), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         seed=cfg.seed).batch(0)
    train_step(model, opt, batch, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip)
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    assert any(not torch.equal(src[k], v) for k, v in state["model"].items())  # and it did train


def test_init_from_names_the_mismatching_model_fields(tiny_data, source_run, tmp_path, capsys):
    args = train_args(tiny_data, tmp_path / "run", steps=1)
    assert main([*args, "--model", "ff_k=4", "--model", "d_head=8", "--init-from", str(source_run)]) == 1
    err = capsys.readouterr().err
    assert "ff_k (this run 4, source 2)" in err and "d_head (this run 8, source 16)" in err
    assert "--model ff_k=2" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_init_from_refuses_data_of_another_tokenizer_unless_allowed(tiny_data, source_run, tmp_path, capsys):
    other = tmp_path / "other"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(300, seed=5)))
    prepare([str(corpus)], other, vocab_size=400, val_fraction=0.05, progress=False)
    args = train_args(other, tmp_path / "run", steps=1, eval_every=0, save_every=1)
    assert main([*args, "--init-from", str(source_run)]) == 1
    err = capsys.readouterr().err
    assert "tokenizer" in err and "--allow-tokenizer-mismatch" in err
    assert main([*args, "--init-from", str(source_run), "--allow-tokenizer-mismatch"]) == 0


def test_init_from_a_missing_source_is_explained(tiny_data, tmp_path, capsys):
    assert main([*train_args(tiny_data, tmp_path / "run", steps=1), "--init-from", str(tmp_path / "nope")]) == 1
    assert "--init-from" in capsys.readouterr().err
