# Configuration of a MoEUT model (Csordás et al., "MoEUT: Mixture-of-Experts Universal Transformers",
# NeurIPS 2024) for Hugging Face transformers. Written by `moeut export-hf`; self-contained: it imports only
# transformers, so an exported directory loads where moeut is not installed.
"""MoEUT configuration for transformers (``model_type = "moeut"``; also its dense and SUT baselines)."""

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


class MoEUTConfig(PreTrainedConfig):
    r"""Hyper-parameters of a MoEUT language model or of its dense pre-LN baseline (``arch="dense"``).

    The standard transformers names hold the standard quantities; the MoEUT-specific fields keep the names of
    ``moeut.ModelConfig`` (also reachable under their moeut names through ``attribute_map``):

    * ``hidden_size`` (d_model), ``num_hidden_layers`` (n_layers: layer *applications*; the ``group_size`` = G
      distinct layers are applied ``num_hidden_layers / G`` times, so the KV cache has one entry per
      application), ``num_attention_heads`` (n_heads), ``head_dim`` (d_head), ``max_position_embeddings``
      (context_length: the training context; RoPE itself has no hard limit).
    * SwitchHead attention: ``att_n_experts`` value/output experts per head, ``att_k`` active per head and token;
      ``att_norm_init`` (init only) renormalises the V/O experts across the expert axis, as the paper's ≥126M runs.
    * σ-MoE feed-forward: ``ff_n_experts`` experts of width ``ff_expert_size``, ``ff_k`` active per token.
    * dense baseline: ``d_ff``.
    * ``entropy_reg`` / ``att_entropy_reg``: weights of the load-balancing regularisers (the model's ``aux_loss``);
      ``entropy_reg_mode``: their mean softmax per sequence (``"sequence"``, the paper's), over the micro-batch
      (``"batch"``) or over all data-parallel ranks (``"global"``).
    * ``balancing``: ``"entropy"`` (the regularisers above), ``"loss_free"`` (DeepSeek-V3's auxiliary-loss-free
      balancing: each router's selection bias, a buffer saved with the weights, is added to the sigmoid scores to
      choose the experts; no regulariser in ``aux_loss``) or ``"both"``; ``balancing_rate``: the bias's step per
      update in moeut's trainer (informative here: the exported model does not move the bias).
    * ``rope_fraction`` (RoPE on the first ``int(rope_fraction·head_dim)`` channels, rounded down to even) and
      ``rope_base``.
    * ``norm_placement``: the MoEUT layer's LayerNorms, ``"peri"`` (the paper's), ``"pre"`` or ``"post"`` (then the
      embeddings are scaled by √d and normalised without parameters, and there is no output LayerNorm).
    * ``group_order``: the order of the layer applications, ``"abab"`` (A B A B …) or ``"aabb"`` (A A … B B …).
    * ``repeats``: depth chosen at inference: apply the G distinct layers ``repeats`` times (``repeats·G``
      applications) instead of the trained ``num_hidden_layers / G``; None = as trained. Also a forward (and
      ``generate``) argument. With ``"aabb"`` each distinct layer runs ``repeats`` times in a row.
    * ``act`` (None = the architecture's default: on for SUT, off otherwise). MoEUT with ``act=True`` halts per
      token over applications of the whole group (stick-breaking, as SUT): ``act_reg``, ``act_threshold`` as
      for SUT, ``act_halt_bias_init`` the halting gate's initial halt-logit bias (negative = deep start). A
      config.json written before MoEUT had ACT holds ``act: true`` for every architecture and no
      ``act_halt_bias_init``: for MoEUT and dense that is read as ``act=False``, the model it describes.
    * ``arch="sut"``, the Sparse Universal Transformer baseline (post-LN, mixture of attention heads with
      ``num_attention_heads`` heads *per attention expert*, softmax MoE): ``act`` (ACT halting), ``act_reg``,
      ``act_threshold``, ``mi_reg`` / ``mi_loss`` (its router loss, ``"code"`` or ``"paper"``), ``sample_topk``,
      ``rel_pos_max`` (relative positions clipped to ±(rel_pos_max − 1)).
    * ``output_router_logits``: when True, ``loss`` includes ``aux_loss`` (moeut's training objective) and the
      outputs carry the σ-MoE router logits of every layer application.
    """

    model_type = "moeut"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "d_head": "head_dim",
        "context_length": "max_position_embeddings",
    }

    def __init__(
        self,
        arch="moeut", vocab_size=8000, hidden_size=412, num_hidden_layers=16, group_size=2,
        num_attention_heads=4, head_dim=82,
        att_n_experts=8, att_k=2, att_norm_init=False,  # SwitchHead
        ff_n_experts=155, ff_expert_size=128, ff_k=12,  # σ-MoE
        d_ff=2053,  # dense baseline
        entropy_reg=0.01, att_entropy_reg=0.001, entropy_reg_mode="sequence",
        balancing="entropy", balancing_rate=1e-3,  # load balancing: regulariser and/or loss-free selection bias
        rope_fraction=0.5, rope_base=10000.0, max_position_embeddings=1024,
        norm_placement="peri", group_order="abab", repeats=None,
        act=None, act_reg=0.01, act_threshold=0.999, act_halt_bias_init=None,  # ACT (MoEUT and SUT)
        act_halting="frozen",  # MoEUT ACT: "frozen" tokens still computed, or "skip" (halted tokens do no work)
        act_target_depth=0.0, act_target_rate=0.01, act_depth_entropy=0.0,  # "skip": a depth budget (training)
        act_penalty_rate=0.0,
        mi_reg=0.001, mi_loss="code", sample_topk=0, rel_pos_max=64,  # SUT
        layer_norm_eps=1e-5, use_cache=True, output_router_logits=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
        **kwargs,
    ):
        _check_choices(arch=arch, mi_loss=mi_loss, entropy_reg_mode=entropy_reg_mode,
                       norm_placement=norm_placement, group_order=group_order, balancing=balancing,
                       act_halting=act_halting)
        if balancing != "entropy" and arch != "moeut":
            raise ValueError(f"MoEUTConfig.balancing={balancing!r}: only MoEUT's sigmoid routers have loss-free "
                             f"balancing (arch={arch!r})")
        if group_size <= 0 or num_hidden_layers % group_size:
            raise ValueError(f"MoEUTConfig.group_size={group_size} must divide num_hidden_layers={num_hidden_layers}")
        _check_repeats(repeats, arch)
        act = _resolve_act(act, arch, group_order, act_halt_bias_init)
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.group_size = group_size
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.att_n_experts = att_n_experts
        self.att_k = att_k
        self.att_norm_init = att_norm_init
        self.ff_n_experts = ff_n_experts
        self.ff_expert_size = ff_expert_size
        self.ff_k = ff_k
        self.d_ff = d_ff
        self.entropy_reg = entropy_reg
        self.att_entropy_reg = att_entropy_reg
        self.entropy_reg_mode = entropy_reg_mode
        self.balancing = balancing
        self.balancing_rate = balancing_rate
        self.rope_fraction = rope_fraction
        self.rope_base = rope_base
        self.max_position_embeddings = max_position_embeddings
        self.norm_placement = norm_placement
        self.group_order = group_order
        self.repeats = repeats
        self.act = act
        self.act_reg = act_reg
        self.act_threshold = act_threshold
        self.act_halt_bias_init = 0.0 if act_halt_bias_init is None else act_halt_bias_init
        self.act_halting = act_halting
        self.act_target_depth = act_target_depth
        self.act_target_rate = act_target_rate
        self.act_depth_entropy = act_depth_entropy
        self.act_penalty_rate = act_penalty_rate
        self.mi_reg = mi_reg
        self.mi_loss = mi_loss
        self.sample_topk = sample_topk
        self.rel_pos_max = rel_pos_max
        self.layer_norm_eps = layer_norm_eps
        self.use_cache = use_cache
        self.output_router_logits = output_router_logits
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def n_repeats(self):
        """How often the group of ``group_size`` distinct layers was applied in training."""
        return self.num_hidden_layers // self.group_size

    def resolve_repeats(self, repeats=None):
        """The group's applications in a forward pass: ``repeats`` if given, else ``self.repeats``, else as trained."""
        if repeats is None:
            repeats = self.repeats
        if repeats is None:
            return self.n_repeats
        _check_repeats(repeats, self.arch)
        return repeats

    def layer_index(self, application, repeats=None):
        """Which of the ``group_size`` distinct layers runs at absolute layer application ``application`` when
        the group is applied ``repeats`` times (resolved as :meth:`resolve_repeats`)."""
        if self.group_order == "aabb":
            return application // self.resolve_repeats(repeats)
        return application % self.group_size

    @property
    def n_rotate(self):
        """Channels of each head that RoPE rotates (an even number)."""
        n = int(self.rope_fraction * self.head_dim)
        return n - n % 2


# the fields that take one of a few names, and those names
_CHOICES = {
    "arch": ("moeut", "dense", "sut"),
    "mi_loss": ("code", "paper"),
    "entropy_reg_mode": ("sequence", "batch", "global"),
    "balancing": ("entropy", "loss_free", "both"),
    "norm_placement": ("peri", "pre", "post"),
    "group_order": ("abab", "aabb"),
    "act_halting": ("frozen", "skip"),
}


def _check_choices(**fields):
    """Refuse a field of _CHOICES outside its names (in the order given), naming the ones it may take."""
    for name, value in fields.items():
        allowed = _CHOICES[name]
        if value not in allowed:
            names = ", ".join(f'"{a}"' for a in allowed[:-1]) + f' or "{allowed[-1]}"'
            raise ValueError(f"MoEUTConfig.{name}={value!r}: must be {names}")


def _resolve_act(act, arch, group_order, act_halt_bias_init):
    """``act`` as the model reads it: None = the architecture's default (on for SUT only); ``act: true`` without
    ``act_halt_bias_init`` on MoEUT/dense is a config.json from before MoEUT had ACT (every one of them said
    act: true) and means no ACT. Refuses ACT where the architecture cannot halt."""
    if act is None:
        act = arch == "sut"
    elif act and arch != "sut" and act_halt_bias_init is None:
        act = False
    if act and arch == "dense":
        raise ValueError("MoEUTConfig.act=True: the dense baseline has no shared depth to halt over")
    if act and arch == "moeut" and group_order != "abab":
        raise ValueError('MoEUTConfig.act=True halts between group applications: needs group_order="abab"')
    return act


def _check_repeats(repeats, arch):
    if repeats is None:
        return
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"MoEUTConfig.repeats={repeats!r}: must be a positive integer or None (as trained)")
    if arch == "dense" and repeats != 1:
        raise ValueError(f"MoEUTConfig.repeats={repeats}: the dense baseline shares no layers; its depth cannot change")


__all__ = ["MoEUTConfig"]
