"""The `afd` command line: `afd serve MODEL` and vLLM's flag names, help with defaults,
--version, and one-line errors (exit code 2) for every bad flag or value."""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path

import pytest

from afd.entrypoints.cli import VLLM_FLAGS_NOT_HONOURED, build_parser, main

README = Path(__file__).resolve().parent.parent / "README.md"


def _parsers(parser: argparse.ArgumentParser, path: str = "afd"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # launch is serve's alias
                    seen.add(id(sub))
                    yield from _parsers(sub, f"{path} {name}")


def test_every_flag_has_help_with_its_default():
    for path, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"{path} {action.option_strings or action.dest} has no help"
            text = formatter._expand_help(action)
            if action.option_strings and action.default not in (None, argparse.SUPPRESS):
                assert "default" in text, f"{path} {action.option_strings}: {text!r}"
        assert parser.format_help()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"afd \d+\.\d+\.\d+\n", capsys.readouterr().out)


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("afd: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "argv,words",
    [
        (["serve", "--tensor-parallel-size", "2"], "--tensor-parallel-size cannot be honoured"),
        (["serve", "m", "-tp", "2"], "-tp cannot be honoured"),
        (["serve", "--kv-cache-dtype=fp8"], "--kv-cache-dtype cannot be honoured"),
        (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ([], "required: COMMAND"),
        (["serve", "--gpu-memory-utilization", "0"], "(0, 1]"),
        (["serve", "--gpu-memory-utilization", "-1"], "(0, 1]"),
        (["serve", "--gpu-memory-utilization", "1.5"], "(0, 1]"),
        (["serve", "--gpu-memory-utilization", "nan"], "(0, 1]"),
        (["serve", "--seed", str(2**64)], "must be"),
        (["serve", "--seed", "1e3"], "not an integer"),
        (["serve", "--port", "0"], "--port"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--dtype", "fp4"], "invalid choice"),
        (["serve", "--max-request-body-mb", "0"], "--max-request-body-mb"),
        (["serve", "--max-request-body-mb", "nan"], "--max-request-body-mb"),
        (["serve", "--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["serve", "--shutdown-timeout", "inf"], "--shutdown-timeout"),
        (["serve", "--http-header-timeout-s", "0"], "--http-header-timeout-s"),
        (["serve", "--api-key", ""], "must not be empty"),
        (["serve", "--api-key", "a b"], "visible ASCII"),
        (["serve", "--api-key", "clé"], "visible ASCII"),
        (["serve", "--served-model-name", "a", "a"], "twice"),
        (["serve", "--served-model-name", " "], "must not be empty"),
        (["serve", "--max-queue-len", "0"], "--max-queue-len"),
        (["serve", "--max-model-len", "1"], "--max-model-len"),
        (["serve", "--kv-cache-memory-mb", "0"], "--kv-cache-memory-mb"),
        (["serve", "--log-level", "loud"], "invalid choice"),
        (["serve", "a/b", "--model", "c/d"], "two models"),
        (["generate", "--max-tokens", "x", "hi"], "invalid int value"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, words, capsys):
    assert words in _error(argv, capsys)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["serve", "--num-attention-workers", "0", "--num-expert-workers", "2"],
         ["--num-expert-workers 2 needs attention workers", "--num-attention-workers N",
          "--num-expert-workers 0"]),
        (["serve", "--num-attention-workers", "0", "--num-prefill-workers", "1"],
         ["--num-prefill-workers 1 needs a disaggregated cluster", "--num-attention-workers N",
          "--num-expert-workers N", "--num-prefill-workers 0"]),
        (["serve", "--num-attention-workers", "2", "--num-expert-workers", "0"],
         ["--num-attention-workers 2 needs expert workers", "--num-expert-workers N",
          "--num-attention-workers 0"]),
        (["serve", "--num-prefill-workers", "-1"], ["--num-prefill-workers must be >= 0"]),
        (["serve", "--num-expert-workers", str(-(2**64))], ["--num-expert-workers must be >= 0"]),
        (["generate", "--num-attention-workers", "2", "hi"],
         ["--num-attention-workers 2 needs expert workers", "--num-expert-workers N"]),
        (["generate", "--num-prefill-workers", "1", "hi"],
         ["--num-prefill-workers 1 needs a disaggregated cluster"]),
        (["plan", "--hardware", "H100", "--predict", "--num-expert-workers", "0",
          "--num-attention-workers", "2"], ["--num-attention-workers 2 needs expert workers"]),
        (["plan", "--hardware", "H100", "--predict", "--num-attention-workers", "0",
          "--num-expert-workers", "3"], ["--num-expert-workers 3 needs attention workers"]),
    ],
)  # fmt: skip
def test_worker_count_errors_name_the_flags_that_fix_them(argv, words, capsys):
    err = _error(argv, capsys)
    for w in words:
        assert w in err, err


@pytest.mark.parametrize(
    "argv,counts",
    [
        (["serve"], (1, 1, 1)),
        (["serve", "m", "--num-attention-workers", "0"], (0, 0, 0)),
        (["launch", "--num-expert-workers", "0"], (0, 0, 0)),
        (["serve", "--num-attention-workers", "2"], (1, 2, 1)),
        (["serve", "--num-prefill-workers", "0"], (0, 1, 1)),
        (["generate", "hi"], (0, 0, 0)),
        (["generate", "--num-attention-workers", "2", "--num-expert-workers", "2", "hi"],
         (0, 2, 2)),
    ],
)  # fmt: skip
def test_pools_not_given_default_to_0_beside_a_colocated_flag(argv, counts):
    """`afd serve M --num-attention-workers 0` alone is the single process: the pools not given
    follow it to 0; otherwise serve defaults to 1P1A1F and generate to one process."""
    from afd.entrypoints.cli import engine_config_from_args

    config = engine_config_from_args(build_parser().parse_args(argv))
    c = config.cluster
    got = (c.num_prefill_workers, c.num_attention_workers, c.num_expert_workers)
    assert got == counts


def test_plan_predict_colocated_with_one_flag(capsys):
    argv = ["plan", "--hardware", "H100", "--model", "deepseek-v3", "--predict", "--json",
            "--num-attention-workers", "0"]  # fmt: skip
    assert main(argv) == 0
    assert "step_time_s" in capsys.readouterr().out


def test_vllm_names_parse_to_the_same_settings(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "sk-vllm")
    monkeypatch.delenv("AFD_API_KEY", raising=False)
    args, extra = build_parser().parse_known_args(
        ["serve", "org/model", "--served-model-name", "a", "b", "--dtype", "half",
         "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5", "--seed", "-3",
         "--trust-remote-code", "--enforce-eager", "--num-gpu-blocks-override", "9"]
    )  # fmt: skip
    assert extra == []
    assert args.model_tag == "org/model" and args.served_model_name == ["a", "b"]
    assert args.dtype == "float16" and args.enable_prefix_caching is False
    assert (args.gpu_memory_utilization, args.seed, args.num_kv_blocks) == (0.5, -3, 9)
    assert args.api_key == "sk-vllm"
    monkeypatch.setenv("AFD_API_KEY", "sk-afd")  # AFD's own variable wins
    assert build_parser().parse_args(["launch"]).api_key == "sk-afd"
    assert (
        build_parser().parse_args(["launch", "--no-prefix-caching"]).enable_prefix_caching is False
    )


def test_busy_port_fails_before_anything_loads(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        err = _error(["serve", "--port", str(port)], capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "loading" not in capsys.readouterr().out


def test_readme_flag_table_covers_vllm_serve():
    """The README's table of `vllm serve` flags names each one AFD has or refuses, and every
    refused one is in the table."""
    text = README.read_text()
    table = text[text.index("| `vllm serve` flag |") :].split("\n\n")[0]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    known = {s for a in serve._actions for s in a.option_strings}
    listed = set()
    for row in rows:
        flag, verdict = (c.strip() for c in row.strip("|").split("|")[:2])
        for name in re.findall(r"`(-[-\w]+)`", flag):
            listed.add(name)
            if verdict.startswith("not applicable"):
                assert name in VLLM_FLAGS_NOT_HONOURED, name
            else:
                assert name in known, name
        assert verdict.split()[0] in ("same", "different", "not"), row
    assert set(VLLM_FLAGS_NOT_HONOURED) <= listed
