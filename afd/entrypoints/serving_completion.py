"""POST /v1/completions: choices with OpenAI's legacy logprobs, echo (the prompt's text and
logprobs lead each choice), echo-only scoring (max_tokens 0) and vLLM's prompt_logprobs."""

from __future__ import annotations

from typing import Any, ClassVar

from afd.entrypoints.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptLogprob,
)
from afd.entrypoints.serving_base import Generation, OpenAIServing, Shown, top_logprobs
from afd.outputs import CompletionOutput, RequestOutput


class CompletionServing(OpenAIServing):
    """One /v1/completions request (a batch of prompts, n choices each)."""

    id_prefix: ClassVar[str] = "cmpl"
    response_type = CompletionResponse
    chunk_type = CompletionResponse

    def shown(self, c: CompletionOutput) -> Shown:
        # nothing of the completion when only the echoed prompt was asked for (max_tokens 0)
        if self.req.echo_only:
            return "", [], [] if c.logprobs is not None else None
        return super().shown(c)

    def echo_prefix(self, gen: Generation, out: RequestOutput) -> Shown:
        if not self.req.echo:
            return "", [], None
        entries = None
        if self.req.top_logprobs is not None:
            entries = list(out.prompt_logprobs or [None] * len(gen.prompt_ids))
        return self.req.prompt_texts[gen.prompt_index], list(gen.prompt_ids), entries

    def choice(self, gen: Generation, out: RequestOutput, c: CompletionOutput) -> CompletionChoice:
        text, ids, entries = self.echo_prefix(gen, out)
        own_text, own_ids, own_entries = self.shown(c)
        if entries is not None and own_entries is not None:
            entries = entries + list(own_entries)
        else:
            entries = own_entries
        choice = CompletionChoice(
            index=self.choice_index(gen, c),
            text=text + own_text,
            logprobs=self.logprobs(ids + own_ids, entries, 0),
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        if self.req.prompt_logprobs is not None:
            choice.prompt_logprobs = self.prompt_logprobs(out)
        return choice

    def stream_choice(
        self, index: int, text: str, logprobs: Any, finish: str | None, stop: Any
    ) -> CompletionChoice:
        return CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop
        )

    def format_logprobs(
        self, token_ids: list[int], entries: list, k: int, offset: int
    ) -> CompletionLogprobs:
        """OpenAI's legacy completions logprobs; an entry may be None (the first echoed prompt
        token has no logprob)."""
        pairs = list(zip(token_ids, entries, strict=False))
        tokens = [self.token_text(t, e.get(t) if e else None) for t, e in pairs]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[e[t].logprob if e and t in e else None for t, e in pairs],
            top_logprobs=[
                None
                if e is None
                else {self.token_text(i, lp): lp.logprob for i, lp in top_logprobs(e, k)}
                for e in entries
            ],
            text_offset=offsets,
        )

    def prompt_logprobs(self, out: RequestOutput) -> list | None:
        """vLLM's prompt_logprobs: per prompt position {token id: logprob, rank, text}."""
        if out.prompt_logprobs is None:
            return None
        return [
            None
            if e is None
            else {
                str(t): PromptLogprob(
                    logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded_token
                )
                for t, lp in e.items()
            }
            for e in out.prompt_logprobs
        ]
