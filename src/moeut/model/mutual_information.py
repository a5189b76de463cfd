"""The SUT router loss ("mutual information", Tan et al., 2023), pooled over every application of a layer.

With ``p(e|x)`` the router softmax of token-application ``x`` and ``p_x`` the token weights (uniform over
the tokens that still run; under ACT the SUT authors' code weights each token by its probability of not
having halted yet, and 0 once frozen):

    H(E|X) = −Σ_x p_x Σ_e p(e|x) log p(e|x)          (low: each token routes confidently)
    H(E)   = −Σ_e p(e) log p(e),  p(e) = Σ_x p_x p(e|x)   (high: the experts are used evenly)

The SUT paper maximises the mutual information ``MI = H(E) − H(E|X)``, i.e. minimises ``H(E|X) − H(E)``
(``form="paper"``). The authors' code (``H_e = (p_e · log p_e).sum()``, which is −H(E), then
``miloss = −(neg_H_e_given_x + H_e)``) minimises ``H(E|X) + H(E)``, which also pushes the experts' overall
use to *collapse*. The MoEUT paper's SUT runs used that code, so ``form="code"`` is the default (faithful
reproduction); ``"paper"`` is the loss the SUT paper describes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mutual_information_loss(logits: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None],
                            form: str = "code") -> torch.Tensor:
    """The loss over router logits ``[..., E]`` of R applications, each with token weights ``[...]`` or None
    (= all ones). ``form``: ``"code"`` → ``H(E|X) + H(E)``; ``"paper"`` → ``H(E|X) − H(E)``."""
    if form not in ("code", "paper"):
        raise ValueError(f'form must be "code" or "paper", got {form!r}')
    n_experts = logits[0].shape[-1]
    log_p = torch.cat([t.float().reshape(-1, n_experts).log_softmax(-1) for t in logits])  # [X, E]
    w = torch.cat([(torch.ones(t.shape[:-1], device=t.device) if m is None else m.float()).reshape(-1)
                   for t, m in zip(logits, weights)])
    p_x = (w / (w.sum() + 1e-12)).unsqueeze(-1)  # [X, 1]
    p = log_p.exp()
    h_e_given_x = -(p_x * p * log_p).sum()
    p_e = (p_x * p).sum(0)
    h_e = -(p_e * p_e.clamp_min(1e-30).log()).sum()
    return h_e_given_x + h_e if form == "code" else h_e_given_x - h_e
