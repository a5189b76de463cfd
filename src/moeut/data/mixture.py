"""Training on a weighted mixture of prepared directories (``moeut train --data A:3 --data B:1``).

A source is ``DIR[:WEIGHT]`` (weight 1 when omitted; weights are normalised to proportions ``p_s``).
Every source must be tokenized with the same tokenizer.

Which source global sample ``g = step * batch_size + i`` comes from, and which of that source's samples it
is, is a pure function of ``g`` — so ``batch(step)`` stays a pure function of ``(seed, step, rank)`` and
resuming is exact without sampler state:

* the weights are rounded to integer quotas ``q_s`` of a period of ``P = 2**16`` samples (largest
  remainder, so they sum to ``P``); within a period the samples are dealt out like seats in a
  Sainte-Laguë apportionment: the ``k``-th sample of source ``s`` sits at the rank of ``(2k + 1) / (2 q_s)``
  among all such values (ties to the earlier source). Every prefix of a period holds each source's share to
  within about one sample, and a full period holds exactly ``q_s`` samples of source ``s``;
* the sample's index within its source is ``t * q_s + k`` (period ``t = g // P``): the sources' samples
  are numbered in arrival order, and that number goes through the source's own epoch-by-epoch permutation
  of its windows, exactly as :class:`~moeut.data.sampler.BatchSampler` does for a single directory (with a
  seed derived from ``(seed, s)``). So each source is still visited window by window, epoch after epoch,
  in its own shuffled order.

Validation uses the **first** source's ``val`` split (the one named first is the reference corpus; evaluate
the others with ``moeut evaluate --data DIR``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeut.data.errors import DataError, TokenizerMismatchError
from moeut.data.sampler import BatchSampler, _key
from moeut.data.shards import TokenDataset

PERIOD = 1 << 16

class MixtureSpecError(DataError, ValueError):
    """A ``--data DIR[:WEIGHT]`` entry is malformed (bad weight, no directory)."""


class MixtureTokenizerError(TokenizerMismatchError):
    """Two directories of a data mixture were tokenized with different tokenizers."""


@dataclass(frozen=True)
class DataSource:
    """One prepared directory of a mixture and its (unnormalised) weight."""

    dir: str
    weight: float = 1.0
    name: str = ""  # short name for the per-source metrics (tokens/<name>); default: the directory's name


def parse_source(spec: str | os.PathLike[str] | dict) -> DataSource:
    """``DIR``, ``DIR:WEIGHT`` or ``{"dir": DIR, "weight": W}``. A ``DIR`` that exists as given is never split
    at a colon; otherwise the text after the last ``:`` is the weight when it parses as a number."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"dir", "weight", "name"}
        if "dir" not in spec or unknown:
            raise MixtureSpecError(f"data source {spec!r}: expected {{'dir': DIR, 'weight': W}} "
                                   f"(unknown keys {sorted(unknown)})" if unknown else
                                   f"data source {spec!r} has no 'dir'")
        src = DataSource(str(spec["dir"]), float(spec.get("weight", 1.0)), str(spec.get("name", "")))
    else:
        text = os.fspath(spec)
        head, sep, tail = text.rpartition(":")
        weight = 1.0
        if sep and head and not Path(text).exists():
            try:
                weight = float(tail)
            except ValueError:
                head = text  # a colon inside the path
        else:
            head = text
        src = DataSource(head, weight)
    if not src.dir:
        raise MixtureSpecError(f"data source {spec!r} names no directory; use --data DIR[:WEIGHT]")
    if not (src.weight > 0 and np.isfinite(src.weight)):
        raise MixtureSpecError(f"data source {spec!r}: the weight must be a positive number, got {src.weight}")
    return src


def parse_sources(data: str | os.PathLike[str] | Sequence) -> list[DataSource]:
    """The sources of ``TrainConfig.data``: one string (a single directory, the old form) or a list."""
    items = [data] if isinstance(data, (str, os.PathLike, dict)) else list(data)
    if not items:
        raise MixtureSpecError("no data source given; pass --data DIR[:WEIGHT] (repeatable)")
    return [parse_source(s) for s in items]


def source_names(sources: Sequence[DataSource]) -> list[str]:
    """Metric names of the sources: the given name, else the directory's base name (``_2``, ... on clashes)."""
    names: list[str] = []
    for s in sources:
        base = s.name or Path(s.dir.rstrip("/\\")).name or "data"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def quotas(weights: Sequence[float], period: int = PERIOD) -> np.ndarray:
    """Integer quotas summing to ``period``, proportional to ``weights`` (largest remainder; ties by order)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * period
    q = np.floor(exact).astype(np.int64)
    short = period - int(q.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - q)))
    q[order[:short]] += 1
    if (q == 0).any():
        raise MixtureSpecError(f"weights {list(weights)}: a source's share is below 1/{period}; raise its weight")
    return q


def check_same_tokenizer(datasets: Sequence[TokenDataset], dirs: Sequence[str]) -> None:
    """All splits tokenized alike, or :class:`MixtureTokenizerError` naming both directories."""
    first = datasets[0]
    for ds, d in zip(datasets[1:], dirs[1:]):
        if ds.tokenizer_sha256 != first.tokenizer_sha256 or ds.vocab_size != first.vocab_size:
            raise MixtureTokenizerError(
                f"data mixture: {d} was tokenized with tokenizer {ds.tokenizer_sha256[:16]}… (vocab {ds.vocab_size}) "
                f"but {dirs[0]} with {first.tokenizer_sha256[:16]}… (vocab {first.vocab_size}); every --data "
                f"directory must share one tokenizer: re-run `moeut prepare --tokenizer {dirs[0]}/tokenizer.model` "
                f"on {d}'s inputs")


class MixtureSampler:
    """Batches ``[batch_size // world_size, seq_len + 1]`` drawn from several datasets by weight; pure in
    ``(seed, step, rank)`` (see the module docstring)."""

    def __init__(self, datasets: Sequence[TokenDataset], weights: Sequence[float], batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per dataset, and at least one dataset")
        self.samplers = [BatchSampler(ds, batch_size, seq_len, seed=_key(seed, s), rank=rank, world_size=world_size)
                         for s, ds in enumerate(datasets)]
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.quotas = quotas(weights)
        self._src, self._k = self._deal(self.quotas)

    @staticmethod
    def _deal(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The source and arrival index ``k`` of each position of a period (Sainte-Laguë order)."""
        src = np.repeat(np.arange(len(q)), q)
        k = np.concatenate([np.arange(n) for n in q])
        order = np.lexsort((src, (2 * k + 1) / (2.0 * q[src])))  # equal rationals give equal doubles
        return src[order].astype(np.int64), k[order].astype(np.int64)

    def sources_of(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global sample indices ``g``: the source of each and its index within that source."""
        period, pos = np.divmod(np.asarray(g, dtype=np.int64), PERIOD)
        src = self._src[pos]
        return src, period * self.quotas[src] + self._k[pos]

    def batch(self, step: int) -> torch.Tensor:
        """This rank's rows at ``step``: a LongTensor ``[local_batch_size, seq_len + 1]``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = step * self.batch_size + self.rank * self.local_batch_size + np.arange(self.local_batch_size, dtype=np.int64)
        src, local = self.sources_of(g)
        rows: list[np.ndarray | None] = [None] * len(g)
        for s in np.unique(src):
            sel = np.flatnonzero(src == s)
            sampler = self.samplers[int(s)]
            for i, w in zip(sel, sampler.windows_of_samples(local[sel])):
                rows[i] = sampler.dataset.window(int(w) * sampler.window, sampler.window)
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # type: ignore[arg-type]

    def samples_per_source(self, n: int) -> np.ndarray:
        """How many of the first ``n`` global samples (all ranks) came from each source (closed form)."""
        full, rest = divmod(int(n), PERIOD)
        counts = self.quotas * full
        if rest:
            counts = counts + np.bincount(self._src[:rest], minlength=len(self.quotas))
        return counts


@dataclass
class TrainingData:
    """The training splits of one or more prepared directories and the validation split (the first one's)."""

    sources: list[DataSource]
    names: list[str]
    train: list[TokenDataset]
    val: TokenDataset

    @classmethod
    def open(cls, data: str | os.PathLike[str] | Sequence) -> TrainingData:
        sources = parse_sources(data)
        train = [TokenDataset.open(Path(s.dir) / "train") for s in sources]
        check_same_tokenizer(train, [s.dir for s in sources])
        val = TokenDataset.open(Path(sources[0].dir) / "val", expected_tokenizer_sha256=train[0].tokenizer_sha256)
        return cls(sources, source_names(sources), train, val)

    @property
    def is_mixture(self) -> bool:
        return len(self.sources) > 1

    @property
    def tokenizer_sha256(self) -> str:
        return self.train[0].tokenizer_sha256

    @property
    def vocab_size(self) -> int:
        return self.train[0].vocab_size

    @property
    def num_tokens(self) -> int:
        return sum(ds.num_tokens for ds in self.train)

    @property
    def first_dir(self) -> Path:
        """The first source's directory: its tokenizer files are copied into the run, its val split is used."""
        return Path(self.sources[0].dir)

    def describe(self) -> str:
        if not self.is_mixture:
            return self.sources[0].dir
        total = sum(s.weight for s in self.sources)
        return " + ".join(f"{s.dir} ({s.weight / total:.1%})" for s in self.sources)

    def sampler(self, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                world_size: int = 1) -> BatchSampler | MixtureSampler:
        """A :class:`BatchSampler` for one directory (the order of single-directory runs is unchanged), else a
        :class:`MixtureSampler`."""
        if not self.is_mixture:
            return BatchSampler(self.train[0], batch_size, seq_len, seed=seed, rank=rank, world_size=world_size)
        return MixtureSampler(self.train, [s.weight for s in self.sources], batch_size, seq_len, seed=seed,
                              rank=rank, world_size=world_size)

    def tokens_per_source(self, sampler: BatchSampler | MixtureSampler, steps: int) -> dict[str, int]:
        """``{"tokens/<name>": n}``: tokens (inputs, as ``tokens_seen``) each source gave in the first ``steps``
        steps (all ranks); empty for a single directory."""
        if not isinstance(sampler, MixtureSampler):
            return {}
        counts = sampler.samples_per_source(steps * sampler.batch_size)
        return {f"tokens/{n}": int(c) * sampler.seq_len for n, c in zip(self.names, counts)}
