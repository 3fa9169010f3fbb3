"""The disaggregated cluster on one GPU (`--device cuda --gpus-per-node 1`: every worker shares
cuda:0, the world runs over gloo, the data plane through host memory) behind the official openai
client, against the CPU engine's greedy text. Skipped without a GPU (where only the GPU check's
refusal is checked); scripts/gpu_check.sh runs it with TRITON_INTERPRET=0."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import torch
from conftest import launched

from afd import LLM, SamplingParams

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["Hello there", "The quick brown fox", "1, 2, 3,"]
MAX_TOKENS = 12


def _cpu_text(model: str) -> list[str]:
    llm = LLM(model, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        return [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    finally:
        llm.shutdown()


@needs_gpu
@pytest.mark.parametrize(
    "model,p,a,f", [("tiny-qwen3-moe", 1, 1, 1), ("tiny-deepseek-v3", 1, 2, 2)]
)
def test_cluster_on_one_gpu_answers_the_openai_client(model, p, a, f):
    import openai

    want = _cpu_text(model)
    args = ["--model", model, "--device", "cuda", "--gpus-per-node", "1", "--dtype", "float32",
            "--num-prefill-workers", str(p), "--num-attention-workers", str(a),
            "--num-expert-workers", str(f), "--num-micro-batches", "2"]  # fmt: skip
    with launched(*args) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        for prompt, text in zip(PROMPTS, want, strict=True):
            r = client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert r.choices[0].text == text, (prompt, r.choices[0].text, text)
            assert r.usage.completion_tokens == MAX_TOKENS
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert "afd:dispatch_bytes_total" in metrics


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without")
def test_gpu_check_script_refuses_without_a_gpu():
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.sh")
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # parses
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU is visible" in r.stderr, r.stderr
