"""Block-FP8 on a GPU: the compiled Triton FP8 kernels against their torch references at DeepSeek-V3
shapes, and the engine keeping FP8 weights on CUDA against the same engine on CPU (torch
references). Skipped without a GPU; scripts/gpu_check.sh runs it with TRITON_INTERPRET=0.

Tolerances as in tests/test_fp8_kernels.py: the quantized activations are bit-exact, so only the
order of fp32 sums differs (bf16 outputs: 3e-2)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import mixed_prompts

from afd import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BLOCK = (128, 128)


def test_compiled_fp8_kernels_match_references():
    from afd.kernels import torch_ops
    from afd.kernels.triton_fp8 import fp8_linear, quant_fp8
    from afd.kernels.triton_moe import fused_moe_fp8

    assert os.environ.get("TRITON_INTERPRET") != "1", "Triton would run interpreted: set it to 0"
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(300, 7168, device=dev, generator=g).to(torch.bfloat16)
    q, s = quant_fp8(x)
    q_ref, s_ref = torch_ops.quant_fp8(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    w = torch.randn(2100, 7168, device=dev, generator=g) * 7168**-0.5  # N not a multiple of 128
    wq, ws = torch_ops.quant_fp8_blocks(w, BLOCK)
    out = fp8_linear(x, wq, ws, BLOCK)
    ref = torch_ops.fp8_linear(x, wq, ws, BLOCK)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    # one of 8 expert shards of DeepSeek-V3: 32 local experts, ids elsewhere skipped
    experts, hidden, inter = 32, 7168, 2048
    w13 = torch.randn(experts, 2 * inter, hidden, device=dev, generator=g) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, device=dev, generator=g) * inter**-0.5
    fp8 = torch_ops.quant_fp8_experts(w13, w2, BLOCK)
    tokens = x[:200]
    weights, ids = torch.rand(200, 256, device=dev, generator=g).topk(8, dim=-1)
    ids = torch.where(ids < experts, ids, -1)
    out = fused_moe_fp8(tokens, *fp8, weights, ids, BLOCK)
    ref = torch_ops.fused_moe_fp8(tokens, *fp8, weights, ids, BLOCK)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


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
