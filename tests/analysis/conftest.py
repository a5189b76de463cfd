"""Tiny models with hand-set routers, tiny prepared data and tiny trained runs for the analysis tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeut.data import prepare
from moeut.model import ModelConfig, build_model
from tests.data.helpers import make_documents

# a MoEUT of a few thousand parameters (as tests/train), and a dense model of the same shape
TINY_MOEUT = dict(d_model=32, n_layers=4, group_size=2, n_heads=2, d_head=16, att_n_experts=3,
                  ff_n_experts=8, ff_expert_size=16, ff_k=2, context_length=32)
TINY_DENSE = dict(d_model=32, n_layers=4, group_size=4, n_heads=2, d_head=16, d_ff=64, context_length=32)

# the hand-set model: token v belongs to class c = v % 3; shared layer 0 routes class c to experts {2c, 2c+1},
# shared layer 1 to experts {2c', 2c'+1} with c' = (c - 1) % 3; every layer's update is zero, so every
# repeat of a layer sees the same residual (the embedding) and selects the same experts
HAND_CFG = dict(arch="moeut", vocab_size=12, d_model=8, n_layers=4, group_size=2, n_heads=2, d_head=4,
                att_n_experts=3, att_k=1, ff_n_experts=6, ff_expert_size=4, ff_k=2, context_length=8)


def hand_expected_experts(token: int, layer: int) -> set[int]:
    c = token % 3
    c = c if layer == 0 else (c - 1) % 3
    return {2 * c, 2 * c + 1}


@torch.no_grad()
def hand_set_model():
    cfg = ModelConfig(**HAND_CFG)
    model = build_model(cfg).eval()
    d = cfg.d_model
    emb = torch.zeros(cfg.vocab_size, d)
    for v in range(cfg.vocab_size):
        c = v % 3
        emb[v, c], emb[v, c + 4] = 1.0, -1.0  # LayerNorm turns this into 2·(e_c − e_{c+4})
    model.embedding.weight.copy_(emb)
    for g, layer in enumerate(model.layers):
        layer.attention.o.zero_()  # no attention update
        layer.ffn.values.zero_()  # no MLP update: the residual stays the embedding
        sel = torch.zeros(cfg.ff_n_experts, d)
        for j in range(cfg.ff_n_experts):
            cls = j // 2 if g == 0 else (j // 2 + 1) % 3  # expert j wins for this token class
            sel[j, cls] = 1.0
        layer.ffn.expert_sel.copy_(sel)
    return model


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysis_data")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(300)))
    out = root / "prepared"
    prepare([str(corpus)], out, vocab_size=400, val_fraction=0.1, progress=False)
    return out


def _train(data: Path, out: Path, preset: str, model: dict, steps: int = 3) -> Path:
    from moeut.train import TrainConfig, train

    cfg = TrainConfig(preset=preset, model_overrides=model, data=str(data), out=str(out), steps=steps, batch_size=4,
                      seq_len=32, lr=3e-3, eval_every=0, eval_batches=2, save_every=0, log_every=1, routing_every=0)
    train(cfg, show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis_runs")
    return {"moeut": _train(tiny_data, root / "moeut", "moeut-tiny", TINY_MOEUT),
            "dense": _train(tiny_data, root / "dense", "dense-tiny", TINY_DENSE)}


def assert_png(path: Path, figsize: tuple[float, float], *, dpi: int = 120, tight: bool = False) -> None:
    """``path`` decodes as an image of the figure's size, with data drawn on it.

    Size: ``figsize`` (inches, as the plot code passes it to ``plt.subplots``) × ``dpi`` pixels, to a pixel; with
    ``tight`` (``savefig(bbox_inches="tight")`` crops or extends to the drawn content) within 25 %. Content: at
    least 0.05 % of the pixels are coloured (not white, grey or black: axes, ticks and text are black on white),
    i.e. a curve, markers or a heatmap was drawn (the sparsest plot here, compute.png's points, has 0.16 %).
    """
    from matplotlib import image

    assert path.is_file(), f"{path} was not written"
    img = image.imread(str(path))  # float RGB(A) in [0, 1]; raises on anything that is not a PNG
    assert img.ndim == 3 and img.shape[2] in (3, 4), f"{path}: unexpected image shape {img.shape}"
    height, width = img.shape[:2]
    want_w, want_h = figsize[0] * dpi, figsize[1] * dpi
    if tight:
        assert abs(width - want_w) <= 0.25 * want_w and abs(height - want_h) <= 0.25 * want_h, (
            f"{path} is {width}x{height} px, expected about {want_w:.0f}x{want_h:.0f} (figsize {figsize}, tight)")
    else:
        assert abs(width - want_w) <= 1 and abs(height - want_h) <= 1, (
            f"{path} is {width}x{height} px, expected {want_w:.0f}x{want_h:.0f} (figsize {figsize} at {dpi} dpi)")
    rgb = img[..., :3]
    coloured = float(((rgb.max(axis=2) - rgb.min(axis=2)) > 0.2).mean())
    assert coloured >= 0.0005, f"{path}: only {coloured:.3%} of the pixels are coloured: no data drawn?"
