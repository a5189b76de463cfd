"""Training with a sampled depth: the number of group applications drawn anew at every optimizer step.

A shared-layer model trained at one depth R learns to be read out after exactly R applications; applied more
often at inference it gets worse ("overthinking"). Huginn (Geiping et al. 2025) trains with a depth drawn per
step so that extra applications help instead of hurting. Two laws:

* ``uniform:LO-HI`` — R uniform over LO … HI (inclusive);
* ``lognormal-poisson:MEAN:MAX[:SIGMA]`` — Huginn's: R = 1 + Poisson(λ), λ ~ LogNormal with E[λ] = MEAN − 1
  (so E[R] = MEAN before clipping) and log-space spread SIGMA (default 0.5), clipped to MAX.

The draw for step s is a pure function of (seed, s), made with its own generator: every data-parallel rank
takes the same depth, a resumed run the same depths as an uninterrupted one, and the global RNG (part of a
checkpoint) is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAWS = ("uniform", "lognormal-poisson")
_STREAM = 0x5DEECE66D  # separates this generator's seeds from other uses of the run's seed


class DepthSamplingError(ValueError):
    """A depth-sampling spec cannot be read; the message shows the accepted forms."""


_FORMS = '"uniform:LO-HI" (e.g. uniform:1-4) or "lognormal-poisson:MEAN:MAX[:SIGMA]" (e.g. lognormal-poisson:2:6)'


@dataclass(frozen=True)
class DepthSampler:
    law: str
    low: int  # the smallest depth drawn (1 for lognormal-poisson)
    high: int  # the largest
    mean: float = 0.0  # lognormal-poisson: E[R] before clipping
    sigma: float = 0.5  # lognormal-poisson: spread of log λ

    @classmethod
    def parse(cls, spec: str) -> "DepthSampler":
        law, _, rest = spec.partition(":")
        try:
            if law == "uniform":
                lo, hi = (int(v) for v in rest.split("-"))
                sampler = cls("uniform", lo, hi)
            elif law == "lognormal-poisson":
                parts = rest.split(":")
                if len(parts) not in (2, 3):
                    raise ValueError
                sampler = cls("lognormal-poisson", 1, int(parts[1]), mean=float(parts[0]),
                              sigma=float(parts[2]) if len(parts) == 3 else 0.5)
            else:
                raise ValueError
        except ValueError:
            raise DepthSamplingError(f"depth sampling {spec!r}: expected {_FORMS}") from None
        sampler._check(spec)
        return sampler

    def _check(self, spec: str) -> None:
        if not 1 <= self.low <= self.high:
            raise DepthSamplingError(f"depth sampling {spec!r}: depths must satisfy 1 <= LO <= HI (group applications)")
        if self.law == "lognormal-poisson" and not (1 < self.mean <= self.high and self.sigma > 0):
            raise DepthSamplingError(f"depth sampling {spec!r}: needs 1 < MEAN <= MAX and SIGMA > 0")

    def repeats(self, seed: int, step: int) -> int:
        """The number of group applications of optimizer step ``step`` (0-based) of a run seeded ``seed``."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) ^ _STREAM)
        if self.law == "uniform":
            return int(torch.randint(self.low, self.high + 1, (1,), generator=g))
        mu = math.log(self.mean - 1) - self.sigma ** 2 / 2  # E[LogNormal(mu, sigma)] = mean - 1
        lam = torch.empty(1, dtype=torch.float64).log_normal_(mu, self.sigma, generator=g)
        return min(self.high, 1 + int(torch.poisson(lam, generator=g)))

    def describe(self) -> str:
        if self.law == "uniform":
            return f"depth sampled uniformly over {self.low}…{self.high} group applications per step"
        return (f"depth sampled per step as 1 + Poisson(LogNormal), mean {self.mean:g}, σ {self.sigma:g}, at most "
                f"{self.high} group applications")
