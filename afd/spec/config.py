"""`--speculative-config '<json>'` / `LLM(speculative_config=...)`: vLLM's keys, validated
once here (torch-free: the launcher parses flags before importing torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "mtp")
# More draft tokens than this only multiply the rejected rows: vLLM's own examples stay <= 10.
MAX_SPECULATIVE_TOKENS = 16
MAX_LOOKUP = 64  # n-gram lengths beyond this never match in practice and cost a scan each


def _check_count(key: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"speculative_config: {key} must be an integer, got {value!r:.40}")
    if not lo <= value <= hi:
        raise ValueError(f"speculative_config: {key} must be in [{lo}, {hi}], got {value}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Which drafter proposes how many tokens per step; n-gram lookup lengths
    (prompt_lookup_min..prompt_lookup_max tokens of prompt + output matched)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config: unknown method {self.method!r:.40} "
                f"(choose from {', '.join(METHODS)})"
            )
        k = self.num_speculative_tokens
        _check_count("num_speculative_tokens", k, 1, MAX_SPECULATIVE_TOKENS)
        lookup = (self.prompt_lookup_max, self.prompt_lookup_min)
        if self.method == "mtp":
            if lookup != (None, None):
                raise ValueError("speculative_config: prompt_lookup_* apply to method ngram only")
            return
        # as vLLM: one given sets the other; neither given: match 1..3 tokens
        hi, lo = lookup if lookup != (None, None) else (3, 1)
        hi, lo = (lo if hi is None else hi), (hi if lo is None else lo)
        _check_count("prompt_lookup_max", hi, 1, MAX_LOOKUP)
        _check_count("prompt_lookup_min", lo, 1, MAX_LOOKUP)
        if lo > hi:
            raise ValueError(
                f"speculative_config: prompt_lookup_min ({lo}) > prompt_lookup_max ({hi})"
            )
        object.__setattr__(self, "prompt_lookup_max", hi)
        object.__setattr__(self, "prompt_lookup_min", lo)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's keys; an unknown or missing key is a ValueError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}")
        for key in ("method", "num_speculative_tokens"):
            if key not in values:
                raise ValueError(f"speculative_config: {key} is required")
        return cls(**values)


def as_speculative_config(value: Any) -> SpeculativeConfig | None:
    """None, a SpeculativeConfig, or its dict (as LLM(...) and a decoded record give it)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, dict):
        return SpeculativeConfig.from_dict(value)
    raise ValueError(f"speculative_config must be a dict or None, got {type(value).__name__}")


def parse_speculative_json(text: str) -> SpeculativeConfig | None:
    """The --speculative-config flag's JSON object ("null" or "" turns speculation off)."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--speculative-config is not JSON: {e.msg} at column {e.colno}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError("--speculative-config must be a JSON object")
    return as_speculative_config(value)


def check_speculation(spec: SpeculativeConfig | None, model_config: Any) -> None:
    """Start-up check against the checkpoint: n-gram drafting runs in every topology; MTP needs
    the checkpoint's MTP layer (`num_nextn_predict_layers`), and its drafter is not wired into
    the engine yet, so it is refused here with that reason rather than accepted and ignored."""
    if spec is None or spec.method == "ngram":
        return
    if spec.method == "mtp":
        hf = getattr(model_config, "hf", None)
        layers = getattr(hf, "num_nextn_predict_layers", None) or 0
        if layers < 1:
            raise ValueError(
                "speculative_config: method mtp needs a checkpoint with an MTP layer "
                "(config num_nextn_predict_layers >= 1); this one has none"
            )
        # hook: the MTP drafter (afd/models/mtp.py, i21-mtp) plugs in here
    raise ValueError(
        "speculative_config: method mtp is validated, but its drafter is not built into the "
        "engine yet (issue 21); method ngram is"
    )
