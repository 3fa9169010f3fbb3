"""Completions from a real engine whose tokenizer is WordPiece (--tokenizer), through the HTTP
app: the text, streamed or not, and its echo are what transformers' decode of prompt + output
gives, as vLLM's are."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from test_tokenizer import train_wordpiece

from afd.config import EngineConfig
from afd.engine.async_engine import AsyncEngine
from afd.entrypoints.server import build_app
from afd.sampling.params import SamplingParams

MODEL = "tiny-qwen3-moe"  # vocabulary 512, the WordPiece tokenizer's size


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    path = tmp_path_factory.mktemp("wordpiece")
    train_wordpiece(path, 512)
    return path


def _generate(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    async def run() -> list[int]:
        outs = [out async for out in engine.generate("ids", prompt, params)]
        return list(outs[-1].outputs[0].token_ids)

    return asyncio.run(run())


def test_completion_and_echo_text_equal_transformers_decode(wordpiece):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(wordpiece)
    engine = AsyncEngine(
        EngineConfig.from_flat(model=MODEL, dtype="float32", tokenizer=str(wordpiece))
    )
    try:
        prompts = [hf.encode(t) for t in ("w200", "the quick brown fox", "paris is the")]
        body = {"model": MODEL, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        ids = [_generate(engine, p, params) for p in prompts]
        spaced = 0  # completions that start with a space (the first word's, after the prompt)
        with TestClient(build_app(engine)) as client:
            for prompt, out in zip(prompts, ids, strict=True):
                whole = hf.decode(prompt + out, skip_special_tokens=True)
                completion = whole[len(hf.decode(prompt, skip_special_tokens=True)) :]
                spaced += completion.startswith(" ")
                r = client.post("/v1/completions", json={**body, "prompt": prompt}).json()
                assert r["choices"][0]["text"] == completion, (prompt, out)
                r = client.post("/v1/completions", json={**body, "prompt": prompt, "echo": True})
                assert r.json()["choices"][0]["text"] == whole
                stream = {**body, "prompt": prompt, "echo": True, "stream": True}
                with client.stream("POST", "/v1/completions", json=stream) as r:
                    chunks = [json.loads(line[6:]) for line in r.iter_lines()
                              if line.startswith("data: {")]  # fmt: skip
                assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
        assert spaced
    finally:
        engine.shutdown()
