"""Run under torchrun: ``moeut train`` (the arguments after DUMP), recording on every rank the selection biases
after each loss-free balancing update into ``DUMP.<rank>`` (a list, one dict of buffers per step).

usage: loss_free_child.py DUMP train --preset ... --model balancing=loss_free ...
"""

from __future__ import annotations

import os
import sys

import torch

from moeut.cli import main
from moeut.model.lm import MoEUTLM

HISTORY: list[dict[str, torch.Tensor]] = []


def _recording(update):
    def wrapped(self, counts):
        out = update(self, counts)
        HISTORY.append({n: b.detach().clone() for n, b in self.named_buffers() if n.endswith("_bias")})
        torch.save(HISTORY, f"{sys.argv[1]}.{os.environ.get('RANK', '0')}")
        return out

    return wrapped


if __name__ == "__main__":
    MoEUTLM.update_selection_bias = _recording(MoEUTLM.update_selection_bias)
    sys.exit(main(sys.argv[2:]))
