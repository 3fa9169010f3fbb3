"""GPU paths: the engine on CUDA (compiled Triton kernels) against the CPU engine. Skipped without
a GPU; on a CUDA machine run `TRITON_INTERPRET=0 python3 -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import mixed_prompts

from afd import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_cuda_engine_matches_cpu(model):
    from afd.kernels import ops

    prompts = mixed_prompts(6, 512, seed=2)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    cpu = LLM(model, dtype="float32", block_size=16).generate(prompts, params)
    for k in (1, 4):
        llm = LLM(model, dtype="float32", device="cuda", block_size=16, num_scheduler_steps=k)
        assert ops.get_kernel_backend() == "auto"
        gpu = llm.generate(prompts, params)
        for a, b in zip(cpu, gpu, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, f"k={k}"
            for la, lb, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs,
                                   a.outputs[0].token_ids, strict=True):  # fmt: skip
                assert abs(la[tok].logprob - lb[tok].logprob) < 1e-3
    assert os.environ.get("TRITON_INTERPRET") != "1", "Triton ran interpreted: set it to 0"
