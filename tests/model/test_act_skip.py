"""MoEUT-ACT whose halted tokens skip their work (``act_halting="skip"``, :mod:`moeut.model.skip`).

(a) every token forced to continue: plain MoEUT; (b) a slow oracle that computes every layer for every token and
applies the semantics with masks equals the fast path that runs on the active rows, gradients included;
(c) the KV cache and left padding; (d) nothing leaks from later positions; and the work really falls."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moeut.model import ModelConfig, build_model
from moeut.model.act import ACTState, expected_depth, forcing_depth, frozen_mask, halt_step, mix_state
from moeut.model.rope import rope_tables
from tests.model.helpers import decode_in_steps, tiny_config

# tiny_config: n_layers 6, G = 2 -> at most 3 group applications


def skip_model(seed: int = 0, dtype=torch.float64, **kw) -> torch.nn.Module:
    """Random halting gate and a low threshold: tokens freeze at a random mix of depths within 3 applications."""
    torch.manual_seed(seed)
    cfg = tiny_config(act=True, act_halting="skip", **{"act_threshold": 0.6, "act_halt_bias_init": -0.5, **kw})
    m = build_model(cfg).to(dtype)
    with torch.no_grad():
        m.halting.out.weight.normal_(0, 1.5)
    return m


def _tokens(shape=(3, 13), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 53, shape, generator=torch.Generator().manual_seed(seed))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------- the oracle
def _neg_entropy_of_mean(logits: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """-H(p), p = per sequence the mean softmax over the (token, application) pairs a mask admits; mean over
    sequences and heads. Written out plainly."""
    total, count = 0, 0
    for lg, m in zip(logits, masks):
        w = m.to(lg.dtype).view(*m.shape, *[1] * (lg.dim() - 2))
        total = total + (F.softmax(lg.double(), -1) * w).sum(1)
        count = count + m.sum(1).view(-1, *[1] * (lg.dim() - 3))
    p = total / count.unsqueeze(-1) if lg.dim() > 3 else total / count.view(-1, 1)
    return (p * p.log()).sum(-1).mean()


def oracle(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every layer for every token on the whole batch; a frozen token's input is held at its state (so its keys
    and values at layer g are those of its state) and its output is thrown away; only active tokens' routing
    counts. Returns logits, the auxiliary loss, the expected and the executed depth."""
    cfg, thr = model.cfg, model.cfg.act_threshold
    B, T = tokens.shape
    rope = rope_tables(torch.arange(T), cfg.n_rotate, cfg.rope_base)
    n_groups = cfg.n_layers // cfg.group_size
    routed = {kind: [[] for _ in range(cfg.group_size)] for kind in ("ffn", "att_v", "att_o")}
    everyone = torch.ones(B, T, dtype=torch.bool)

    def group(r: int, x: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        for g in range(cfg.group_size):
            y, _, routing = model.layers[g](x, rope, None)
            x = torch.where(frozen.unsqueeze(-1), x, y)
            for kind in routed:
                routed[kind][g].append((getattr(routing, kind).logits, ~frozen))
        return x

    h = model.embedding(tokens)
    if model.post_ln:
        h = F.layer_norm(h * math.sqrt(cfg.d_model), (cfg.d_model,))
    prev = group(0, h, ~everyone)
    state, act, halted = prev, ACTState.start(prev), ~everyone
    act_loss, executed = 0, torch.ones(B, T)
    for r in range(1, n_groups):
        log_g = model.halting(prev)
        log_g = torch.where(halted.unsqueeze(-1), torch.tensor([0.0, -math.inf], dtype=log_g.dtype), log_g)
        act, q = halt_step(act, log_g, prev, thr)
        frozen = frozen_mask(q, thr)
        prev = group(r, torch.where(frozen.unsqueeze(-1), state, prev), frozen)
        state = mix_state(act, q, prev, state, thr)
        act_loss = act_loss + expected_depth(act, q).mean()
        executed = executed + (~frozen).float()
        halted = frozen
    logits = model.lm_head(model.out_norm(state))
    reg = sum(cfg.entropy_reg * _neg_entropy_of_mean(*zip(*routed["ffn"][g])) +
              cfg.att_entropy_reg * (_neg_entropy_of_mean(*zip(*routed["att_v"][g])) +
                                     _neg_entropy_of_mean(*zip(*routed["att_o"][g])))
              for g in range(cfg.group_size))
    return logits, reg + cfg.act_reg * act_loss, 1 + expected_depth(act, q), executed


@pytest.mark.parametrize("norm_placement", ["peri", "pre", "post"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_rows_path_equals_the_oracle_with_gradients(norm_placement, seed):
    model = skip_model(seed, norm_placement=norm_placement).train()
    tokens = _tokens(seed=seed)
    out = model(tokens)
    executed = out.executed_depth
    assert set(executed.unique().tolist()) == {1.0, 2.0, 3.0}, "want a mix of every depth"
    (out.logits.sum() * 1e-2 + out.reg_loss).backward()
    fast = _grads(model)
    model.zero_grad()
    logits, reg, depth, executed_ref = oracle(model, tokens)
    (logits.sum() * 1e-2 + reg).backward()
    ref = _grads(model)
    # float64 model; the routers compute in fp32 (sigmoid_topk), on other row counts here than there
    torch.testing.assert_close(out.logits, logits, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.reg_loss.double(), reg.double(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out.depth, depth.float())
    assert torch.equal(executed, executed_ref)
    assert fast.keys() == ref.keys() and "halting.out.weight" in fast
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_token_continuing_is_plain_moeut():
    """Forced to run every group application, the model is MoEUT with its layers: logits, CE, the balancing
    loss (without the constant ACT term) and the layers' gradients."""
    model = skip_model(dtype=torch.float32).train()
    plain = build_model(model.cfg.replace(act=False, act_halting="frozen", act_halt_bias_init=0.0)).train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("halting.")})
    tokens = _tokens()
    n_groups = model.cfg.n_layers // model.cfg.group_size
    with forcing_depth(model, torch.full(tokens.shape, n_groups)):
        out = model(tokens, targets=tokens)
    ref = plain(tokens, targets=tokens)
    assert torch.equal(out.executed_depth, torch.full(tokens.shape, float(n_groups)))
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    act_term = model.cfg.act_reg * sum(range(1, n_groups))  # Σ_r E[depth]_r = r (applications beyond the first)
    torch.testing.assert_close(out.reg_loss - act_term, ref.reg_loss, rtol=0, atol=1e-6)
    (out.ce + out.reg_loss).backward()
    (ref.ce + ref.reg_loss).backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=1e-5, atol=1e-6)


def test_forced_depths_run_that_many_applications():
    model = skip_model().eval()
    tokens = _tokens()
    depth = torch.randint(1, 4, tokens.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), forcing_depth(model, depth):
        out = model(tokens)
    assert torch.equal(out.executed_depth, depth.float())
    torch.testing.assert_close(out.depth, depth.float())


@pytest.mark.parametrize("repeats", [None, 5])
def test_cached_decoding_and_left_padding_equal_the_full_pass(repeats):
    model = skip_model().eval()
    tokens = _tokens()
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(tokens, attention_mask=mask, repeats=repeats)
        logits, depths = decode_in_steps(model, tokens, mask, 6, repeats, field="executed_depth")
        alone = model(tokens[1:2, 4:], repeats=repeats)  # the left-padded prompt without its padding
    torch.testing.assert_close(logits, ref.logits, rtol=1e-6, atol=1e-7)
    assert torch.equal(depths, ref.executed_depth)
    assert len(set(ref.executed_depth[:, 6:].flatten().tolist())) > 1, "decoding should see a mix of depths"
    torch.testing.assert_close(ref.logits[1:2, 4:], alone.logits, rtol=1e-6, atol=1e-7)
    assert torch.equal(ref.executed_depth[1:2, 4:], alone.executed_depth)


def test_later_tokens_change_nothing_before_them():
    model = skip_model().eval()
    tokens = _tokens()
    t = 6
    changed = tokens.clone()
    changed[:, t + 1:] = _tokens(seed=9)[:, t + 1:]
    with torch.no_grad():
        a = model(tokens, output_hidden_states=True)
        b = model(changed, output_hidden_states=True)
    assert not torch.equal(a.logits[:, t + 1:], b.logits[:, t + 1:])
    torch.testing.assert_close(a.logits[:, :t + 1], b.logits[:, :t + 1], rtol=1e-6, atol=1e-7)
    assert torch.equal(a.executed_depth[:, :t + 1], b.executed_depth[:, :t + 1])
    torch.testing.assert_close(a.depth[:, :t + 1], b.depth[:, :t + 1], rtol=0, atol=0)
    for ha, hb in zip(a.hidden_states, b.hidden_states):  # the routers read these: the routing is the same too
        torch.testing.assert_close(ha[:, :t + 1], hb[:, :t + 1], rtol=1e-6, atol=1e-7)


def test_halted_tokens_get_no_expert_slots():
    """The expert counts of an application cover its active tokens only."""
    model = skip_model().train()
    tokens = _tokens()
    depth = torch.randint(1, 4, tokens.shape, generator=torch.Generator().manual_seed(4))
    with forcing_depth(model, depth):
        out = model(tokens)
    cfg = model.cfg
    for r in range(3):
        active = int((depth > r).sum())
        for g in range(cfg.group_size):
            counts = out.expert_counts["ffn"][r * cfg.group_size + g]
            assert int(counts.sum()) == active * cfg.ff_k
            assert int(out.expert_counts["att_o"][r * cfg.group_size + g].sum()) == active * cfg.n_heads * cfg.att_k


def test_frozen_mode_is_unchanged_and_skip_is_a_different_model():
    """act_halting="frozen" (saved configs without the field) keeps today's model; "skip" differs from it once
    tokens freeze inside a group (the frozen mode still updates them within the group)."""
    skip = skip_model().eval()
    frozen = build_model(skip.cfg.replace(act_halting="frozen")).to(torch.float64).eval()
    frozen.load_state_dict(skip.state_dict())
    with torch.no_grad():
        a, b = skip(_tokens()), frozen(_tokens())
    assert (a.logits - b.logits).abs().max() > 1e-6
    assert torch.equal(b.executed_depth, torch.full_like(b.executed_depth, 3.0))
    saved = json.loads(frozen.cfg.to_json())
    del saved["act_halting"]  # a config written before the field existed
    assert ModelConfig.from_saved(saved).act_halting == "frozen"


# ---------------------------------------------------------------------------------------------- depth budget
def test_depth_distribution_sums_to_one_and_its_entropy_spreads():
    from moeut.model.act import depth_entropy

    model = skip_model().train()
    out = model(_tokens())
    # p_1 … p_{n−1}, q: a distribution per token (up to the mass the threshold cut off when a token froze)
    dist = torch.stack([torch.ones(3, 13)] * 3, -1) / 3
    assert depth_entropy(dist).item() == pytest.approx(math.log(3))
    one_depth = torch.zeros(3, 13, 3)
    one_depth[..., 1] = 1
    assert depth_entropy(one_depth).item() == pytest.approx(0.0, abs=1e-9)
    assert out.reg_loss.requires_grad


def test_depth_budget_shifts_the_halt_logit_and_its_loss_is_the_depth_entropy():
    """halt_shift += rate·sign(executed mean − target), added to the gate's halt logit; the ACT loss is
    −β·H(mean depth distribution) (no penalty on the depth itself)."""
    from moeut.model.act import depth_entropy

    model = skip_model(act_target_depth=2.0, act_target_rate=0.5, act_depth_entropy=0.1).train()
    gate = model.halting
    h = torch.randn(2, 5, model.cfg.d_model, dtype=torch.float64)
    before = gate(h)
    assert gate.halt_shift.item() == 0.0
    assert model.update_halt_shift(2.5) == 0.5 and model.update_halt_shift(2.4) == 1.0  # too deep: halt sooner
    assert model.update_halt_shift(1.0) == 0.5 and model.update_halt_shift(2.0) == 0.5  # too shallow; on target
    after = gate(h)
    logit_gap = lambda lg: lg[..., 1] - lg[..., 0]  # noqa: E731
    torch.testing.assert_close(logit_gap(after) - logit_gap(before), torch.full((2, 5), 0.5, dtype=after.dtype))
    tokens = _tokens()
    out = model(tokens)
    no_entropy = skip_model(act_target_depth=2.0, act_depth_entropy=0.0).train()
    no_entropy.load_state_dict(model.state_dict())
    base = no_entropy(tokens).reg_loss  # the routers' regulariser alone
    run_dist = []
    from moeut.model import skip as skip_module

    original = skip_module.depth_distribution
    skip_module.depth_distribution = lambda act, q: run_dist.append(original(act, q)) or run_dist[-1]
    try:
        again = model(tokens)
    finally:
        skip_module.depth_distribution = original
    torch.testing.assert_close(again.reg_loss - base, -0.1 * depth_entropy(run_dist[-1]).to(base.dtype))
    assert (out.reg_loss - base).item() < 0


def test_depth_budget_needs_skip_and_a_reachable_target():
    from moeut.model import ConfigError

    with pytest.raises(ConfigError, match="act_halting"):
        tiny_config(act=True, act_target_depth=2.0)
    with pytest.raises(ConfigError, match="between 1 and"):
        tiny_config(act=True, act_halting="skip", act_target_depth=5.0)


def test_activation_checkpointing_recomputes_the_rows_path_exactly():
    from moeut.train.activation_checkpointing import apply_activation_checkpointing

    model = skip_model().train()
    tokens = _tokens()
    out = model(tokens)
    (out.logits.sum() * 1e-2 + out.reg_loss).backward()
    ref = _grads(model)
    model.zero_grad()
    apply_activation_checkpointing(model, 1)
    out2 = model(tokens)
    (out2.logits.sum() * 1e-2 + out2.reg_loss).backward()
    assert set(out2.executed_depth.unique().tolist()) == {1.0, 2.0, 3.0}
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref[name], rtol=0, atol=0, msg=name)


def test_depth_budget_penalty_multiplier_is_dual_ascent_kept_non_negative():
    model = skip_model(act_target_depth=2.0, act_penalty_rate=0.5).train()
    model.update_halt_shift(2.5)
    assert model.act_lambda.item() == pytest.approx(0.25)
    model.update_halt_shift(1.0)
    assert model.act_lambda.item() == 0.0  # never a reward for depth
    tokens = _tokens()
    zero = model(tokens).reg_loss
    model.act_lambda.fill_(0.3)
    out = model(tokens)
    torch.testing.assert_close(out.reg_loss - zero, 0.3 * out.depth.mean().to(zero.dtype))
