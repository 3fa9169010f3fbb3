"""Sampling settings of one request, with vLLM's names and defaults."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

# Bounds on what a client may ask for: each field of a request travels with every step plan and
# is compiled or applied on a worker, so none may be unbounded.
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_LOGPROBS = 20
MAX_SPEC_CHARS = 100_000  # a JSON schema, regex or grammar, as text
MAX_CHOICES = 1024
# Temperatures below this sample greedily (as in vLLM): dividing logits by a smaller one
# overflows float32 and makes the probabilities NaN, and the distribution is argmax anyway.
MIN_TEMPERATURE = 1e-5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any, lo: int = INT64_MIN, hi: int = INT64_MAX) -> bool:
    # ints travel to workers in msgpack, which holds 64 bits; bool is not a number here
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


@dataclass
class StructuredOutputsParams:
    """One constraint on the output text (vLLM's StructuredOutputsParams): exactly one of a JSON
    schema, any JSON object, a regular expression, a choice of strings or an EBNF grammar."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object; got {', '.join(given) or 'none'}"
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except (ValueError, RecursionError) as e:
                    raise ValueError(f"structured_outputs json is not valid JSON: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs json must be a JSON schema object")
            try:
                # key order is kept: it is the order in which the output lists the properties
                self.json = json.dumps(schema, ensure_ascii=False)
            except (TypeError, ValueError, RecursionError) as e:
                raise ValueError(f"structured_outputs json cannot be serialised: {e}") from None
        if self.json_object not in (None, True):
            raise ValueError("structured_outputs json_object must be true")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs {name} must be a non-empty string")
        if self.choice is not None:
            if (
                not isinstance(self.choice, list | tuple)
                or not self.choice
                or not all(isinstance(c, str) and c for c in self.choice)
            ):
                raise ValueError("structured_outputs choice must be a non-empty list of strings")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs choice has more than {MAX_CHOICES} items")
            self.choice = list(self.choice)
        kind, spec = self.spec
        if len(spec) > MAX_SPEC_CHARS:
            raise ValueError(
                f"structured_outputs {kind} is {len(spec)} characters long; "
                f"at most {MAX_SPEC_CHARS} are allowed"
            )
        try:
            spec.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"structured_outputs {kind} is not valid UTF-8 text") from None

    @property
    def spec(self) -> tuple[str, str]:
        """(kind, text): what travels in a step plan and keys the compiled-grammar cache."""
        if self.json is not None:
            return "json", self.json
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice, ensure_ascii=False)
        if self.grammar is not None:
            return "grammar", self.grammar
        return "json_object", ""

    @classmethod
    def from_spec(cls, kind: str, text: str) -> StructuredOutputsParams:
        """Inverse of `spec`."""
        if kind == "json_object":
            return cls(json_object=True)
        if kind == "choice":
            return cls(choice=json.loads(text))
        if kind not in ("json", "regex", "grammar"):
            raise ValueError(f"unknown structured output kind {kind!r}")
        return cls(**{kind: text})


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; invalid values raise ValueError."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables; values at or above the vocabulary size do too
    min_p: float = 0.0
    seed: int | None = None  # any signed 64-bit integer
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's and the top-k
    # penalties as in vLLM: presence/frequency count output tokens, repetition prompt and output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, -100..100
    min_tokens: int = 0  # EOS and stop_token_ids are suppressed until this many tokens
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's and the top-k
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._normalise_fields()
        for ok, message in self._range_checks() + self._combination_checks():
            if not ok:
                raise ValueError(message)

    def _normalise_fields(self) -> None:
        """Accepted spellings to one form: stop as a list, top_k -1 as 0, dicts to records."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        ids = list(self.stop_token_ids or [])
        if not all(_is_int(t) for t in ids):
            raise ValueError("stop_token_ids must be 64-bit integers")
        self.stop_token_ids = ids
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.logit_bias = self._normalise_logit_bias(self.logit_bias)

    def _range_checks(self) -> list[tuple[bool, str]]:
        """(valid, message) for each field's own range."""
        return [
            (_is_int(self.n, 1), f"n must be at least 1, got {self.n}"),
            (
                _is_number(self.temperature) and self.temperature >= 0,
                f"temperature must be a finite number >= 0, got {self.temperature}",
            ),
            (
                _is_number(self.top_p) and 0 < self.top_p <= 1,
                f"top_p must be in (0, 1], got {self.top_p}",
            ),
            (_is_int(self.top_k, 0), f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (
                _is_number(self.min_p) and 0 <= self.min_p <= 1,
                f"min_p must be in [0, 1], got {self.min_p}",
            ),
            (
                self.seed is None or _is_int(self.seed),
                f"seed must be a signed 64-bit integer, got {self.seed}",
            ),
            (
                self.max_tokens is None or _is_int(self.max_tokens, 1),
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (
                self.logprobs is None or _is_int(self.logprobs, 0, MAX_LOGPROBS),
                f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must not be empty"),
            (
                _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}",
            ),
            (
                _is_int(self.min_tokens) and self.min_tokens >= 0,
                f"min_tokens must be >= 0, got {self.min_tokens}",
            ),
        ]

    def _combination_checks(self) -> list[tuple[bool, str]]:
        """(valid, message) for rules that relate fields, then type checks."""
        return [
            (
                self.max_tokens is None
                or not _is_int(self.min_tokens)
                or self.min_tokens <= self.max_tokens,
                f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}",
            ),
            (
                isinstance(self.skip_special_tokens, bool),
                f"skip_special_tokens must be true or false, got {self.skip_special_tokens!r}",
            ),
            (
                isinstance(self.include_stop_str_in_output, bool),
                "include_stop_str_in_output must be true or false, "
                f"got {self.include_stop_str_in_output!r}",
            ),
            (
                self.prompt_logprobs is None
                or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
                f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}",
            ),
            (
                self.structured_outputs is None
                or isinstance(self.structured_outputs, StructuredOutputsParams),
                "structured_outputs must be a StructuredOutputsParams",
            ),
            (
                self.structured_outputs is None or not self.ignore_eos,
                "structured_outputs cannot be combined with ignore_eos: the grammar ends the "
                "output with an end-of-sequence token",
            ),
        ]

    @staticmethod
    def _normalise_logit_bias(bias: Any) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError("logit_bias must map token ids to numbers")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(
                f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed"
            )
        out: dict[int, float] = {}
        for key, value in bias.items():
            token = key
            if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12:
                token = int(key)
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
            if not _is_number(value) or not -100 <= value <= 100:
                raise ValueError(
                    f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key!r}"
                )
            out[token] = float(value)
        return out or None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @cached_property
    def needs_history(self) -> bool:
        """The sampler needs this sequence's tokens so far (penalties, structured outputs)."""
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
            or self.structured_outputs is not None
        )

    @cached_property
    def processes_logits(self) -> bool:
        """The sampler changes this request's logits before picking (bias, penalties, masks)."""
        return self.needs_history or self.logit_bias is not None or self.min_tokens > 0

    def max_token_id(self) -> int:
        """The largest token id the request names (-1 if none): checked against the vocabulary."""
        ids = [*self.stop_token_ids, *(self.logit_bias or ())]
        return max(ids, default=-1)

    @cached_property
    def wire(self) -> dict[str, Any]:
        """What a sampler on a worker needs, as msgpack types; newer fields only when set, so
        plans for ordinary requests stay small."""
        d: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "logprobs": self.logprobs,
        }
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                d[name] = getattr(self, name)
        if self.repetition_penalty != 1:
            d["repetition_penalty"] = self.repetition_penalty
        if self.logit_bias:
            d["logit_bias"] = [[t, b] for t, b in sorted(self.logit_bias.items())]
        if self.min_tokens:
            d["min_tokens"] = self.min_tokens
            d["stop_token_ids"] = list(self.stop_token_ids)
            d["ignore_eos"] = self.ignore_eos
        if self.prompt_logprobs is not None:
            d["prompt_logprobs"] = self.prompt_logprobs
        if self.structured_outputs is not None:
            d["structured_outputs"] = list(self.structured_outputs.spec)
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SamplingParams:
        """Inverse of `wire` (per-sequence keys such as index are ignored); ValueError if bad."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "logit_bias" in values:
            values["logit_bias"] = {int(t): b for t, b in values["logit_bias"]}
        if "structured_outputs" in values:
            values["structured_outputs"] = StructuredOutputsParams.from_spec(
                *values["structured_outputs"]
            )
        values.setdefault("max_tokens", None)
        return cls(**values)
