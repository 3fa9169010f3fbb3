"""The offline Python API, shaped like vLLM's `LLM`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from afd.config import EngineConfig
from afd.engine.llm_engine import LLMEngine
from afd.outputs import RequestOutput
from afd.sampling.params import SamplingParams
from afd.tokenizer import Tokenizer

# A prompt: text, token ids, {"prompt": text} or {"prompt_token_ids": ids} (vLLM's TextPrompt
# and TokensPrompt)
PromptType = str | list[int] | dict[str, Any]


def _is_single_prompt(prompts: Any) -> bool:
    if isinstance(prompts, str | dict):
        return True
    return isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)


def _prompt_input(prompt: Any) -> str | list[int]:
    """What LLMEngine.add_request takes, from any PromptType; ValueError for anything else."""
    if isinstance(prompt, dict):
        keys = set(prompt)
        if keys == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
        if keys == {"prompt_token_ids"} and isinstance(prompt["prompt_token_ids"], list):
            ids = prompt["prompt_token_ids"]
            if all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                return ids
        raise ValueError(
            "a dict prompt must be {'prompt': str} or {'prompt_token_ids': list[int]}, got keys "
            f"{sorted(map(str, keys))}"
        )
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return prompt
    raise ValueError(
        f"a prompt must be a string, a list of token ids or a dict, got {prompt!r:.60}"
    )


def _is_conversation(messages: Any) -> bool:
    return isinstance(messages, list) and all(isinstance(m, dict) for m in messages)


class LLM:
    """`LLM(model=...).generate(prompts, sampling_params)`; keywords are vLLM's flat names
    (EngineConfig.from_flat's: block_size, num_gpu_blocks_override, num_expert_workers, ...)."""

    def __init__(self, model: str = "tiny-qwen3-moe", **kwargs):
        unknown = set(kwargs) - EngineConfig.keywords()
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig.from_flat(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (encode, decode, apply_chat_template)."""
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run prompts (text, token ids, or vLLM-style dicts) to completion; outputs in prompt
        order. `use_tqdm` shows a progress bar on stderr."""
        if _is_single_prompt(prompts):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a prompt or a list of prompts, got {prompts!r:.60}")
        inputs = [_prompt_input(p) for p in prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(inputs)
        if len(params) != len(inputs):
            raise ValueError("give one SamplingParams or one per prompt")
        ids: list[str] = []
        try:
            for p, sp in zip(inputs, params, strict=True):
                ids.append(self.engine.add_request(p, sp, stream=False, whole=True))
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        done: dict[str, RequestOutput] = {}
        start = time.monotonic()
        out_tokens = 0
        with tqdm(
            total=len(ids), desc="Processed prompts", unit="prompt", disable=not use_tqdm
        ) as bar:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = max(time.monotonic() - start, 1e-9)
                        bar.set_postfix_str(f"output {out_tokens / elapsed:.1f} toks/s", False)
                        bar.update(1)
        return [done[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, through
        the model's chat template; one output per conversation, as vLLM's LLM.chat."""
        conversations = [messages] if _is_conversation(messages) else list(messages)
        if not conversations or not all(_is_conversation(c) and c for c in conversations):
            raise ValueError("messages must be a list of message dicts, or a list of such lists")
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt
            )
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
