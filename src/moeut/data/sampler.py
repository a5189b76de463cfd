"""Deterministic, resumable batches of contiguous token windows.

The token stream of a split is cut into non-overlapping windows of ``seq_len + 1`` tokens (window
``w`` covers tokens ``[w * (seq_len + 1), (w + 1) * (seq_len + 1))``; the tail shorter than a window is
not used). A row holds the inputs ``row[:-1]`` and targets ``row[1:]``; windows run across document
boundaries (documents are separated by EOS).

:class:`BatchSampler` visits the windows epoch after epoch, each epoch in its own pseudo-random
order. Global sample ``g = step * batch_size + i`` is window ``perm_e(g mod W)`` of epoch
``e = g // W``, where ``W`` is the number of windows and ``perm_e`` a permutation keyed by
``(seed, e)``. The permutation is a Feistel network with cycle walking, evaluated pointwise with
integer arithmetic only: no state, no O(W) arrays, and no dependence on NumPy's or PyTorch's
random streams, so ``batch(step)`` is a pure function of ``(seed, step, rank)`` and resuming at
any step is exact without saving sampler state.

Ranks: rank ``r`` of ``world_size`` takes the **contiguous block** of rows
``[r * b, (r + 1) * b)`` of the global batch, with ``b = batch_size // world_size``.

:class:`EvalWindows` iterates over all windows of a (validation) split in order, for perplexity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from moeut.data.shards import TokenDataset

_M64 = (1 << 64) - 1


def _key(*parts: int) -> int:
    """A 64-bit key from integers (stable across platforms and versions)."""
    data = b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"moeut-sampler").digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A keyed pseudo-random permutation of ``range(n)``, evaluated pointwise.

    A balanced Feistel network permutes ``range(2**bits)`` (``bits`` even, ``2**bits < 4n``); values
    that land outside ``range(n)`` are encrypted again (cycle walking) until they fall inside, which
    keeps it a bijection on ``range(n)``.
    """

    def __init__(self, n: int, key: int, rounds: int = 6) -> None:
        if n <= 0:
            raise ValueError(f"permutation size must be positive, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self._half = np.uint64(bits // 2)
        self._mask = np.uint64((1 << (bits // 2)) - 1)
        self._keys = [np.uint64(_key(key, r)) for r in range(rounds)]

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        x = np.asarray(index, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"index outside range({self.n})")
        out = self._round_trip(x.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._round_trip(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


class BatchSampler:
    """Batches ``[batch_size // world_size, seq_len + 1]`` of shuffled windows; ``batch(step)`` is pure.

    ``batch_size`` is the global batch (all ranks together); ``world_size`` must divide it.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"world_size {world_size} must divide the global batch_size {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self.window = seq_len + 1
        self.windows_per_epoch = dataset.num_tokens // self.window
        if self.windows_per_epoch == 0:
            raise ValueError(f"{dataset.directory} holds {dataset.num_tokens} tokens, fewer than one window of "
                             f"seq_len + 1 = {self.window}; use a shorter seq_len or more data")
        self._perms: dict[int, FeistelPermutation] = {}

    def _perm(self, epoch: int) -> FeistelPermutation:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) > 4:
                self._perms.clear()
            p = self._perms[epoch] = FeistelPermutation(self.windows_per_epoch, _key(self.seed, epoch))
        return p

    @property
    def steps_per_epoch(self) -> float:
        """Steps to visit every window once (fractional)."""
        return self.windows_per_epoch / self.batch_size

    def epoch(self, step: int) -> float:
        """Fractional epoch at the start of ``step``."""
        return step * self.batch_size / self.windows_per_epoch

    def window_indices(self, step: int) -> np.ndarray:
        """Window numbers of this rank's rows at ``step`` (int64, length ``local_batch_size``)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = step * self.batch_size + self.rank * self.local_batch_size + np.arange(self.local_batch_size, dtype=np.int64)
        return self.windows_of_samples(g)

    def windows_of_samples(self, g: np.ndarray) -> np.ndarray:
        """Window numbers of sample indices ``g`` (sample ``g`` is window ``perm_e(g mod W)``, ``e = g // W``)."""
        g = np.asarray(g, dtype=np.int64)
        epochs, pos = np.divmod(g, self.windows_per_epoch)
        out = np.empty_like(g)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))(pos[sel])
        return out

    def batch(self, step: int) -> torch.Tensor:
        """This rank's rows at ``step``: a LongTensor ``[local_batch_size, seq_len + 1]``."""
        rows = [self.dataset.window(int(w) * self.window, self.window) for w in self.window_indices(step)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def iter_batches(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[torch.Tensor]:
        """``batch(start_step)``, ``batch(start_step + 1)``, ... (endless unless ``num_steps``)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_batches(0)


class EvalWindows:
    """All non-overlapping windows of a split, in order, in batches ``[<= batch_size, seq_len + 1]``.

    With several ranks, rank ``r`` takes the contiguous block ``[r * W // world_size,
    (r + 1) * W // world_size)`` of the ``W`` windows, so ranks may differ by one window (and one
    batch); sum losses and token counts over ranks at the end. The last batch may be smaller.
    Each window predicts ``seq_len`` tokens, so ``num_windows * seq_len`` tokens are scored in total.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.window = seq_len + 1
        total = dataset.num_tokens // self.window
        self.total_windows = total
        self.first = rank * total // world_size
        self.num_windows = (rank + 1) * total // world_size - self.first

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    @property
    def num_target_tokens(self) -> int:
        """Tokens scored by this rank: ``num_windows * seq_len``."""
        return self.num_windows * self.seq_len

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(0, self.num_windows, self.batch_size):
            n = min(self.batch_size, self.num_windows - i)
            start = (self.first + i) * self.window
            block = self.dataset.window(start, n * self.window).reshape(n, self.window)
            yield torch.from_numpy(block.astype(np.int64))


def validation_batches(dataset: TokenDataset, seq_len: int, batch_size: int, *, max_batches: int | None = None,
                       rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """The first ``max_batches`` (all when ``None``) batches of :class:`EvalWindows` over ``dataset``."""
    for i, batch in enumerate(EvalWindows(dataset, batch_size, seq_len, rank=rank, world_size=world_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield batch
