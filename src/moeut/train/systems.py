"""Systems metrics of a training run: achieved TFLOP/s, MFU against a per-device peak, peak memory.

FLOPs convention: moeut's own forward MAC count per token at the training context (``macs_per_token`` of
:mod:`moeut.model.accounting`: every matmul of the layers, the attention over the whole context, and the
output head), times 3 for forward + backward, times 2 FLOPs per MAC — the usual ``6·N``-style "model FLOPs"
(recomputation by activation checkpointing is not counted, so MFU does not rise when it is on). The authors'
``paper_*`` accounting (forward only, no head) is not used here; ``moeut info`` prints both.

``tflops`` and ``mfu`` are per device: the step's FLOPs divided by the number of ranks and by the time of
the optimizer step (forward, backward, clipping, AdamW; not evaluation or checkpoint saves).
"""

from __future__ import annotations

import re

import torch

from moeut.model.accounting import model_stats
from moeut.model.config import ModelConfig
from moeut.runtime import current_rss_bytes, peak_rss_bytes

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first pattern
# that matches ``torch.cuda.get_device_name`` wins. V100 and T4 have no bf16 units: their fp16 peak is listed.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"\bB200\b", 2250.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA40\b", 150.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX A6000\b", 155.0),
    (r"\bV100\b", 125.0),  # fp16
    (r"\bT4\b", 65.0),  # fp16
]


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The per-device peak for MFU: ``override`` (``--peak-tflops``) if given, else the table entry of the
    GPU's name, else None (CPUs, unknown GPUs: ``mfu`` is then null)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return peak
    return None


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token: 3 (forward + backward) × 2 (FLOPs per MAC) × forward MACs."""
    return 6.0 * model_stats(cfg, context=seq_len)["macs_per_token"]


class PeakMemory:
    """Peak memory since :meth:`start`: CUDA ``max_memory_allocated``; on CPU the growth of the peak resident
    set size over the resident size at the start (0 when the process had been larger before)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = ("cuda max_memory_allocated" if device.type == "cuda"
                     else "cpu peak RSS - RSS at training start")
        self._rss0 = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss0 = current_rss_bytes()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, peak_rss_bytes() - self._rss0)
