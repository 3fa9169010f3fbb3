"""Block-FP8 on a GPU: the engine keeping FP8 weights on CUDA (compiled Triton FP8 kernels) against
the same engine on CPU (torch references). The kernels themselves are in the gate,
tests/test_gpu_kernels.py. Skipped without a GPU; scripts/gpu_check.sh runs it with
TRITON_INTERPRET=0."""

from __future__ import annotations

import pytest
import torch
from conftest import mixed_prompts

from afd import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_cuda_fp8_engine_matches_cpu_fp8_engine(model):
    """--quantization fp8 (weights quantized in 128x128 blocks while loading): compiled FP8
    kernels on CUDA give the CPU torch references' greedy tokens."""
    prompts = mixed_prompts(4, 512, seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", quantization="fp8", block_size=16)
    cpu = LLM(model, **kw).generate(prompts, params)
    gpu = LLM(model, device="cuda", **kw).generate(prompts, params)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs,
                               a.outputs[0].token_ids, strict=True):  # fmt: skip
            assert abs(la[tok] - lb[tok]) < 1e-3
