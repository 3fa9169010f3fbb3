"""POST /v1/chat/completions: assistant messages, chat logprobs (content[] with bytes), and a
stream that opens with the assistant role."""

from __future__ import annotations

from typing import Any, ClassVar

from afd.entrypoints.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    ChatStreamChoice,
    ChatTopLogprob,
    DeltaMessage,
)
from afd.entrypoints.serving_base import Generation, OpenAIServing, top_logprobs
from afd.outputs import CompletionOutput, Logprob, RequestOutput


class ChatServing(OpenAIServing):
    """One /v1/chat/completions request (one prompt, n choices)."""

    id_prefix: ClassVar[str] = "chatcmpl"
    response_type = ChatCompletionResponse
    chunk_type = ChatCompletionChunk

    def stream_start(self) -> list[str]:
        role = DeltaMessage(role="assistant", content="")
        choices = [
            ChatStreamChoice(index=i, delta=role, logprobs=None, finish_reason=None)
            for i in range(self.n)
        ]
        return [self.chunk(choices)]

    def choice(self, gen: Generation, out: RequestOutput, c: CompletionOutput) -> ChatChoice:
        return ChatChoice(
            index=self.choice_index(gen, c),
            message=ChatMessage(content=c.text),
            logprobs=self.logprobs(c.token_ids, c.logprobs, 0),
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )

    def stream_choice(
        self, index: int, text: str, logprobs: Any, finish: str | None, stop: Any
    ) -> ChatStreamChoice:
        return ChatStreamChoice(
            index=index,
            delta=DeltaMessage(content=text) if text else DeltaMessage(),
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=stop,
        )

    def format_logprobs(
        self, token_ids: list[int], entries: list, k: int, offset: int
    ) -> ChatLogprobs:
        """content[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""

        def item(token_id: int, lp: Logprob | None) -> dict[str, Any]:
            text = self.token_text(token_id, lp)
            return {
                "token": text,
                "logprob": lp.logprob if lp is not None else -9999.0,
                "bytes": list(text.encode("utf-8")),
            }

        return ChatLogprobs(
            content=[
                ChatLogprobToken(
                    **item(t, e.get(t)),
                    top_logprobs=[ChatTopLogprob(**item(i, lp)) for i, lp in top_logprobs(e, k)],
                )
                for t, e in zip(token_ids, entries, strict=False)
            ]
        )
