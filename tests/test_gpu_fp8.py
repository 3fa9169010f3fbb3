"""Block-FP8 on a GPU: the engine keeping FP8 weights on CUDA with the Triton FP8 kernels forced
(and counted, so a host without them cannot compare the torch path with itself) against the same
engine on CPU (torch references), and the compiled FP8 GEMM against hand-computed e4m3 values.
The kernels themselves are in the gate, tests/test_gpu_kernels.py. Skipped without a GPU;
scripts/gpu_check.sh runs it with TRITON_INTERPRET=0."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import mixed_prompts

from afd import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FP8_KERNELS = ("fp8_linear", "fused_moe_fp8")


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts, per kernel name, the calls that reached a Triton implementation."""
    pytest.importorskip("triton", reason="the Triton FP8 kernels need the 'triton' package")
    from afd.kernels import ops

    assert ops.triton_available(), "triton imports but the AFD Triton kernels do not"
    calls: collections.Counter = collections.Counter()
    for name in FP8_KERNELS:
        impl = ops._TRITON_IMPLS[name]

        def counted(*args, _impl=impl, _name=name, **kwargs):
            calls[_name] += 1
            return _impl(*args, **kwargs)

        monkeypatch.setitem(ops._TRITON_IMPLS, name, counted)
    yield calls
    ops.set_kernel_backend("auto")


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_cuda_fp8_engine_matches_cpu_fp8_engine(model, triton_calls):
    """--quantization fp8 (weights quantized in 128x128 blocks while loading): the compiled
    Triton FP8 kernels on CUDA give the CPU torch references' greedy tokens."""
    prompts = mixed_prompts(4, 512, seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", quantization="fp8", block_size=16)
    with LLM(model, kernel_backend="torch", **kw) as cpu_llm:
        cpu = cpu_llm.generate(prompts, params)
    assert not triton_calls, "the CPU reference ran Triton kernels"
    with LLM(model, device="cuda", kernel_backend="triton", **kw) as gpu_llm:
        gpu = gpu_llm.generate(prompts, params)
    assert all(triton_calls[name] > 0 for name in FP8_KERNELS), dict(triton_calls)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs,
                               a.outputs[0].token_ids, strict=True):  # fmt: skip
            assert abs(la[tok] - lb[tok]) < 1e-3


def test_cuda_fp8_gemm_on_hand_computed_values(triton_calls):
    """The compiled FP8 GEMM of one-hot activations returns the hand-computed weight columns
    (e4m3 value times the block's weight_scale_inv; see test_fp8_checkpoints.E4M3)."""
    from test_fp8_checkpoints import hand_fp8

    from afd.kernels import ops

    weight, scales, expected = hand_fp8("model.layers.0.self_attn.q_proj.weight")
    columns = [0, 130, 255]
    x = torch.zeros(len(columns), weight.shape[1], device="cuda")
    x[range(len(columns)), columns] = 1.0
    ops.set_kernel_backend("triton")
    out = ops.fp8_linear(x, weight.cuda(), scales.cuda(), (128, 128))
    assert triton_calls["fp8_linear"] == 1
    torch.testing.assert_close(out.cpu(), expected[:, columns].t(), rtol=1e-5, atol=0)
