"""AFD: attention-FFN disaggregated serving for Mixture-of-Experts LLMs."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import afd.comm` in a worker does not pull in the whole engine.
    if name == "LLM":
        from afd.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from afd.sampling.params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
