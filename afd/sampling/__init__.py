"""Sampling: per-request settings (`SamplingParams`) and the sampler that runs them."""

from __future__ import annotations

from afd.sampling.params import SamplingParams

__all__ = ["SamplingParams"]
