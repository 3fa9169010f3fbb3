"""Engine settings that `afd serve` takes from vLLM: --seed, --gpu-memory-utilization,
--chat-template, admission by sequences."""

from __future__ import annotations

import asyncio

import pytest

from afd import LLM, SamplingParams
from afd.config import EngineConfig
from afd.scheduler.core import kv_capacity
from afd.tokenizer import load_chat_template


def _texts(llm: LLM, prompts: list[str]) -> list[list[int]]:
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_seed_makes_unseeded_requests_repeat_in_order():
    prompts = ["Hello", "Hello", "Bye"]
    first = _texts(LLM("tiny-qwen3-moe", dtype="float32", seed=7), prompts)
    again = _texts(LLM("tiny-qwen3-moe", dtype="float32", seed=7), prompts)
    other = _texts(LLM("tiny-qwen3-moe", dtype="float32", seed=8), prompts)
    assert first == again  # the same run of requests repeats
    assert first[0] != first[1]  # two requests of one run still differ
    assert first != other
    # a request's own seed wins over the engine's
    own = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=3)
    a = LLM("tiny-qwen3-moe", dtype="float32", seed=7).generate("Hi", own, use_tqdm=False)
    b = LLM("tiny-qwen3-moe", dtype="float32").generate("Hi", own, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_gpu_memory_utilization_sizes_the_kv_cache(monkeypatch, builtin_path):
    from afd.config import ModelConfig
    from afd.loader import checkpoint_numel
    from afd.models import kv_cache_bytes_per_block

    path = builtin_path("tiny-qwen3-moe")
    cfg = ModelConfig.from_pretrained(path)
    experts, rest = checkpoint_numel(path)
    assert experts > 0 and rest > 0
    monkeypatch.setattr(kv_capacity, "available_memory_bytes", lambda device: 1 << 30)
    import torch

    per_block = kv_cache_bytes_per_block(cfg, 16, torch.float32)
    single = EngineConfig.from_flat(gpu_memory_utilization=0.5)
    want = (2**29 - (experts + rest) * 4) // per_block
    assert kv_capacity.num_kv_blocks_for(single, cfg, torch.float32, path) == want
    # 2 attention + 1 prefill workers on one CPU node share the RAM and hold the weights
    # (the experts once on the expert workers and once in the prefill worker)
    afd = EngineConfig.from_flat(
        gpu_memory_utilization=0.5, num_attention_workers=2, num_expert_workers=1,
        num_prefill_workers=1,
    )  # fmt: skip
    kv = (2**29 - (3 * rest + 2 * experts) * 4) // 3
    assert kv_capacity.num_kv_blocks_for(afd, cfg, torch.float32, path) == kv // per_block
    # --num-kv-blocks wins; too little memory is a clear error
    five = EngineConfig.from_flat(num_kv_blocks=5)
    assert kv_capacity.num_kv_blocks_for(five, cfg, torch.float32, path) == 5
    monkeypatch.setattr(kv_capacity, "available_memory_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match="leaves no memory for the KV cache"):
        kv_capacity.num_kv_blocks_for(single, cfg, torch.float32, path)


def test_chat_template_from_a_file_or_text(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    f = tmp_path / "t.jinja"
    f.write_text(template)
    assert load_chat_template(str(f)) == template
    assert load_chat_template(template) == template
    for bad in (str(tmp_path / "missing.jinja"), "{% for %}"):
        with pytest.raises(ValueError, match="--chat-template"):
            load_chat_template(bad)
    llm = LLM("tiny-qwen3-moe", dtype="float32", chat_template=str(f))
    rendered = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "[user] Hi\n"


def test_admission_counts_sequences():
    from afd.engine.async_engine import AsyncEngine, EngineOverloadedError

    engine = AsyncEngine(EngineConfig.from_flat(dtype="float32", max_num_seqs=4), max_queue_len=2)
    try:
        assert engine.sequence_capacity == 6
        ids = engine.tokenizer.encode("Hello")

        async def main():
            slow = SamplingParams(max_tokens=200, ignore_eos=True, n=4)
            first = engine.generate("a", ids, slow)
            out = await first.__anext__()  # admitted: 4 sequences in flight
            assert not out.finished
            with pytest.raises(EngineOverloadedError):  # 4 + 4 > 6
                await engine.generate("b", ids, slow).__anext__()
            small = engine.generate("c", ids, SamplingParams(max_tokens=1, n=2))
            outs = [out async for out in small]  # 4 + 2 fits
            assert outs[-1].finished
            await first.aclose()

        asyncio.run(main())
    finally:
        engine.shutdown()


def test_engine_counts_prefix_cache_tokens_preemptions_and_request_times():
    llm = LLM("tiny-qwen3-moe", dtype="float32", block_size=4)
    prompt = list(range(10, 30))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    llm.generate([prompt], params, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["prefix_cache_queries_total"] == 2 * len(prompt)
    assert stats["prefix_cache_hits_total"] == 16  # the second run finds 4 full blocks
    assert stats["num_preemptions_total"] == 0
    t = out.metrics
    assert t.arrival_time <= t.first_scheduled_time <= t.first_token_time <= t.finished_time
