"""Command-line flags made from the settings' field metadata (afd.options): `add_flags` adds a
part's flags to a parser, `flag_values` reads them back; `add_engine_args` and
`engine_config_from_args` do it for every part of an EngineConfig. The parser classes with
one-line errors live here too, so that cli and launch both build on this module."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

from afd.config import PARTS, WORKER_POOLS, EngineConfig, resolve_worker_counts
from afd.options import Flag, choices_of, flag_of, integer, number


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default (unless it says what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" not in text
            and "default:" not in text
            and action.default not in (None, argparse.SUPPRESS)
            and action.option_strings
            and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`afd: error: ...`, exit code 2) instead of the usage
    block; `--help` still prints everything."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(message)


_PARSERS = {int: integer, float: number}


def _argparse_type(parse):
    """argparse shows an ArgumentTypeError's own words (`argument --seed: '1e3' is not an
    integer`); a ValueError it would replace with `invalid value`."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; `list[str] | None` -> list[str]."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _flag_kwargs(flag: Flag, field: dataclasses.Field, hint: Any, context: dict) -> dict:
    text = flag.help.format(**context) if "{" in flag.help else flag.help
    kwargs: dict[str, Any] = dict(
        dest=flag.dest(field.name), default=flag.default(field), help=text
    )
    base = _base_type(hint)
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if flag.negatable else "store_true"
        return kwargs
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]
    if flag.nargs:
        kwargs["nargs"] = flag.nargs
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    choices = choices_of(flag)
    if choices is not None:
        kwargs["choices"] = list(choices)
    parse = flag.parse or _PARSERS.get(base)
    if parse is not None:
        kwargs["type"] = _argparse_type(parse)
    return kwargs


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    scopes: Iterable[str] = ("engine",),
    context: dict | None = None,
    overrides: dict[str, dict] | None = None,
    only: Iterable[str] | None = None,
) -> None:
    """Add the flags of settings dataclass `cls` whose scope is in `scopes` (`only`: just
    these fields); `overrides` replaces Flag attributes per field (another command's help or
    default), `context` fills the {names} of help templates."""
    hints = typing.get_type_hints(cls)
    scopes, only = set(scopes), None if only is None else set(only)
    for field in dataclasses.fields(cls):
        flag = flag_of(field)
        if flag is None or (only is None and flag.scope not in scopes):
            continue
        if only is not None and field.name not in only:
            continue
        if overrides and field.name in overrides:
            flag = dataclasses.replace(flag, **overrides[field.name])
        kwargs = _flag_kwargs(flag, field, hints[field.name], context or {})
        parser.add_argument(flag.flag_name(field.name), *flag.aliases, **kwargs)
        if flag.off:
            parser.add_argument(
                flag.off[0], dest=kwargs["dest"], action="store_false", help=flag.off[1]
            )


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The field values of `cls` that `args` has flags for (fields without one keep their
    defaults)."""
    out = {}
    for field in dataclasses.fields(cls):
        flag = flag_of(field)
        if flag is None or not hasattr(args, flag.dest(field.name)):
            continue
        value = getattr(args, flag.dest(field.name))
        out[field.name] = flag.to_field(value) if flag.to_field else value
    return out


PART_TITLES = {
    "source": "model",
    "cache": "KV cache",
    "limits": "scheduling",
    "cluster": "cluster",
    "failure": "failures",
}


def add_engine_args(p: argparse.ArgumentParser, workers: int = 0, nodes: bool = False) -> None:
    """Flags of every EngineConfig part (names as in vLLM / SGLang), one group per part;
    `workers` is the size of each pool not given (afd serve: 1P1A1F, generate: one process),
    `nodes` adds the multi-node flags (--nnodes, --dist-init-addr, --node-roles)."""
    # None = not given: engine_config_from_args fills it from the command's worker_defaults
    p.set_defaults(worker_defaults=dict.fromkeys(WORKER_POOLS, workers))
    colocated = "; 0 when --num-attention-workers or --num-expert-workers is 0" if workers else ""
    context = {"workers": workers, "colocated": colocated}
    scopes = ("engine", "nodes") if nodes else ("engine",)
    for part, cls in PARTS.items():
        group = p.add_argument_group(PART_TITLES[part])
        add_flags(group, cls, scopes, context)
        if part == "source":
            group.add_argument(
                "--trust-remote-code",
                action="store_true",
                help="accepted for vLLM compatibility; AFD never executes a model's own code",
            )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of a command's parsed flags (pools not given resolved by the
    command's worker_defaults); ValueError naming the flag for a bad value."""
    values: dict[str, Any] = {}
    for cls in PARTS.values():
        values.update(flag_values(cls, args))
    given = {name: values.get(name) for name in WORKER_POOLS}
    values.update(resolve_worker_counts(given, args.worker_defaults))
    return EngineConfig.from_flat(**values)


def engine_argv(config: EngineConfig, scopes: Iterable[str] = ("engine",)) -> list[str]:
    """The flags that give `config` back (every setting with a flag in `scopes` and a value),
    for starting `afd serve` from another command."""
    scopes = set(scopes)
    argv: list[str] = []
    for part, cls in PARTS.items():
        values = getattr(config, part)
        for field in dataclasses.fields(cls):
            flag, value = flag_of(field), getattr(values, field.name)
            if flag is None or flag.scope not in scopes or flag.to_field or value is None:
                continue
            name = flag.flag_name(field.name)
            if isinstance(value, bool):
                if value or flag.negatable:
                    argv.append(name if value else "--no-" + name.removeprefix("--"))
            else:
                argv += [name, str(value)]
    return argv
