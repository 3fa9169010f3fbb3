"""Structured outputs through xgrammar: each distinct grammar is compiled once per process, and a
per-sequence matcher turns it into a token mask that the sampler applies on whichever worker
samples. xgrammar is imported on first use, so requests without structured outputs never pay
for it."""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from afd.sampling.params import StructuredOutputsParams

# JSON objects of any shape for response_format json_object
_ANY_OBJECT_SCHEMA = '{"type": "object"}'
_COMPILED_CACHE_SIZE = 256


class GrammarBackend:
    """xgrammar's view of one tokenizer and the vocabulary width of the model's logits."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgr
        hf = HFTokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        stop = sorted(set(stop_token_ids))
        if not stop:
            raise ValueError("structured outputs need the model's end-of-sequence token ids")
        # xgrammar reads the vocabulary type (byte-level, byte-fallback, raw) and the prefix
        # space from the tokenizer's own description...
        detected = xgr.TokenizerInfo.from_huggingface(
            PreTrainedTokenizerFast(tokenizer_object=hf),
            vocab_size=vocab_size,
            stop_token_ids=stop,
        )
        # ...but would take special tokens such as <|im_start|> for the literal text of their
        # name; an empty encoding marks them special, so no grammar can emit them as text.
        vocab = [""] * vocab_size
        for text, i in hf.get_vocab(with_added_tokens=True).items():
            if i < vocab_size:
                vocab[i] = text
        for i, added in hf.get_added_tokens_decoder().items():
            if added.special and i < vocab_size:
                vocab[i] = ""
        self.info = xgr.TokenizerInfo(
            vocab,
            detected.vocab_type,
            vocab_size=vocab_size,
            stop_token_ids=stop,
            add_prefix_space=detected.add_prefix_space,
        )
        self.vocab_size = vocab_size
        self.stop_token_ids = stop
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, kind: str, spec: str):
        """The compiled grammar of one structured-output spec (cached, LRU); ValueError if the
        spec is not one xgrammar accepts."""
        key = (kind, spec)
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
                return hit
        try:
            compiled = self._compile(kind, spec)
        except (RuntimeError, ValueError, TypeError) as e:
            # xgrammar prefixes its C++ source location: keep the message only
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message = message.split(": ", 1)[1] if message.startswith("[") else message
            raise ValueError(f"invalid structured output {kind}: {message}") from None
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > _COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, kind: str, spec: str):
        c = self.compiler
        if kind == "json":
            # compact JSON: no free whitespace, so a bounded schema bounds the output
            return c.compile_json_schema(spec, any_whitespace=False)
        if kind == "json_object":
            return c.compile_json_schema(_ANY_OBJECT_SCHEMA, any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            # EBNF string literals take JSON's escapes
            options = json.loads(spec)
            return c.compile_grammar(
                "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
            )
        if kind == "grammar":
            return c.compile_grammar(spec)
        raise ValueError(f"unknown kind {kind!r}")

    def matcher(self, params: StructuredOutputsParams) -> GrammarState:
        return GrammarState(self, self.compile(*params.spec))

    def new_bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """logits [R, V] in place: tokens the bitmask [R, ceil(V/32)] forbids become -inf."""
        self.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))


@functools.lru_cache(maxsize=4)
def grammar_backend(tokenizer_dir: str, vocab_size: int, stop: tuple[int, ...]) -> GrammarBackend:
    """One backend per tokenizer and vocabulary in a process (the engine and its workers)."""
    return GrammarBackend(tokenizer_dir, vocab_size, list(stop))


def _bit(i: int) -> int:
    # bit i of an int32 word (bit 31 is the sign bit)
    return 1 << i if i < 31 else -(1 << 31)


class GrammarState:
    """One sequence's matcher, kept in step with the sequence's output tokens: it rolls back or
    advances to whatever output the plan says the sequence has, so a replayed step or a
    recomputed sequence never advances it twice."""

    def __init__(self, backend: GrammarBackend, compiled):
        self.backend = backend
        self.matcher = backend.xgr.GrammarMatcher(
            compiled, override_stop_tokens=backend.stop_token_ids
        )
        self.accepted: list[int] = []

    def sync(self, output_ids: list[int]) -> None:
        """Make the matcher have accepted exactly `output_ids`; ValueError if they break the
        grammar (they were not sampled under it)."""
        if self.terminated and output_ids[: len(self.accepted)] == self.accepted:
            return  # tokens after the grammar's end are dropped by the engine anyway
        n = len(self.accepted)
        if n > len(output_ids) or output_ids[:n] != self.accepted:
            n = 0
            while n < min(len(self.accepted), len(output_ids)) and (
                self.accepted[n] == output_ids[n]
            ):
                n += 1
            self.matcher.rollback(len(self.accepted) - n)
            del self.accepted[n:]
        for t in output_ids[n:]:
            if self.terminated:
                break
            if not self.matcher.accept_token(t):
                raise ValueError(f"output token {t} does not fit the structured output grammar")
            self.accepted.append(t)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """The tokens allowed next into row `row` of a bitmask (only the end once it ended)."""
        if self.terminated:
            bitmask[row] = 0
            for t in self.backend.stop_token_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()
