"""Settings declared once: a dataclass field's metadata (`option`) says how it is given as a
command-line flag (name, vLLM's aliases, help, choices, parser) and so also under which flat
keywords `LLM(...)` takes it; the checks below are what the parts' `__post_init__` share.
Nothing here knows argparse (afd.entrypoints.flags builds parsers from this)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_SAME = object()  # Flag.default: the field's own default


@dataclass(frozen=True)
class Flag:
    """How one field is given on the command line."""

    help: str
    name: str | None = None  # default: --field-name
    aliases: tuple[str, ...] = ()  # other spellings of the same flag (vLLM's names)
    # a sequence, or a function giving it (choices registered at run time, e.g. transports)
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    parse: Callable[[str], Any] | None = None  # text -> value; default: from the annotation
    negatable: bool = False  # a bool with --name and --no-name
    off: tuple[str, str] | None = None  # (another flag that turns a bool off, its help)
    flag_default: Any = _SAME  # the flag's default when not the field's (a function: called)
    to_field: Callable[[Any], Any] | None = None  # the flag's value -> the field's
    nargs: str | None = None
    metavar: str | None = None
    scope: str = "engine"  # which commands have the flag (see add_flags' `scopes`)

    def flag_name(self, field_name: str) -> str:
        return self.name or "--" + field_name.replace("_", "-")

    def dest(self, field_name: str) -> str:
        """The argparse destination (and --config YAML key): the flag's name."""
        return self.flag_name(field_name).removeprefix("--").replace("-", "_")

    def default(self, field: dataclasses.Field) -> Any:
        """The flag's default (the field's unless flag_default says otherwise)."""
        if self.flag_default is _SAME:
            return field.default
        return self.flag_default() if callable(self.flag_default) else self.flag_default


def option(default: Any, help: str | None = None, **flag: Any) -> Any:
    """A dataclass field with a default; with `help`, also a flag (Flag's keywords)."""
    metadata = {"flag": Flag(help, **flag)} if help is not None else {}
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get("flag")


def keywords(cls: type) -> dict[str, str]:
    """Flat keyword -> field name of a settings dataclass: each field under its own name and
    under its flag aliases (`num_gpu_blocks_override` for num_kv_blocks)."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.name
        flag = flag_of(f)
        for alias in flag.aliases if flag else ():
            out[alias.removeprefix("--").replace("-", "_")] = f.name
    return out


def choices_of(flag: Flag) -> Sequence[str] | None:
    return flag.choices() if callable(flag.choices) else flag.choices


def integer(text: str) -> int:
    """A flag's text as an int; ValueError in words a user reads."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def number(text: str) -> float:
    """A flag's text as a float (nan and inf included: the checks refuse those)."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


# --- checks shared by the parts' __post_init__ (ValueError naming the flag to fix) ---


def check_int(flag: str, value: Any, lo: int, hi: int = 2**31 - 1) -> None:
    """An integer in [lo, hi] (not a bool, not a float)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{flag} must be an integer, got {value!r:.40}")
    if value < lo:
        raise ValueError(f"{flag} must be at least {lo}")
    if value > hi:
        raise ValueError(f"{flag} must be at most {hi}")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_seconds(flag: str, value: Any, hi: float = 1e9) -> None:
    """A positive, finite number of seconds below `hi`."""
    if not is_number(value) or not 0 < value < hi:  # also NaN and inf
        raise ValueError(f"{flag} must be a positive number of seconds")


def check_text(flag: str, value: Any) -> None:
    """A non-empty string that is valid UTF-8 (no lone surrogates from a bad argv)."""
    if not isinstance(value, str):
        raise ValueError(f"{flag} must be a string, got {value!r:.40}")
    if not value.strip():
        raise ValueError(f"{flag} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{flag} {value!r:.60} is not valid UTF-8") from None


def check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    """`value` is one of `choices`; else "unknown WHAT 'value'; choose from ..."."""
    if value not in choices:
        raise ValueError(f"unknown {what} {str(value)[:40]!r}; choose from {', '.join(choices)}")


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)
