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
# how a dead end's message starts, so the engine and the HTTP layer know it for what it is
GRAMMAR_DEAD_END = "structured output dead end"


class GrammarDeadEnd(ValueError):
    """The output so far fits its constraint, but no token of the vocabulary continues it and
    the constraint is not complete (a token that is a prefix of an allowed word whose rest is no
    token): the request cannot end conforming, so it fails instead of stopping there."""


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
        self.decoded: list[bytes] = list(self.info.decoded_vocab[:vocab_size])
        self.decoded += [b""] * (vocab_size - len(self.decoded))
        # Valid compact JSON never holds a raw control character (inside strings they must be
        # escaped), but xgrammar 0.2's strings with maxLength/minLength/pattern accept them:
        # JSON grammars also forbid every token that decodes to one.
        self.json_mask = _pack([not any(b < 0x20 for b in t) for t in self.decoded])
        self.in_vocab = _pack([True] * vocab_size)  # the bits of real token ids
        self._utf8_masks: dict[tuple[int, int, int], torch.Tensor] = {}

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
        kind, spec = params.spec
        extra = self.json_mask if kind in ("json", "json_object") else None
        return GrammarState(self, self.compile(kind, spec), extra, kind)

    def utf8_mask(self, state: tuple[int, int, int]) -> torch.Tensor:
        """[1, W]: the tokens whose bytes continue valid UTF-8 from `state` (see _utf8_step).
        xgrammar lets a byte-level vocabulary spell UTF-16 surrogates (ED A0..BF ..), which no
        decoder turns back into the text the grammar matched."""
        mask = self._utf8_masks.get(state)
        if mask is None:
            ok = []
            for token in self.decoded:
                st: tuple[int, int, int] | None = state
                for b in token:
                    st = _utf8_step(st, b)
                    if st is None:
                        break
                ok.append(st is not None)
            mask = self._utf8_masks[state] = _pack(ok)
        return mask

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


def _pack(allowed: list[bool]) -> torch.Tensor:
    """[1, ceil(V/32)] int32 bitmask in xgrammar's layout (bit j of word w is token 32w + j)."""
    words = (len(allowed) + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[: len(allowed)] = torch.tensor(allowed, dtype=torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32)).sum(-1)  # [W], 0 .. 2^32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)[None]


UTF8_START = (0, 0, 0)  # between characters


def _utf8_step(state: tuple[int, int, int], b: int) -> tuple[int, int, int] | None:
    """One byte of strict UTF-8 (no surrogates, no overlong forms, at most U+10FFFF): state is
    (continuation bytes still needed, lowest, highest allowed next byte); None: invalid."""
    need, lo, hi = state
    if need:
        if not lo <= b <= hi:
            return None
        return (need - 1, 0x80, 0xBF) if need > 1 else UTF8_START
    if b < 0x80:
        return UTF8_START
    if 0xC2 <= b <= 0xDF:
        return (1, 0x80, 0xBF)
    if b == 0xE0:
        return (2, 0xA0, 0xBF)
    if b == 0xED:
        return (2, 0x80, 0x9F)
    if 0xE1 <= b <= 0xEF:
        return (2, 0x80, 0xBF)
    if b == 0xF0:
        return (3, 0x90, 0xBF)
    if 0xF1 <= b <= 0xF3:
        return (3, 0x80, 0xBF)
    if b == 0xF4:
        return (3, 0x80, 0x8F)
    return None


class GrammarState:
    """One sequence's matcher, kept in step with the sequence's output tokens: it rolls back or
    advances to whatever output the plan says the sequence has, so a replayed step or a
    recomputed sequence never advances it twice."""

    def __init__(
        self,
        backend: GrammarBackend,
        compiled,
        extra_mask: torch.Tensor | None = None,
        kind: str = "grammar",
    ):
        self.backend = backend
        self.extra_mask = extra_mask  # [1, W] int32 ANDed into every mask
        self.kind = kind
        self.matcher = backend.xgr.GrammarMatcher(
            compiled, override_stop_tokens=backend.stop_token_ids
        )
        self.accepted: list[int] = []
        self.utf8 = [UTF8_START]  # UTF-8 state after 0, 1, ... accepted tokens

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
            del self.utf8[n + 1 :]
        for t in output_ids[n:]:
            if self.terminated:
                break
            if not self.matcher.accept_token(t):
                raise ValueError(f"output token {t} does not fit the structured output grammar")
            self.accepted.append(t)
            state: tuple[int, int, int] | None = self.utf8[-1]
            for b in self.backend.decoded[t] if t < len(self.backend.decoded) else b"":
                state = _utf8_step(state, b) if state is not None else None
            self.utf8.append(state or UTF8_START)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """The tokens allowed next into row `row` of a bitmask (only the end once it ended);
        GrammarDeadEnd when no token is allowed and the grammar has not ended."""
        if self.terminated:
            bitmask[row] = 0
            for t in self.backend.stop_token_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        bitmask[row] &= self.backend.utf8_mask(self.utf8[-1])[0]
        if self.extra_mask is not None:
            bitmask[row] &= self.extra_mask[0]
        if not bool((bitmask[row] & self.backend.in_vocab[0]).any()):
            raise GrammarDeadEnd(self._dead_end_message())

    def _dead_end_message(self) -> str:
        decoded = self.backend.decoded
        text = b"".join(decoded[t] for t in self.accepted if t < len(decoded))
        shown = text.decode("utf-8", "replace")
        shown = shown if len(shown) <= 60 else "..." + shown[-57:]
        return (
            f"{GRAMMAR_DEAD_END}: after {len(self.accepted)} output token(s) ({shown!r}) no "
            f"token of this model's vocabulary continues the structured output {self.kind}, "
            "and it is not complete; the request fails rather than end with text that breaks "
            "the constraint"
        )

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()
