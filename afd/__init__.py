"""AFD: attention-FFN disaggregated serving for Mixture-of-Experts LLMs."""

from __future__ import annotations

import os
import sys

from afd.version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]


def _unshadow_checkout() -> None:
    # The checkout's top-level folders are afd.<folder> (pyproject's package-dir). Run from the
    # checkout (`python3 -m ...` puts it first on sys.path) they are also bare packages, and
    # kernels/ then hides the pip package of that name that transformers imports.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]


_unshadow_checkout()


def __getattr__(name: str):
    # Lazy so that `import afd.comm` in a worker does not pull in the whole engine.
    if name == "LLM":
        from afd.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from afd.sampling.params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
