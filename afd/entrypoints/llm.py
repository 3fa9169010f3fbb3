"""The offline Python API, shaped like vLLM's `LLM`."""

from __future__ import annotations

from collections.abc import Sequence

from afd.config import EngineConfig
from afd.engine.llm_engine import LLMEngine
from afd.outputs import RequestOutput
from afd.sampling.params import SamplingParams


class LLM:
    """`LLM(model=...).generate(prompts, sampling_params)`; keywords are EngineConfig fields."""

    def __init__(self, model: str = "tiny-qwen3-moe", **kwargs):
        unknown = set(kwargs) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        ids = [
            self.engine.add_request(p, sp, stream=False)
            for p, sp in zip(prompts, params, strict=True)
        ]
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [done[rid] for rid in ids]

    def chat(
        self, messages: list[dict], sampling_params: SamplingParams | None = None
    ) -> RequestOutput:
        """One chat conversation through the model's chat template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.generate([ids], sampling_params)[0]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
