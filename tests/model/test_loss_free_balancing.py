"""Loss-free balancing (``ModelConfig.balancing``, DeepSeek-V3's auxiliary-loss-free strategy): the selection bias
chooses the experts and leaves the gates alone, the update rule, one bias per distinct layer, the regulariser
per mode, and the default ("entropy") unchanged."""

from __future__ import annotations

import pytest
import torch

from moeut.model import ConfigError, MoEUTLM
from moeut.model.config import SCHEMA_VERSION
from moeut.model.routing import loss_free_update, sigmoid_topk
from tests.model.helpers import sut_config, tiny_config


# ------------------------------------------------------------------ the rule and the selection
def test_update_rule_on_a_hand_computed_case():
    # 4 experts, loads 5, 1, 3, 3: mean 3 -> expert 0 above (b -= u), 1 below (b += u), 2 and 3 at the mean (kept)
    bias = torch.tensor([0.0, 0.5, -0.25, 1.0])
    loss_free_update(bias, torch.tensor([5, 1, 3, 3]), rate=0.125)
    assert bias.tolist() == [-0.125, 0.625, -0.25, 1.0]
    # per head: head 0 loads (4, 0) mean 2; head 1 loads (1, 3) mean 2
    bias = torch.zeros(4)
    loss_free_update(bias, torch.tensor([4, 0, 1, 3]), rate=0.5, n_heads=2)
    assert bias.tolist() == [-0.5, 0.5, 0.5, -0.5]
    # a fractional mean (7 selections over 3 experts): every expert off the mean moves
    bias = torch.zeros(3)
    loss_free_update(bias, torch.tensor([2, 2, 3]), rate=1.0)
    assert bias.tolist() == [1.0, 1.0, -1.0]


def test_bias_chooses_the_experts_and_the_gates_stay_unbiased():
    router = torch.eye(4)  # logits = x
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain = sigmoid_topk(x, router, k=2)
    assert sorted(plain.indices[0].tolist()) == [0, 1]
    bias = torch.tensor([0.0, -1.0, 0.5, 0.0])  # σ + b: 0.881, -0.269, 1.0, 0.269 -> experts 2 and 0
    r = sigmoid_topk(x, router, k=2, bias=bias)
    order = r.indices[0].argsort()
    assert r.indices[0][order].tolist() == [0, 2]
    torch.testing.assert_close(r.gates[0][order], torch.sigmoid(torch.tensor([2.0, 0.0])), rtol=0, atol=0)
    torch.testing.assert_close(r.logits, plain.logits, rtol=0, atol=0)
    # the gates carry the gradient of σ(s) only (the bias has none)
    xg = x.clone().requires_grad_()
    sigmoid_topk(xg, router, k=2, bias=bias).gates.sum().backward()
    s = torch.sigmoid(x[0])
    torch.testing.assert_close(xg.grad[0], torch.tensor([s[0] * (1 - s[0]), 0.0, s[2] * (1 - s[2]), 0.0]))


def test_per_head_bias_of_switchhead_routers():
    router = torch.eye(4)  # 2 heads of 2 experts: logits [h, e] = x reshaped
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    bias = torch.tensor([0.0, 0.6, 0.0, 0.0])  # flips head 0's choice only
    r = sigmoid_topk(x, router, k=1, n_heads=2, bias=bias)
    assert r.indices[0].flatten().tolist() == [1, 1]
    torch.testing.assert_close(r.gates[0].flatten(), torch.sigmoid(torch.tensor([0.0, 1.0])), rtol=0, atol=0)


# ------------------------------------------------------------------ the model
def test_buffers_only_with_loss_free_balancing_and_never_parameters():
    plain = MoEUTLM(tiny_config())
    assert not [n for n, _ in plain.named_buffers()]  # the default's state dict is unchanged
    for mode in ("loss_free", "both"):
        model = MoEUTLM(tiny_config(balancing=mode))
        names = sorted(n for n, _ in model.named_buffers())
        assert names == sorted(f"layers.{g}.{n}" for g in range(2) for n in
                               ("attention.sel_v_bias", "attention.sel_o_bias", "ffn.expert_sel_bias"))
        assert all(not torch.any(b) for b in model.buffers())  # start at zero
        assert set(model.state_dict()) == set(plain.state_dict()) | set(names)
        assert not any(n.endswith("_bias") for n, _ in model.named_parameters())  # no optimizer, no weight decay
        assert model.num_params() == plain.num_params()


def test_entropy_default_is_bit_identical():
    tokens = torch.randint(0, 53, (3, 11), generator=torch.Generator().manual_seed(0))
    outs = []
    for cfg in (tiny_config(), tiny_config(balancing="entropy", balancing_rate=0.5)):
        torch.manual_seed(0)
        model = MoEUTLM(cfg).train()
        out = model(tokens[:, :-1], targets=tokens[:, 1:])
        (out.ce + out.reg_loss).backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = outs
    assert torch.equal(a.logits, b.logits) and torch.equal(a.ce, b.ce) and torch.equal(a.reg_loss, b.reg_loss)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_zero_bias_routes_as_the_default():
    tokens = torch.randint(0, 53, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    plain = MoEUTLM(tiny_config()).eval()
    torch.manual_seed(0)
    both = MoEUTLM(tiny_config(balancing="both")).eval()
    with torch.no_grad():
        a, b = plain(tokens, output_routing=True), both(tokens, output_routing=True)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.reg_loss, b.reg_loss)  # "both" keeps the regulariser


def test_regulariser_per_mode():
    tokens = torch.randint(0, 53, (2, 10), generator=torch.Generator().manual_seed(2))
    regs = {}
    for mode in ("entropy", "loss_free", "both"):
        torch.manual_seed(0)
        regs[mode] = MoEUTLM(tiny_config(balancing=mode)).train()(tokens).reg_loss
    assert regs["loss_free"].item() == 0.0
    assert regs["both"].item() == regs["entropy"].item() != 0.0
    # ACT's loss is not a balancing loss: it stays under loss_free
    torch.manual_seed(0)
    act = MoEUTLM(tiny_config(balancing="loss_free", act=True)).train()(tokens).reg_loss
    assert act.item() > 0.0


def test_bias_changes_the_routing_and_the_logits():
    tokens = torch.randint(0, 53, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    model = MoEUTLM(tiny_config(balancing="loss_free")).eval()
    with torch.no_grad():
        before = model(tokens, output_routing=True)
        model.layers[0].ffn.expert_sel_bias[0] = 2.0  # expert 0 of layer 0 wins every token's selection
        after = model(tokens, output_routing=True)
    assert not torch.equal(before.logits, after.logits)
    ffn = after.expert_counts["ffn"]  # applications 0, 2, 4 run layer 0 (abab)
    n_tokens = tokens.numel()
    assert ffn[0::2, 0].tolist() == [n_tokens] * 3
    assert before.expert_counts["ffn"][0, 0] < n_tokens


@pytest.mark.parametrize("order", ["abab", "aabb"])
def test_one_bias_per_distinct_layer_counts_summed_over_its_applications(order):
    model = MoEUTLM(tiny_config(balancing="loss_free", balancing_rate=0.25, group_order=order))
    g = torch.Generator().manual_seed(4)
    counts = {"ffn": torch.randint(0, 20, (6, 7), generator=g), "att_v": torch.randint(0, 20, (6, 9), generator=g),
              "att_o": torch.randint(0, 20, (6, 9), generator=g)}
    layer_of = [0, 1, 0, 1, 0, 1] if order == "abab" else [0, 0, 0, 1, 1, 1]
    per_layer = model.update_selection_bias(counts)
    for kind, heads, biases in (("ffn", 1, [lay.ffn.expert_sel_bias for lay in model.layers]),
                                ("att_v", 3, [lay.attention.sel_v_bias for lay in model.layers]),
                                ("att_o", 3, [lay.attention.sel_o_bias for lay in model.layers])):
        for layer in range(2):
            summed = sum(counts[kind][i] for i in range(6) if layer_of[i] == layer)
            assert torch.equal(per_layer[kind][layer], summed)
            want = torch.zeros_like(biases[layer])
            loss_free_update(want, summed, 0.25, n_heads=heads)
            assert torch.equal(biases[layer], want), (kind, layer)
    # a sampled depth (here 2 group applications of the 6 trained): the rows map to layers all the same
    short = {k: v[:4] for k, v in counts.items()}
    per_layer = model.counts_per_layer(short)
    layer_of = [0, 1, 0, 1] if order == "abab" else [0, 0, 1, 1]
    for layer in range(2):
        assert torch.equal(per_layer["ffn"][layer], sum(short["ffn"][i] for i in range(4) if layer_of[i] == layer))


def test_config_validation():
    for bad in ("aux", "", None):
        with pytest.raises(ConfigError, match="balancing"):
            tiny_config(balancing=bad)
    for bad in (-1e-3, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ConfigError, match="balancing_rate"):
            tiny_config(balancing="loss_free", balancing_rate=bad)
    with pytest.raises(ConfigError, match="balancing"):
        tiny_config("dense", balancing="loss_free")
    with pytest.raises(ConfigError, match="balancing"):
        sut_config(balancing="both")
    assert tiny_config(balancing="loss_free", balancing_rate=0).loss_free  # a frozen bias
    cfg = tiny_config(balancing="both", balancing_rate=0.01)
    assert type(cfg).from_saved(cfg.to_json()) == cfg
    # a config saved before the field existed reads as the paper's balancing
    old = {k: v for k, v in tiny_config().to_dict().items() if not k.startswith("balancing")}
    assert type(cfg).from_saved({"schema_version": SCHEMA_VERSION, **old}).balancing == "entropy"
