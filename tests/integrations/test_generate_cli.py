"""`moeut generate`: streamed text equals the decoded generate() output; --json, --interactive, errors."""

from __future__ import annotations

import argparse
import io
import json
import shutil

import pytest
import torch

from moeut.cli.generate import TextStreamer
from moeut.cli.generate import add_arguments as add_generate_arguments, run as run_generate
from tests.run_helpers import load_model


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    return p.parse_args(list(argv))


def test_streams_the_greedy_continuation(run_dir, tokenizer, capsys):
    prompt = "Once upon a time the cat"
    assert run_generate(_args("--checkpoint", str(run_dir), "--prompt", prompt, "--temperature", "0",
                              "--max-new-tokens", "20")) == 0
    captured = capsys.readouterr()
    ids = tokenizer.encode(prompt)
    new = load_model(run_dir).generate([ids], 20, temperature=0, eos_id=tokenizer.eos_id)[0]
    body = [t for t in new if t != tokenizer.eos_id]
    assert captured.out == tokenizer.decode(ids + body) + "\n"
    assert "tokens/s" in captured.err


def test_json_several_prompts_sampling_is_seeded(run_dir, tokenizer, capsys):
    argv = ["--checkpoint", str(run_dir / "checkpoints" / "ckpt_00000007.pt"), "--prompt", "the dog",
            "--prompt", "", "--max-new-tokens", "12", "--seed", "5", "--top-k", "20", "--top-p", "0.9", "--json"]
    assert run_generate(_args(*argv)) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert run_generate(_args(*argv)) == 0
    second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first == second and len(first) == 2
    assert first[1]["prompt_ids"] == [tokenizer.eos_id]  # an empty prompt starts a new document
    for res in first:
        body = [t for t in res["new_ids"] if t != tokenizer.eos_id]
        assert res["completion"] == tokenizer.decode(res["prompt_ids"] + body)[len(tokenizer.decode(res["prompt_ids"])):]


def test_interactive_loop_reads_prompts_until_an_empty_line(run_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\nthe dog\n\nnever read\n"))
    assert run_generate(_args("--checkpoint", str(run_dir), "--interactive", "--temperature", "0",
                              "--max-new-tokens", "5", "--json")) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["the cat", "the dog"]


def test_streamer_waits_for_whole_characters(tokenizer):
    out = io.StringIO()
    prompt = tokenizer.encode("smile")
    streamer = TextStreamer(tokenizer, prompt, out, stop_id=tokenizer.eos_id)
    emoji = tokenizer.encode("smile 🙃")[len(prompt):]  # byte-fallback pieces, one byte each
    assert len(emoji) >= 4
    seen = []
    for t in emoji:
        streamer(torch.tensor([t]))
        seen.append(out.getvalue())
    assert all("\ufffd" not in s for s in seen)
    assert seen[-2] == "smile" or seen[-2].endswith(" ")  # nothing of the emoji before its last byte
    streamer(torch.tensor([tokenizer.eos_id]))
    streamer(torch.tensor([tokenizer.encode("x")[-1]]))  # after EOS nothing more is printed
    streamer.finish()
    assert out.getvalue() == "smile 🙃\n"


def test_errors_name_the_fix(run_dir, tmp_path):
    from moeut.data.tokenizer import TokenizerConfig, train_tokenizer
    from moeut.run import load_run
    from tests.data.helpers import make_documents

    with pytest.raises(ValueError, match="--prompt"):
        run_generate(_args("--checkpoint", str(run_dir)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_generate(_args("--checkpoint", str(tmp_path / "nope"), "--prompt", "x"))
    with pytest.raises(ValueError, match="temperature"):
        run_generate(_args("--checkpoint", str(run_dir), "--prompt", "x", "--temperature", "-1"))
    # a run whose tokenizer was replaced by another one
    fake = tmp_path / "fake_run"
    shutil.copytree(run_dir, fake)
    train_tokenizer(make_documents(60, seed=4), tmp_path / "other", TokenizerConfig(vocab_size=380))
    shutil.copyfile(tmp_path / "other" / "tokenizer.model", fake / "tokenizer.model")
    (fake / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer mismatch: .* is not the tokenizer"):
        load_run(fake)
