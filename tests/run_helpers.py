"""Test shorthand for the one loader: the model of a run directory or checkpoint file, on the CPU."""

from __future__ import annotations

from moeut.run import load_run


def load_model(path, **kw):
    return load_run(path, device="cpu", require_tokenizer=False, **kw).model
