"""Speculative decoding (issue 21): the `--speculative-config` setting and the drafters."""

from __future__ import annotations

from afd.spec.config import (
    MAX_SPECULATIVE_TOKENS,
    SpeculativeConfig,
    as_speculative_config,
    check_speculation,
    parse_speculative_json,
)

__all__ = [
    "MAX_SPECULATIVE_TOKENS",
    "SpeculativeConfig",
    "as_speculative_config",
    "check_speculation",
    "parse_speculative_json",
]
