# MoEUT (Csordás et al., "MoEUT: Mixture-of-Experts Universal Transformers", NeurIPS 2024) for Hugging Face
# transformers. Written by `moeut export-hf`. Self-contained: it imports only torch and transformers (plus the
# configuration next to it), so an exported directory loads with `trust_remote_code=True` where moeut is not
# installed. The model math is a plain-PyTorch copy of moeut's (moeut's tests/integrations/test_hf_parity.py holds
# the two equal, family by family); the expert matmul never syncs with the host.
"""MoEUT language model for transformers: ``MoEUTForCausalLM(PreTrainedModel, GenerationMixin)``.

A universal transformer whose ``group_size`` = G distinct layers are applied in order A B … A B …
(``num_hidden_layers / G`` repeats). Each layer application has its own keys and values, so the cache (a
``DynamicCache``) is indexed by the *absolute* layer application ``r·G + g``; keys are stored rotated at their
absolute positions. ``attention_mask`` (1 = real token, 0 = padding) and left padding are honoured: RoPE
positions count real tokens only, as in moeut.

MoEUT layer (peri-LayerNorm, ``norm_placement="peri"``)::

    xn = LN₁(x)
    x  = x + SwitchHead(q, k and the routers from xn; values from the raw x)
    x  = x + σ-MoE(experts on the raw x; router on LN₂(x))

``"pre"``: ``x += SwitchHead(LN₁(x)); x += σ-MoE(LN₂(x))``; ``"post"``: ``x = LN₁(x + SwitchHead(x));
x = LN₂(x + σ-MoE(x))`` with embeddings ·√d through a LayerNorm without parameters and no output LayerNorm.
``group_order="aabb"`` applies each distinct layer n_layers/G times in a row instead of A B A B ….

Depth at inference: ``repeats=R`` (a forward and ``generate`` argument, or ``config.repeats``) applies the G
distinct layers R times (R·G applications, each with its own cache entry) instead of ``num_hidden_layers / G``.
A cache must be continued with the R that filled it.

``arch="sut"``: the Sparse Universal Transformer baseline (moeut.model.sut): post-LN layers of a mixture of
attention heads (relative positions, no RoPE) and a softmax MoE, with ACT halting; ``aux_loss`` is its
mutual-information router loss plus the ACT loss (summed over the halting applications); with ACT, ``depth``
in the outputs is each token's expected number of layer applications.

``act=True`` on a MoEUT config: per-token ACT over applications of the whole group (moeut.model.lm): group 0
always runs; before each further group a gate reads ``LN`` of the previous group's output and the token halts by
stick-breaking (log q += log g[continue], p = q·g[halt], acc += p·h, state = acc + q·h). Once q < 1 − act_threshold
the token is frozen: its state stays and the group reads that state for it (so its keys and values depend on it
alone: the cache is exact). The head reads the state; ``depth`` in the outputs is each token's expected number of
group applications, and ``aux_loss`` adds ``act_reg · Σ_r mean E[depth]_r``.

``balancing="loss_free"`` (or ``"both"``): every σ-MoE and SwitchHead router has a selection bias (the buffers
``expert_sel_bias``, ``sel_v_bias``, ``sel_o_bias``, trained by moeut's loss-free balancing and saved with the
weights) added to the sigmoid scores to choose the top-k; the gates stay the unbiased scores. ``"loss_free"``
has no entropy regulariser in ``aux_loss``. The bias is not trained here (no gradient; moeut's trainer moves it).

``aux_loss`` (and the router logits) are computed in training mode or with ``output_router_logits=True``;
in eval mode otherwise ``aux_loss`` is None.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn import functional as dist_functional
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput

try:
    from transformers import GenerationMixin
except ImportError:  # older transformers: generation lives on PreTrainedModel
    GenerationMixin = object

from .configuration_moeut import MoEUTConfig

# transformers 5 calls the cache `cache` (in forward arguments and outputs), 4.x calls it `past_key_values`
_CACHE_FIELD = "cache" if "cache" in getattr(MoeCausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


# ------------------------------------------------------------------------------------------ expert matmul
# No host syncs: which way runs is decided from shapes, dtypes and devices only, never from routing values.
#  * "gather": each slot gathers its expert's weight and one bmm multiplies them, in chunks of at most
#    GATHER_BUDGET gathered weight elements (a loop whose length is a function of the shapes). Right for a
#    few slots (decoding); used for everything that needs autograd (each chunk is recomputed in backward,
#    so memory stays bounded) and wherever grouped_mm would sync.
#  * "grouped": sort the slots by expert and one torch grouped_mm over expert blocks, with offsets from
#    searchsorted (on the device). Used without autograd above FEW_SLOTS slots (moeut's own threshold, so
#    both take the same path and agree to rounding) where grouped_mm runs sync-free: on CPU (fp32/bf16/fp16) and on CUDA in bf16 on
#    sm90/sm100 (elsewhere torch's grouped_mm itself copies the offsets to the host and loops).
GATHER_BUDGET = 1 << 22  # elements (16 MiB in fp32)
FEW_SLOTS = 64
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_sync_free(t):
    """Does torch's grouped_mm run without a host sync for tensors like ``t`` (device and dtype)?"""
    if _GROUPED_MM is None or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if t.device.type == "cpu":
        return True
    return (t.device.type == "cuda" and t.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(t.device)[0] in (9, 10))


def expert_path(m, d_in, d_out, t, needs_grad):
    """``"gather"`` or ``"grouped"`` for ``m`` slots of ``[d_in, d_out]`` experts on ``t``'s device/dtype."""
    if needs_grad or m <= FEW_SLOTS or not grouped_mm_sync_free(t):
        return "gather"
    return "grouped"


def _gather_bmm_chunk(xs, ids, weight):
    return torch.bmm(xs.unsqueeze(1), weight.index_select(0, ids)).squeeze(1)


def _gather_bmm(xs, ids, weight, needs_grad):
    """``out[m] = xs[m] @ weight[ids[m]]``, at most GATHER_BUDGET gathered weight elements at a time."""
    step = max(1, GATHER_BUDGET // (weight.shape[1] * weight.shape[2]))
    if xs.shape[0] <= step and not needs_grad:
        return _gather_bmm_chunk(xs, ids, weight)
    outs = []
    for i in range(0, xs.shape[0], step):
        args = (xs[i:i + step], ids[i:i + step], weight)
        outs.append(checkpoint(_gather_bmm_chunk, *args, use_reentrant=False) if needs_grad
                    else _gather_bmm_chunk(*args))
    return torch.cat(outs) if outs else xs.new_zeros(0, weight.shape[2])


def _row_aligned(t):
    """``t`` (row-major, 2-D or 3-D) with its row stride rounded up to 16 bytes, as grouped_mm requires. The
    padding is zeroed: on CPUs with AMX, oneDNN's bf16 matmul turns NaN in it into NaN results."""
    align = max(1, 16 // t.element_size())
    k = t.shape[-1]
    if t.stride(-1) == 1 and t.stride(-2) % align == 0 and t.data_ptr() % 16 == 0:
        return t
    kp = -(-k // align) * align
    buf = t.new_zeros(*t.shape[:-1], kp)[..., :k]
    buf.copy_(t)
    return buf


def _grouped_mm_sorted(a, ids, weight):
    """``out[m] = a[m] @ weight[ids[m]]`` for ``ids`` sorted ascending: one grouped GEMM, no host sync."""
    offs = torch.searchsorted(ids, torch.arange(weight.shape[0], device=ids.device, dtype=ids.dtype),
                              right=True).to(torch.int32)
    return _GROUPED_MM(_row_aligned(a), _row_aligned(weight), offs=offs)


def expert_matmul(x, expert_ids, weight, gates=None, out_groups=None):
    """``out[n, s // (S/G_out)] += gates[n, s] · (x[n, s // (S/G_in)] @ weight[expert_ids[n, s]])``.

    ``x [N, G_in, d_in]``, ``expert_ids [N, S]``, ``weight [E, d_in, d_out]``, ``gates [N, S]`` or None;
    returns ``[N, G_out, d_out]`` (``G_out`` defaults to S without gates, 1 with gates). The gate scales the
    narrower side; see :func:`expert_path` for how the slots are multiplied (never a host sync).
    """
    n, g_in, d_in = x.shape
    s = expert_ids.shape[1]
    d_out = weight.shape[2]
    if out_groups is None:
        out_groups = s if gates is None else 1
    m = n * s
    ids = expert_ids.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (gates is not None and gates.requires_grad))
    path = expert_path(m, d_in, d_out, x, needs_grad)
    if path == "grouped":
        sorted_ids, perm = torch.sort(ids, stable=True)
    else:
        sorted_ids, perm = ids, None
    rows = torch.arange(m, device=x.device) if perm is None else perm
    a = x.reshape(n * g_in, d_in).index_select(0, torch.div(rows, s // g_in, rounding_mode="floor"))
    c = None if gates is None else gates.reshape(-1).to(x.dtype)
    if c is not None:
        c = (c if perm is None else c.index_select(0, perm)).unsqueeze(1)
    scale_input = c is not None and d_in <= d_out and path == "grouped"  # (moeut's few-slot path gates outputs)
    if scale_input:
        a = a * c
    if path == "grouped":
        y = _grouped_mm_sorted(a, sorted_ids, weight)
    else:
        y = _gather_bmm(a, ids, weight, needs_grad)
    if c is not None and not scale_input:
        y = y * c
    if perm is not None and out_groups != s and y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64):
        out = y.new_zeros(n * out_groups, d_out)  # one pass, in moeut's CPU summation order
        out.index_add_(0, torch.div(perm, s // out_groups, rounding_mode="floor"), y)
        return out.view(n, out_groups, d_out)
    if perm is not None:  # back to slot order
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(m, device=perm.device)
        y = y.index_select(0, inv_perm)
    if out_groups == s:
        return y.reshape(n, s, d_out)
    return y.reshape(n, out_groups, s // out_groups, d_out).sum(2)


# --------------------------------------------------------------------------------------- routing & RoPE
def sigmoid_topk(x, router, k, n_heads=1, bias=None):
    """Router logits (fp32) ``[..., (H,) E]``, sigmoid gates and indices of the top-k per head (unsorted).
    ``bias`` ``[H·E]`` (loss-free balancing) is added to the scores to choose the top-k, not to the gates."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.float(), router.float())
    if n_heads > 1:
        logits = logits.unflatten(-1, (n_heads, -1))
    scores = torch.sigmoid(logits)
    if bias is None:
        gates, indices = scores.topk(k, dim=-1, sorted=False)
        return logits, gates, indices
    with torch.no_grad():
        indices = (scores + bias.float().view(scores.shape[-2:] if n_heads > 1 else (-1,))).topk(
            k, dim=-1, sorted=False).indices
    return logits, scores.gather(-1, indices), indices


def _selection_bias(module, name, config, n):
    """Register buffer ``name``: the loss-free balancing bias of a router of ``n`` experts (zeros), or None."""
    on = getattr(config, "balancing", "entropy") != "entropy"
    module.register_buffer(name, torch.zeros(n) if on else None)


def entropy_of_mean_softmax(logits, mode="sequence", masks=None):
    """``-H(mean softmax(logits))`` over logits ``[B, T, *heads, E]`` of R applications, the mean taken per
    sequence (``"sequence"``, then averaged over the batch), over the micro-batch (``"batch"``) or over every
    data-parallel rank's micro-batch (``"global"``: a differentiable all-reduce of the summed softmax). ``masks``:
    per application None or ``[B, T]`` bool, the tokens it routed (``act_halting="skip"``); the mean is theirs."""
    x = torch.cat([t.float() for t in logits], dim=1)
    log_sm = F.log_softmax(x, dim=-1)
    valid = None
    if masks is not None and any(m is not None for m in masks):
        valid = torch.cat([torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
                           for t, m in zip(logits, masks)], dim=1)
    if mode == "sequence":
        if valid is None:
            log_p = log_sm.logsumexp(dim=1) - math.log(x.shape[1])
        else:
            ones = [1] * (x.dim() - 2)
            log_p = (log_sm.masked_fill(~valid.view(*valid.shape, *ones), -math.inf).logsumexp(dim=1)
                     - valid.sum(1).float().view(-1, *ones).log())
    else:
        log_sm = log_sm.flatten(0, 1)
        if valid is not None:
            log_sm = log_sm[valid.flatten()]
        if mode == "global" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ref = log_sm.detach().amax(dim=0)
            dist.all_reduce(ref, op=dist.ReduceOp.MAX)
            total = dist_functional.all_reduce((log_sm - ref).exp().sum(dim=0), op=dist.ReduceOp.SUM)
            n = torch.tensor(float(log_sm.shape[0]), device=log_sm.device)
            dist.all_reduce(n)
            log_p = total.log() + ref - n.log()
        else:
            log_p = log_sm.logsumexp(dim=0) - math.log(log_sm.shape[0])
    entropy = -(log_p * log_p.exp()).sum(-1)
    return -entropy.mean()


def rope_tables(positions, n_rotate, base):
    """``cos``, ``sin`` ``[..., T, n_rotate]`` (fp32) for integer positions ``[T]`` or ``[B, T]``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, n_rotate, 2, device=positions.device).float() / n_rotate))
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """GPT-NeoX rotate-half RoPE on the first ``cos.shape[-1]`` channels of ``x [B, H, T, d_h]``."""
    n = cos.shape[-1]
    if n == 0:
        return x
    if cos.dim() == 3:  # per-row positions
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if n == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :n], x[..., n:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def attend(q, k, v, mask):
    """Softmax attention; q and k are pre-scaled. ``mask``: bool (True = may attend) or None (causal)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def _positions(batch, length, past, attention_mask, position_ids, device):
    if position_ids is not None:
        if position_ids.shape[-1] != length or position_ids.dim() not in (1, 2):
            raise ValueError(f"position_ids must be [T] or [B, T] with T={length}, got {tuple(position_ids.shape)}")
        return position_ids.to(device)
    if attention_mask is not None:
        # the number of real tokens before each position: correct RoPE positions under left padding
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp_min(0)[:, -length:]
    return torch.arange(past, past + length, device=device)


def _attention_mask(batch, length, past, attention_mask, device):
    """Boolean ``[T, S]`` or ``[B, 1, T, S]`` mask (True = may attend), or None for plain causal attention."""
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            raise ValueError("a 4D attention_mask must be boolean (True = may attend); pass the 2D padding mask instead")
        return attention_mask.to(device)
    if attention_mask is None and past == 0:
        return None
    total = past + length
    q_pos = torch.arange(past, total, device=device).unsqueeze(-1)
    k_pos = torch.arange(total, device=device)
    allowed = k_pos <= q_pos
    if attention_mask is None:
        return allowed
    if tuple(attention_mask.shape) != (batch, total):
        raise ValueError(f"attention_mask must be [batch, cached + new tokens] = {(batch, total)}, "
                         f"got {tuple(attention_mask.shape)}")
    allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    allowed = allowed | (k_pos == q_pos)  # a padding query sees itself (no all-masked rows, no NaN)
    return allowed.unsqueeze(1)


# ------------------------------------------------------------------------------------------ initialisation
# moeut's initialisation (Sec. 2.5 of the paper), module by module. transformers calls ``_init_weights`` on each
# module (children first) and each initialises only the tensors it holds itself: a module class of this file
# by its ``init_tensors(config)``; a Linear layer by the rule of LINEAR_INITS its parent named when creating it
# (``_linear(..., init=...)``; torch's default otherwise); LayerNorm and Embedding by _LEAF_INITS. Never a
# parent for its children: transformers 5 skips custom modules that hold no parameter of their own (the dense
# attention and feed-forward, the routers, the halting gates). A tensor that from_pretrained loaded
# (``_is_hf_initialized``) is never touched, so the in-place renormalisations run only on fresh tensors.
def _needs_init(param):
    """False for tensors that from_pretrained already loaded (never overwrite them)."""
    return param is not None and not getattr(param, "_is_hf_initialized", False)


def _std_scale(config):
    """The paper's init scale s: √(2 / n_layers), 1 for post-LN MoEUT."""
    if config.arch == "moeut" and config.norm_placement == "post":
        return 1.0
    return math.sqrt(2 / config.num_hidden_layers)


def _normal(t, std):
    """N(0, std) into ``t`` unless it was loaded; True when it was initialised."""
    if not _needs_init(t):
        return False
    nn.init.normal_(t, 0, std)
    return True


def _uniform(t, bound):
    """U(±bound) into ``t`` unless it was loaded."""
    if _needs_init(t):
        nn.init.uniform_(t, -bound, bound)


def _fill(t, value):
    """``value`` (a number, or one value per element) into ``t`` unless it was loaded."""
    if not _needs_init(t):
        return
    if isinstance(value, (int, float)):
        nn.init.constant_(t, value)
    else:
        t.copy_(torch.tensor(value, dtype=t.dtype))


@torch.no_grad()
def _renorm_over_experts_keep_std(w):
    std = w.std()
    w.div_(w.norm(dim=0, keepdim=True))
    w.mul_(std / w.std())


@torch.no_grad()
def _renorm_rows_keep_row_std(w):
    row_std = w.std(dim=-1, keepdim=True)
    w.div_(w.norm(dim=-1, keepdim=True))
    w.mul_(row_std / w.std())


def _init_linear_torch(lin, config):
    """torch's own nn.Linear init (output head, routers, halting hidden layers)."""
    if _needs_init(lin.weight):
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
    if lin.bias is not None:
        _uniform(lin.bias, 1 / math.sqrt(lin.in_features))


def _init_linear_scaled(lin, config):
    """N(0, s/√fan_in), zero bias: SwitchHead's q and k, the dense baseline's attention and feed-forward."""
    _normal(lin.weight, _std_scale(config) / math.sqrt(lin.in_features))
    if lin.bias is not None:
        _fill(lin.bias, 0.0)


def _init_linear_xavier(lin, config):
    """Xavier-uniform with gain 1/√2: SUT's shared K and V (the SUT code's init)."""
    if _needs_init(lin.weight):
        nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))


def _init_linear_halt(lin, config):
    """A halting gate's last layer: zero weight (every token starts from the bias), bias (0, act_halt_bias_init)."""
    _fill(lin.weight, 0.0)
    if lin.bias is not None:
        _fill(lin.bias, [0.0, float(config.act_halt_bias_init)])


LINEAR_INITS = {"torch": _init_linear_torch, "scaled": _init_linear_scaled, "xavier": _init_linear_xavier,
                "halt": _init_linear_halt}


def _linear(d_in, d_out, bias=True, init="torch"):
    """``nn.Linear`` initialised (by ``_init_weights``) with rule ``init`` of LINEAR_INITS."""
    lin = nn.Linear(d_in, d_out, bias=bias)
    lin.init_rule = init
    return lin


def _init_linear(lin, config):
    """A Linear layer by the rule its parent gave it (``_linear``); torch's default for any other one."""
    LINEAR_INITS[getattr(lin, "init_rule", "torch")](lin, config)


def _init_layer_norm(norm, config):
    _fill(norm.weight, 1.0)
    _fill(norm.bias, 0.0)


def _init_embedding(emb, config):
    _normal(emb.weight, 1 / math.sqrt(config.hidden_size))


_LEAF_INITS = ((nn.Linear, _init_linear), (nn.LayerNorm, _init_layer_norm), (nn.Embedding, _init_embedding))


# ----------------------------------------------------------------------------------------------- modules
class MoEUTSwitchHead(nn.Module):
    """SwitchHead attention: dense q, k; per-head mixtures of value and output experts (expert h·N_A + e)."""

    def __init__(self, config):
        super().__init__()
        d, h, dh, e = config.hidden_size, config.num_attention_heads, config.head_dim, config.att_n_experts
        self.n_heads, self.d_head, self.n_experts, self.top_k = h, dh, e, config.att_k
        self.q = _linear(d, h * dh, bias=False, init="scaled")
        self.k = _linear(d, h * dh, bias=False, init="scaled")
        self.v = nn.Parameter(torch.empty(h * e, d, dh))
        self.o = nn.Parameter(torch.empty(h * e, dh, d))
        self.sel_v = nn.Parameter(torch.empty(h * e, d))
        self.sel_o = nn.Parameter(torch.empty(h * e, d))
        _selection_bias(self, "sel_v_bias", config, h * e)
        _selection_bias(self, "sel_o_bias", config, h * e)

    def init_tensors(self, config):
        """N(0, s/√d) routers (rows renormalised, keeping their std) and V experts, N(0, s/√(H·d_h)) O experts;
        with ``att_norm_init`` V and O renormalised across the expert axis (the training code's norm_init)."""
        s, d = _std_scale(config), config.hidden_size
        for router in (self.sel_v, self.sel_o):
            if _normal(router, s / math.sqrt(d)):
                _renorm_rows_keep_row_std(router)
        fresh = [_normal(self.v, s / math.sqrt(d)), _normal(self.o, s / math.sqrt(self.n_heads * self.d_head))]
        if getattr(config, "att_norm_init", False):
            for p, new in zip((self.v, self.o), fresh):
                if new:
                    _renorm_over_experts_keep_std(p)
        for bias in (self.sel_v_bias, self.sel_o_bias):
            if bias is not None:
                _fill(bias, 0.0)

    def _route(self, xn, router, bias):
        logits, gates, indices = sigmoid_topk(xn, router, self.top_k, n_heads=self.n_heads, bias=bias)
        offset = torch.arange(self.n_heads, device=xn.device).unsqueeze(-1) * self.n_experts
        ids = (indices + offset).reshape(-1, self.n_heads * self.top_k)
        return logits, gates.reshape(ids.shape), ids

    def forward(self, x, xn, rope, mask, cache, layer_idx):
        bsz, length, _ = x.shape
        h, dh = self.n_heads, self.d_head
        scale = dh ** -0.25
        q = (self.q(xn) * scale).view(bsz, length, h, dh).transpose(1, 2)
        k = (self.k(xn) * scale).view(bsz, length, h, dh).transpose(1, 2)
        logits_v, gates_v, ids_v = self._route(xn, self.sel_v, self.sel_v_bias)
        logits_o, gates_o, ids_o = self._route(xn, self.sel_o, self.sel_o_bias)
        v = expert_matmul(x.reshape(bsz * length, 1, -1), ids_v, self.v, gates_v, out_groups=h)
        v = v.view(bsz, length, h, dh).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        a = attend(q, k, v, mask).transpose(1, 2).reshape(bsz * length, h, dh)
        y = expert_matmul(a, ids_o, self.o, gates_o)
        return y.view(bsz, length, -1), logits_v, logits_o


class MoEUTSigmaMoE(nn.Module):
    """σ-MoE: ``y = Σ_{e ∈ top-K} σ(s_e) · ReLU(x W₁ᵉ) W₂ᵉ`` with router logits ``s = LN(x) W_Sᵀ``."""

    def __init__(self, config):
        super().__init__()
        d, e, de = config.hidden_size, config.ff_n_experts, config.ff_expert_size
        self.d_model, self.n_experts, self.top_k = d, e, config.ff_k
        self.keys = nn.Parameter(torch.empty(e, d, de))
        self.values = nn.Parameter(torch.empty(e, de, d))
        self.expert_sel = nn.Parameter(torch.empty(e, d))
        _selection_bias(self, "expert_sel_bias", config, e)

    def init_tensors(self, config):
        """N(0, s/√d) router (rows not renormalised, as the paper's training code) and keys, N(0, s/√(E·d_e))
        values."""
        s, d = _std_scale(config), config.hidden_size
        _normal(self.expert_sel, s / math.sqrt(d))
        _normal(self.keys, s / math.sqrt(d))
        _normal(self.values, s / math.sqrt(self.n_experts * self.values.shape[1]))
        if self.expert_sel_bias is not None:
            _fill(self.expert_sel_bias, 0.0)

    def forward(self, x, router_input):
        logits, gates, indices = sigmoid_topk(router_input, self.expert_sel, self.top_k, bias=self.expert_sel_bias)
        ids = indices.reshape(-1, self.top_k)
        h = F.relu(expert_matmul(x.reshape(-1, 1, self.d_model), ids, self.keys))
        y = expert_matmul(h, ids, self.values, gates.reshape(-1, self.top_k))
        return y.view_as(x), logits


class MoEUTLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm_placement = config.norm_placement
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = MoEUTSwitchHead(config)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = MoEUTSigmaMoE(config)

    def forward(self, x, rope, mask, cache, layer_idx):
        if self.norm_placement == "pre":
            xn = self.ln1(x)
            att, logits_v, logits_o = self.attention(xn, xn, rope, mask, cache, layer_idx)
            x = x + att
            xn = self.ln2(x)
            upd, logits_ff = self.ffn(xn, xn)
            return x + upd, (logits_v, logits_o, logits_ff)
        if self.norm_placement == "post":
            att, logits_v, logits_o = self.attention(x, x, rope, mask, cache, layer_idx)
            x = self.ln1(x + att)
            upd, logits_ff = self.ffn(x, x)
            return self.ln2(x + upd), (logits_v, logits_o, logits_ff)
        att, logits_v, logits_o = self.attention(x, self.ln1(x), rope, mask, cache, layer_idx)
        x = x + att
        upd, logits_ff = self.ffn(x, self.ln2(x))
        return x + upd, (logits_v, logits_o, logits_ff)


class MoEUTDenseAttention(nn.Module):
    """Multi-head attention of the dense baseline: no biases, RoPE on the first channels of each head."""

    def __init__(self, config):
        super().__init__()
        d, h, dh = config.hidden_size, config.num_attention_heads, config.head_dim
        self.n_heads, self.d_head = h, dh
        self.q = _linear(d, h * dh, bias=False, init="scaled")
        self.k = _linear(d, h * dh, bias=False, init="scaled")
        self.v = _linear(d, h * dh, bias=False, init="scaled")
        self.o = _linear(h * dh, d, bias=False, init="scaled")

    def forward(self, xn, rope, mask, cache, layer_idx):
        bsz, length, _ = xn.shape
        scale = self.d_head ** -0.25
        q, k, v = (t.view(bsz, length, self.n_heads, self.d_head).transpose(1, 2)
                   for t in (self.q(xn) * scale, self.k(xn) * scale, self.v(xn)))
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        a = attend(q, k, v, mask).transpose(1, 2).reshape(bsz, length, -1)
        return self.o(a)


class MoEUTDenseLayer(nn.Module):
    """Pre-LN transformer layer: x += Attn(LN₁(x)); x += W₂·ReLU(W₁·LN₂(x) + b₁) + b₂."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = MoEUTDenseAttention(config)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ff_in = _linear(config.hidden_size, config.d_ff, init="scaled")
        self.ff_out = _linear(config.d_ff, config.hidden_size, init="scaled")

    def forward(self, x, rope, mask, cache, layer_idx):
        x = x + self.attention(self.ln1(x), rope, mask, cache, layer_idx)
        x = x + self.ff_out(F.relu(self.ff_in(self.ln2(x))))
        return x, None


# ------------------------------------------------------------------------------------ SUT (arch="sut")
class SUTRouter(nn.Module):
    """``Linear(d, d) → tanh → Linear(d, E, bias=False)``."""

    def __init__(self, d_model, n_experts):
        super().__init__()
        self.hidden = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def softmax_topk(logits, k, active=None, sample_topk=0, training=False):
    """Top-k of softmax(logits) with gates renormalised to sum to 1 (+1e-6); rows with ``active == 0`` get zero
    gates; in training the last ``sample_topk`` experts are sampled from the rest. Returns logits, gates, ids."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    if active is not None:
        probs = probs.masked_fill((active == 0).unsqueeze(-1), 0.0)
    if training and sample_topk > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        greedy = flat.topk(k - sample_topk, dim=-1).indices
        sampled = torch.multinomial((flat + 1e-6).scatter(-1, greedy, 0.0), sample_topk)
        indices = torch.cat([greedy, sampled], dim=-1).view(*probs.shape[:-1], k)
        gates = probs.gather(-1, indices)
    else:
        gates, indices = probs.topk(k, dim=-1)
    return logits, gates / (gates.sum(-1, keepdim=True) + 1e-6), indices


def mutual_information_loss(logits, weights, form="code"):
    """SUT router loss pooled over applications: ``H(E|X) + H(E)`` (form "code", the SUT authors' code) or
    ``H(E|X) − H(E)`` ("paper"); ``p_x`` ∝ the token weights (None = 1)."""
    n_experts = logits[0].shape[-1]
    log_p = torch.cat([t.float().reshape(-1, n_experts).log_softmax(-1) for t in logits])
    w = torch.cat([(torch.ones(t.shape[:-1], device=t.device) if m is None else m.float()).reshape(-1)
                   for t, m in zip(logits, weights)])
    p_x = (w / (w.sum() + 1e-12)).unsqueeze(-1)
    p = log_p.exp()
    h_e_given_x = -(p_x * p * log_p).sum()
    p_e = (p_x * p).sum(0)
    h_e = -(p_e * p_e.clamp_min(1e-30).log()).sum()
    return h_e_given_x + h_e if form == "code" else h_e_given_x - h_e


class SUTAttention(nn.Module):
    """Mixture of attention heads: query/output experts (top-K_A, softmax router), shared K and V, and a
    content-dependent relative-position term ``q · R[clip(s − t, ±(P−1))]``."""

    def __init__(self, config):
        super().__init__()
        d, e, h, dh = config.hidden_size, config.att_n_experts, config.num_attention_heads, config.head_dim
        p = config.rel_pos_max
        self.n_experts, self.top_k, self.n_heads, self.d_head, self.rel_pos_max = e, config.att_k, h, dh, p
        self.sample_topk = config.sample_topk
        self.router = SUTRouter(d, e)
        self.q = nn.Parameter(torch.empty(e, d, h * dh))
        self.o = nn.Parameter(torch.empty(e, h * dh, d))
        self.k = _linear(d, h * dh, bias=False, init="xavier")
        self.v = _linear(d, h * dh, bias=False, init="xavier")
        self.rel_pos = nn.Parameter(torch.empty(h, dh, 2 * p + 1))

    def init_tensors(self, config):
        """The SUT code's init: expert weights U(±1/fan_in), relative-position table 0."""
        for w in (self.q, self.o):
            _uniform(w, 1 / w.shape[1])
        _fill(self.rel_pos, 0.0)

    def forward(self, x_q, x_kv, mask, cache, layer_idx, active=None):
        bsz, length, d = x_q.shape
        h, dh, top = self.n_heads, self.d_head, self.top_k
        scale = dh ** -0.25
        logits, gates, indices = softmax_topk(self.router(x_q), top, active, self.sample_topk, self.training)
        ids = indices.reshape(-1, top)
        q = expert_matmul(x_q.reshape(-1, 1, d), ids, self.q)
        q = (q * scale).view(bsz, length, top, h, dh).permute(0, 3, 2, 1, 4).reshape(bsz * h, top * length, dh)
        k = (self.k(x_kv) * scale).view(bsz, length, h, dh).transpose(1, 2)
        v = self.v(x_kv).view(bsz, length, h, dh).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        total = k.shape[2]
        p = self.rel_pos_max
        q_pos = torch.arange(total - length, total, device=x_q.device).unsqueeze(-1)
        k_pos = torch.arange(total, device=x_q.device)
        rel = (k_pos - q_pos).clamp(1 - p, p - 1) + p
        allowed = k_pos <= q_pos if mask is None else (mask[:, 0] if mask.dim() == 4 else mask)
        rel = torch.where(allowed, rel, 2 * p + 1)
        rel = (rel if rel.dim() == 3 else rel.unsqueeze(0)).unsqueeze(1).unsqueeze(2).expand(bsz, h, top, length, total)
        rel_logits = torch.matmul(q.view(bsz, h, top * length, dh), self.rel_pos.to(q.dtype))
        rel_logits = torch.cat((rel_logits, rel_logits.new_full((bsz, h, top * length, 1), float("-inf"))), dim=-1)
        bias = rel_logits.view(bsz, h, top, length, 2 * p + 2).gather(-1, rel).view(bsz * h, top * length, total)
        scores = torch.baddbmm(bias, q, k.reshape(bsz * h, total, dh).transpose(1, 2))
        att = torch.bmm(scores.float().softmax(-1).to(v.dtype), v.reshape(bsz * h, total, dh))
        att = att.view(bsz, h, top, length, dh).permute(0, 3, 2, 1, 4).reshape(bsz * length, top, h * dh)
        y = expert_matmul(att, ids, self.o, gates.reshape(-1, top).to(att.dtype))
        return y.view(bsz, length, d), logits


class SUTMoE(nn.Module):
    """Softmax top-k MoE with biases: ``y = Σ_e g_e · (ReLU(x W₁ᵉ + b₁ᵉ) W₂ᵉ + b₂ᵉ)``."""

    def __init__(self, config):
        super().__init__()
        d, e, de = config.hidden_size, config.ff_n_experts, config.ff_expert_size
        self.d_model, self.top_k = d, config.ff_k  # greedy: sample_topk is for the attention router only
        self.router = SUTRouter(d, e)
        self.w1 = nn.Parameter(torch.empty(e, d, de))
        self.b1 = nn.Parameter(torch.empty(e, de))
        self.w2 = nn.Parameter(torch.empty(e, de, d))
        self.b2 = nn.Parameter(torch.empty(e, d))

    def init_tensors(self, config):
        """The SUT code's init: weights U(±1/fan_in), biases U(±1/√fan_out)."""
        for w in (self.w1, self.w2):
            _uniform(w, 1 / w.shape[1])
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            _uniform(b, 1 / math.sqrt(w.shape[2]))

    def forward(self, x, active=None):
        logits, gates, indices = softmax_topk(self.router(x), self.top_k, active)
        ids = indices.reshape(-1, self.top_k)
        gates = gates.reshape(-1, self.top_k).to(x.dtype)
        hid = F.relu(expert_matmul(x.reshape(-1, 1, self.d_model), ids, self.w1) + self.b1[ids])
        y = expert_matmul(hid, ids, self.w2, gates)[:, 0] + (gates.unsqueeze(-1) * self.b2[ids]).sum(1)
        return y.view_as(x), logits


class SUTHalting(nn.Module):
    """ACT gate: ``log_softmax(Linear(d, 2, bias=False)(GELU(Linear(d, d)(h))))`` = log (continue, halt)."""

    def __init__(self, d_model):
        super().__init__()
        self.hidden = nn.Linear(d_model, d_model)
        self.out = _linear(d_model, 2, bias=False, init="halt")

    def forward(self, h):
        return F.log_softmax(self.out(F.gelu(self.hidden(h))).float(), dim=-1)


class MoEUTHalting(nn.Module):
    """MoEUT ACT gate: ``log_softmax(Linear(d, 2)(GELU(Linear(d, d)(LN(h)))))`` = log (continue, halt); with a depth
    budget (``act_target_depth``) the halt logit is shifted by the buffer ``halt_shift`` moeut's trainer moved."""

    def __init__(self, config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.hidden = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = _linear(config.hidden_size, 2, init="halt")
        self.register_buffer("halt_shift", torch.zeros(()) if getattr(config, "act_target_depth", 0) else None)

    def forward(self, h):
        logits = self.out(F.gelu(self.hidden(self.norm(h)))).float()
        if self.halt_shift is not None:
            logits = logits + torch.stack((torch.zeros_like(self.halt_shift), self.halt_shift)).float()
        return F.log_softmax(logits, dim=-1)


def _halt_step(gate_log, log_never, acc, depth, prev, step, threshold):
    """One stick-breaking step (as moeut.model.act.halt_step): the new log q, acc, Σ(s−1)·p_s and q (0 = frozen)."""
    log_halt = log_never.unsqueeze(-1) + gate_log
    p = log_halt[..., 1].exp()
    acc = acc + p.unsqueeze(-1).to(prev.dtype) * prev
    depth = depth + step * p
    log_never = log_halt[..., 0]
    q = log_never.exp()
    return log_never, acc, depth, q.masked_fill(q < 1 - threshold, 0.0)


class SUTLayer(nn.Module):
    """Post-LN: ``x = LN₁(x_q + Att(x_q, x_kv)); x = LN₂(x + MoE(x))``."""

    def __init__(self, config):
        super().__init__()
        self.attention = SUTAttention(config)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = SUTMoE(config)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.halting = SUTHalting(config.hidden_size) if config.act else None

    def forward(self, x_q, x_kv, mask, cache, layer_idx, active=None):
        att, logits_att = self.attention(x_q, x_kv, mask, cache, layer_idx, active)
        x = self.ln1(x_q + att)
        upd, logits_ff = self.ffn(x, active)
        return self.ln2(x + upd), (logits_att, logits_ff, active)


def _sut_stack(model, h, mask, cache, output_hidden_states, with_aux, repeats):
    """SUT layer applications with ACT halting (stick-breaking; tokens freeze once their probability of never
    halting is below 1 − act_threshold). Returns the output state, hidden states, aux loss (None unless
    ``with_aux``; its ACT part is summed over the halting applications), MLP router logits and, under ACT,
    each token's expected number of applications (as moeut's ``depth``; None without ACT)."""
    cfg = model.config
    threshold = cfg.act_threshold
    all_hidden = (h,) if output_hidden_states else None
    state, prev, q = h, h, None
    log_never = acc = depth = None
    act_loss = torch.zeros((), device=h.device)
    per_layer = [[] for _ in range(cfg.group_size)]
    applied = []
    for idx in range(repeats * cfg.group_size):
        layer = model.layers[cfg.layer_index(idx, repeats)]
        if layer.halting is not None and idx > 0:
            log_halt = log_never.unsqueeze(-1) + layer.halting(prev)
            p = log_halt[..., 1].exp()
            acc = acc + p.unsqueeze(-1).to(prev.dtype) * prev
            depth = depth + (idx - 1) * p
            log_never = log_halt[..., 0]
            q = log_never.exp()
            q = q.masked_fill(q < 1 - threshold, 0.0)
            out, logits = layer(prev, state, mask, cache, idx, active=q)
            frozen = (q < 1 - threshold).unsqueeze(-1)
            state = torch.where(frozen, state, acc + q.unsqueeze(-1).to(out.dtype) * out)
            if with_aux and cfg.act_reg:
                act_loss = act_loss + (depth + q * idx).mean()
        else:
            out, logits = layer(prev, state, mask, cache, idx)
            state = out
            if layer.halting is not None:
                log_never = torch.zeros(out.shape[:-1], device=out.device, dtype=torch.float32)
                acc, depth = torch.zeros_like(out), log_never.clone()
        prev = out
        if with_aux:
            per_layer[cfg.layer_index(idx, repeats)].append(logits)
            applied.append(logits[1])
        if output_hidden_states:
            all_hidden = all_hidden + (state,)
    depth_out = None  # as moeut's: ACT only, 1 everywhere when no halting step ran
    if cfg.act:
        depth_out = torch.ones_like(state[..., 0], dtype=torch.float32) if q is None else 1 + depth + q * idx
    if not with_aux:
        return state, all_hidden, None, None, depth_out
    aux = torch.zeros((), device=h.device)
    if cfg.mi_reg:
        for rs in per_layer:
            weights = [lg[2] for lg in rs]
            aux = aux + cfg.mi_reg * (mutual_information_loss([lg[0] for lg in rs], weights, cfg.mi_loss)
                                      + mutual_information_loss([lg[1] for lg in rs], weights, cfg.mi_loss))
    aux = aux + cfg.act_reg * act_loss
    return state, all_hidden, aux, tuple(applied), depth_out


def _fit_cache_depth(cache, applications, past):
    """Check that a filled cache was built at this depth (its last application holds the past, the next one is
    empty) and give a too-short cache room for every application: generate() of transformers >= 5 builds its
    DynamicCache with ``num_hidden_layers`` layers, fewer than a pass with ``repeats`` above the trained value."""
    if past and (cache.get_seq_length(applications - 1) != past or cache.get_seq_length(applications) != 0):
        raise ValueError(f"the cache was filled with another depth than this pass's {applications} layer "
                         "applications: continue with the repeats that filled the cache")
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list) and layers and getattr(cache, "layer_class_to_replicate", None) is None:
        layers.extend(type(layers[0])() for _ in range(applications - len(layers)))


# ---------------------------------------------------------------------------------------- pretrained base
class MoEUTPreTrainedModel(PreTrainedModel):
    config_class = MoEUTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MoEUTLayer", "MoEUTDenseLayer", "SUTLayer"]
    _supports_cache_class = True  # transformers 4.x: use Cache objects, not tuples
    _supports_static_cache = False
    _supports_quantized_cache = False
    _is_stateful = False

    @torch.no_grad()
    def _init_weights(self, module):
        """moeut's initialisation of the tensors ``module`` holds itself (see "initialisation" above); tensors
        that were loaded are never touched. Overridden because the generic one knows nothing of the expert
        tensors and routers (3D / 2D ``nn.Parameter``\\ s)."""
        init = getattr(module, "init_tensors", None)
        if init is not None:
            init(self.config)
            return
        for cls, leaf_init in _LEAF_INITS:
            if isinstance(module, cls):
                leaf_init(module, self.config)
                return


@dataclass
class MoEUTModelOutput(ModelOutput):
    """Output of :class:`MoEUTModel`: final hidden states (after the output LayerNorm), the cache, the
    regulariser and, on request, all hidden states and the σ-MoE router logits per layer application."""

    last_hidden_state: Optional[torch.FloatTensor] = None
    cache: Optional[Cache] = None
    hidden_states: Optional[tuple] = None
    aux_loss: Optional[torch.FloatTensor] = None
    router_logits: Optional[tuple] = None
    depth: Optional[torch.FloatTensor] = None  # ACT: each token's expected number of (group) applications


class MoEUTModel(MoEUTPreTrainedModel):
    """The MoEUT stack without the output head."""

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layer_cls = {"moeut": MoEUTLayer, "dense": MoEUTDenseLayer, "sut": SUTLayer}[config.arch]
        self.layers = nn.ModuleList(layer_cls(config) for _ in range(config.group_size))
        # post-LN (and SUT, which is post-LN): input LayerNorm without parameters, no output LayerNorm
        self.post_ln = config.arch == "sut" or (config.arch == "moeut" and config.norm_placement == "post")
        self.norm = nn.Identity() if self.post_ln else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.halting = MoEUTHalting(config) if config.arch == "moeut" and config.act else None
        # depth budget (act_target_depth): λ of the depth penalty, as moeut's trainer moved it
        self.register_buffer("act_lambda", torch.zeros(()) if getattr(config, "act_target_depth", 0) else None)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, output_router_logits=None, past_key_values=None,
                repeats=None, **kwargs):
        cfg = self.config
        repeats = cfg.resolve_repeats(repeats)
        if cache is None:
            cache = past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.post_ln:
            h = F.layer_norm(h * math.sqrt(cfg.hidden_size), (cfg.hidden_size,), eps=cfg.layer_norm_eps)
        bsz, length = h.shape[:2]
        use_cache = use_cache if use_cache is not None else getattr(cfg, "use_cache", True)
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        if use_cache and cache is None:
            cache = DynamicCache()
        elif cache is not None and not isinstance(cache, Cache):
            if not hasattr(DynamicCache, "from_legacy_cache"):
                raise TypeError("the cache must be a transformers Cache (e.g. DynamicCache), not a tuple")
            cache = DynamicCache.from_legacy_cache(cache)
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            _fit_cache_depth(cache, repeats * cfg.group_size, past)
        positions = _positions(bsz, length, past, attention_mask, position_ids, h.device)
        rope = rope_tables(positions, cfg.n_rotate, cfg.rope_base)
        mask = _attention_mask(bsz, length, past, attention_mask, h.device)
        with_aux = self.training or bool(output_router_logits)  # else no aux_loss (None) and no router logits
        if cfg.arch == "sut":  # relative positions only: no RoPE, position_ids are not used
            h, all_hidden, aux_loss, applied, depth = _sut_stack(self, h, mask, cache, output_hidden_states,
                                                                 with_aux, repeats)
            return MoEUTModelOutput(last_hidden_state=h, cache=cache, hidden_states=all_hidden, aux_loss=aux_loss,
                                    router_logits=applied if output_router_logits else None, depth=depth)

        rec = {"hidden": [h] if output_hidden_states else None, "with_aux": with_aux,
               "routing": [[] for _ in range(cfg.group_size)],  # per distinct layer g: (logits_v, logits_o, logits_ff)
               "masks": [[] for _ in range(cfg.group_size)],  # per distinct layer g: the tokens routed (None = all)
               "applied": []}  # the σ-MoE router logits in absolute application order
        depth, act_loss = None, None
        if self.halting is None:
            for r in range(repeats):
                h = self._group(r, h, rope, mask, cache, repeats, rec)
        else:
            h, depth, act_loss = self._halting_stack(h, rope, mask, cache, repeats, rec)
        routing, applied = rec["routing"], rec["applied"]
        all_hidden = tuple(rec["hidden"]) if output_hidden_states else None
        h = self.norm(h)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (h,)

        if not with_aux:
            aux_loss, router_logits = None, None
        elif cfg.arch == "moeut":
            if getattr(cfg, "balancing", "entropy") == "loss_free":  # the selection bias balances: no regulariser
                aux_loss = torch.zeros((), device=h.device)
            else:
                mode, masks = cfg.entropy_reg_mode, rec["masks"]
                ffn = sum(entropy_of_mean_softmax([lg[2] for lg in rs], mode, ms) for rs, ms in zip(routing, masks))
                att = sum(entropy_of_mean_softmax([lg[0] for lg in rs], mode, ms) +
                          entropy_of_mean_softmax([lg[1] for lg in rs], mode, ms) for rs, ms in zip(routing, masks))
                aux_loss = cfg.entropy_reg * ffn + cfg.att_entropy_reg * att
            if act_loss is not None:
                aux_loss = aux_loss + act_loss
            router_logits = None
            if output_router_logits:  # absolute application order
                router_logits = tuple(applied)
        else:
            aux_loss = torch.zeros((), device=h.device)
            router_logits = None
        return MoEUTModelOutput(last_hidden_state=h, cache=cache, hidden_states=all_hidden, aux_loss=aux_loss,
                                router_logits=router_logits, depth=depth)

    def _group(self, r, h, rope, mask, cache, repeats, rec, halted=None):
        """Group application ``r``: layer applications ``r·G … r·G + G − 1``; routing and hidden states into ``rec``.
        ``halted`` (``act_halting="skip"``): ``[B, T]`` tokens that do no more work — every layer keeps their
        residual stream (so their keys and values are those of their frozen state) and their routing is not
        counted. The moeut package runs the other tokens only; the result is the same."""
        cfg = self.config
        for idx in range(r * cfg.group_size, (r + 1) * cfg.group_size):  # absolute layer application
            g = cfg.layer_index(idx, repeats)
            h_in = h
            h, logits = self.layers[g](h, rope, mask, cache, idx)
            if halted is not None:
                h = torch.where(halted.unsqueeze(-1), h_in, h)
            if logits is not None and rec["with_aux"]:
                rec["routing"][g].append(logits)
                rec["masks"][g].append(None if halted is None else ~halted)
                rec["applied"].append(logits[2])
            if rec["hidden"] is not None:
                rec["hidden"].append(h)
        return h

    def _halting_stack(self, h, rope, mask, cache, repeats, rec):
        """MoEUT ACT over group applications. Returns the state, the expected number of group applications per
        token and the ACT loss (Σ over the halting applications of mean E[depth]; None without ``with_aux``)."""
        thr = self.config.act_threshold
        prev = self._group(0, h, rope, mask, cache, repeats, rec)
        state, q = prev, None
        log_never = torch.zeros(prev.shape[:-1], device=prev.device, dtype=torch.float32)
        acc, depth = torch.zeros_like(prev), log_never.clone()
        act_loss = torch.zeros((), device=prev.device) if rec["with_aux"] else None
        skip = getattr(self.config, "act_halting", "frozen") == "skip"
        halted, halt_probs = None, []
        for r in range(1, repeats):
            gate = self.halting(prev)
            if skip and halted is not None:  # a halted token's gate changes nothing: (0, -inf)
                gate = torch.where(halted.unsqueeze(-1), torch.tensor([0.0, -math.inf], device=gate.device), gate)
            halt_probs.append((log_never + gate[..., 1]).exp())
            log_never, acc, depth, q = _halt_step(gate, log_never, acc, depth, prev, r - 1, thr)
            frozen = (q < 1 - thr).unsqueeze(-1)
            halted = frozen.squeeze(-1) if skip else None
            prev = self._group(r, torch.where(frozen, state, prev), rope, mask, cache, repeats, rec, halted)
            state = torch.where(frozen, state, acc + q.unsqueeze(-1).to(prev.dtype) * prev)
            if act_loss is not None:
                act_loss = act_loss + (depth + q * r).mean()
        if rec["hidden"] is not None:
            rec["hidden"][-1] = state
        expected = torch.ones_like(log_never) if q is None else 1 + depth + q * (repeats - 1)
        if act_loss is not None:
            act_loss = self._act_loss(act_loss, expected, halt_probs, q)
        return state, expected, act_loss

    def _act_loss(self, penalty, expected, halt_probs, q):
        """The ACT part of ``aux_loss``: ``act_reg ·`` the summed penalty, or with a depth budget
        (``act_target_depth``, held by the gate's ``halt_shift``) ``act_lambda · mean E[depth] − act_depth_entropy ·
        H(mean over tokens of the depth distribution (p_1 … p_{n−1}, q))``."""
        cfg = self.config
        if not getattr(cfg, "act_target_depth", 0):
            return cfg.act_reg * penalty
        if q is None:
            return torch.zeros((), device=expected.device)
        mean = torch.stack((*halt_probs, q), dim=-1).reshape(-1, len(halt_probs) + 1).mean(0)
        mean = mean / mean.sum().clamp_min(1e-12)
        return (self.act_lambda * expected.mean()
                + cfg.act_depth_entropy * (mean * mean.clamp_min(1e-12).log()).sum())


@dataclass
class MoEUTCausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output plus ``depth``: under ACT each token's expected number of (group)
    applications ``[batch, length]`` (None without ACT)."""

    depth: Optional[torch.FloatTensor] = None


class MoEUTForCausalLM(MoEUTPreTrainedModel, GenerationMixin):
    """MoEUT with its (untied, biased) output head. ``aux_loss`` is moeut's load-balancing regulariser (None
    in eval mode without ``output_router_logits``);
    ``loss`` (when ``labels`` are given, shifted inside) is the next-token cross-entropy, plus ``aux_loss``
    when ``output_router_logits`` is set (moeut's training objective)."""

    _tied_weights_keys = []

    def __init__(self, config):
        super().__init__(config)
        self.model = MoEUTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, output_router_logits=None,
                return_dict=None, logits_to_keep=0, past_key_values=None, repeats=None, **kwargs):
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else getattr(self.config, "output_router_logits", False))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states,
                         output_router_logits=output_router_logits, repeats=repeats)
        h = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])

        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need the logits of every position: call with logits_to_keep=0")
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            if output_router_logits:
                loss = loss + out.aux_loss.to(loss.device)

        result = MoEUTCausalLMOutput(loss=loss, aux_loss=out.aux_loss, logits=logits,
                                     hidden_states=out.hidden_states, router_logits=out.router_logits,
                                     depth=out.depth, **{_CACHE_FIELD: out.cache})
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return result if return_dict else result.to_tuple()


def _prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                   position_ids=None, use_cache=True, **kwargs):
    """For transformers versions whose GenerationMixin has no generic one (4.45): feed only the tokens that
    are not in the cache yet, with their positions (counting real tokens: left padding)."""
    past = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
    if past:
        input_ids = input_ids[:, past:]
    if attention_mask is not None and position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -input_ids.shape[1]:]
    elif position_ids is not None:
        position_ids = position_ids[:, -input_ids.shape[1]:]
    inputs = {"input_ids": input_ids} if inputs_embeds is None or past else {"inputs_embeds": inputs_embeds}
    inputs.update(past_key_values=past_key_values, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=use_cache)
    if kwargs.get("repeats") is not None:  # depth at inference: generate(..., repeats=R)
        inputs["repeats"] = kwargs["repeats"]
    return inputs


if GenerationMixin is object or "input_ids" not in inspect.signature(
        GenerationMixin.prepare_inputs_for_generation).parameters:
    MoEUTForCausalLM.prepare_inputs_for_generation = _prepare_inputs_for_generation


__all__ = ["MoEUTForCausalLM", "MoEUTModel", "MoEUTPreTrainedModel", "expert_matmul"]
