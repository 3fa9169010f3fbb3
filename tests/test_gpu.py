"""GPU paths: the engine on CUDA (compiled Triton kernels) against the CPU engine. Skipped
without a GPU; scripts/gpu_check.sh runs tests/test_gpu*.py with TRITON_INTERPRET=0.

Prompts of 260-330 tokens: decode contexts past 256 tokens make the Triton decode kernels split
K on a GPU with a small batch, and every test checks that the Triton kernels really ran (ops
falls back to torch silently)."""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import pytest
import torch
from conftest import check_bf16_logprobs, hf_rows

from afd import LLM, SamplingParams
from afd.builtin import resolve_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODELS = ["tiny-qwen3-moe", "tiny-deepseek-v3"]
NEW = 16


def long_prompts(n: int, vocab: int = 512, seed: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (260 + 13 * i,), generator=g).tolist() for i in range(n)]


@contextlib.contextmanager
def count_triton_calls():
    """Counts calls of every Triton kernel behind afd.kernels.ops, and the split-K choices."""
    from afd.kernels import ops, triton_attention

    assert ops.triton_available(), "triton does not import"
    counts: Counter = Counter()
    saved = dict(ops._TRITON_IMPLS)
    pick = triton_attention._pick_num_splits

    def counted(name, impl):
        def call(*args, **kwargs):
            counts[name] += 1
            return impl(*args, **kwargs)

        return call

    def splits(*args):
        n = pick(*args)
        counts["split_k" if n > 1 else "no_split"] += 1
        return n

    ops._TRITON_IMPLS.update({name: counted(name, impl) for name, impl in saved.items()})
    triton_attention._pick_num_splits = splits
    try:
        yield counts
    finally:
        ops._TRITON_IMPLS.update(saved)
        triton_attention._pick_num_splits = pick


def assert_triton_ran(counts: Counter, model: str) -> None:
    attention = "mla_attention" if "deepseek" in model else "paged_attention"
    for name in ("rms_norm", "rotary_embedding", "fused_moe", attention):
        assert counts[name] > 0, f"the Triton {name} kernel never ran: {dict(counts)}"
    assert counts["split_k"] > 0, f"no decode step split K: {dict(counts)}"


def test_triton_is_compiled():
    from afd.kernels.triton_utils import INTERPRET

    assert not INTERPRET and os.environ.get("TRITON_INTERPRET") != "1", "set TRITON_INTERPRET=0"


@pytest.mark.parametrize("model", MODELS)
def test_cuda_engine_matches_cpu_fp32(model):
    """fp32 on CUDA, one and four scheduler steps: the CPU engine's greedy tokens, logprobs
    within 1e-3."""
    from afd.kernels import ops

    prompts = long_prompts(6)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=1)
    cpu = LLM(model, dtype="float32", block_size=16).generate(prompts, params)
    for k in (1, 4):
        with count_triton_calls() as counts:
            llm = LLM(model, dtype="float32", device="cuda", block_size=16, num_scheduler_steps=k)
            assert ops.get_kernel_backend() == "auto"
            gpu = llm.generate(prompts, params)
        assert_triton_ran(counts, model)
        for a, b in zip(cpu, gpu, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, f"k={k}"
            for la, lb, tok in zip(a.outputs[0].logprobs, b.outputs[0].logprobs,
                                   a.outputs[0].token_ids, strict=True):  # fmt: skip
                assert abs(la[tok] - lb[tok]) < 1e-3


def engine_rows(model: str, prompts, outs) -> list[torch.Tensor]:
    """The CPU fp32 engine's log-softmax rows (its top 20 tokens, -inf elsewhere) at every
    position where `outs` generated a token, teacher-forced: one request per prefix."""
    vocab = 512
    llm = LLM(model, dtype="float32", block_size=16)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=20)
    requests, where = [], []
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        gen = o.outputs[0].token_ids
        for j in range(len(gen)):
            requests.append(p + gen[:j])
            where.append((i, len(p) - 1 + j))
    rows = [
        torch.full((len(p) + len(o.outputs[0].token_ids), vocab), float("-inf"))
        for p, o in zip(prompts, outs, strict=True)
    ]
    for (i, pos), out in zip(where, llm.generate(requests, params), strict=True):
        for tok, lp in out.outputs[0].logprobs[0].items():
            rows[i][pos, tok] = lp
    return rows


@pytest.mark.parametrize("model", MODELS)
def test_cuda_bf16_engine_within_bf16_error_of_cpu_fp32(model):
    """bf16 on CUDA (the dtype the README's GPU figures time) against the CPU fp32 engine on the
    GPU engine's own tokens: top-1 agreement up to near-ties and logprob errors within the bf16
    bounds of conftest.check_bf16_logprobs (yardstick: transformers in bf16 on the GPU)."""
    prompts = long_prompts(6)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=1)
    with count_triton_calls() as counts:
        gpu = LLM(model, dtype="bfloat16", device="cuda", block_size=16).generate(prompts, params)
    assert_triton_ran(counts, model)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, gpu, strict=True)]
    yardstick = hf_rows(resolve_model(model), seqs, dtype=torch.bfloat16, device="cuda")
    stats = check_bf16_logprobs(prompts, gpu, engine_rows(model, prompts, gpu), yardstick)
    assert stats["mean"] > 0  # bf16 really ran
