"""Speculative decoding (issue 21), stage 1: the `--speculative-config` / `LLM(speculative_config=)`
setting, its validation, and the start-up checks against the checkpoint."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from afd.config import EngineConfig
from afd.entrypoints.cli import main
from afd.spec import (
    MAX_SPECULATIVE_TOKENS,
    SpeculativeConfig,
    check_speculation,
    parse_speculative_json,
)


def test_ngram_defaults_and_one_lookup_length_sets_the_other():
    spec = SpeculativeConfig("ngram", 3)
    assert (spec.prompt_lookup_max, spec.prompt_lookup_min) == (3, 1)
    only_max = SpeculativeConfig("ngram", 2, prompt_lookup_max=5)
    assert (only_max.prompt_lookup_max, only_max.prompt_lookup_min) == (5, 5)
    only_min = SpeculativeConfig("ngram", 2, prompt_lookup_min=2)
    assert (only_min.prompt_lookup_max, only_min.prompt_lookup_min) == (2, 2)


@pytest.mark.parametrize(
    "values,words",
    [
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be in"),
        ({"method": "ngram", "num_speculative_tokens": -1}, "num_speculative_tokens must be in"),
        ({"method": "ngram", "num_speculative_tokens": 10**9}, "num_speculative_tokens must be in"),
        ({"method": "ngram", "num_speculative_tokens": 2.5}, "must be an integer"),
        ({"method": "ngram", "num_speculative_tokens": True}, "must be an integer"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "unknown method 'eagle'"),
        ({"method": "ngram", "num_speculative_tokens": 2, "foo": 1}, "unknown key(s) foo"),
        ({"num_speculative_tokens": 2}, "method is required"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_max": 2,
                "prompt_lookup_min": 3,
            },
            "prompt_lookup_min (3) > prompt_lookup_max (2)",
        ),
        ({"method": "mtp", "num_speculative_tokens": 1, "prompt_lookup_max": 2}, "ngram only"),
    ],
)
def test_bad_configs_are_value_errors_naming_the_key(values, words):
    with pytest.raises(ValueError, match="speculative_config") as e:
        SpeculativeConfig.from_dict(values)
    assert words in str(e.value)
    with pytest.raises(ValueError) as e2:  # LLM(...)'s keywords take the same path
        EngineConfig.from_flat(speculative_config=values)
    assert words in str(e2.value)


def test_llm_keyword_and_json_flag_give_the_same_config():
    values = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    from_dict = EngineConfig.from_flat(speculative_config=values).limits.speculative_config
    assert from_dict == parse_speculative_json(json.dumps(values))
    assert from_dict == SpeculativeConfig("ngram", 4, 3, 3)
    assert EngineConfig.from_flat().limits.speculative_config is None
    assert parse_speculative_json("null") is None
    assert MAX_SPECULATIVE_TOKENS >= 8


@pytest.mark.parametrize(
    "text,words",
    [
        ("{bad", "--speculative-config is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "x", "num_speculative_tokens": 1}', "unknown method"),
    ],
)
def test_bad_flag_is_a_one_line_error_exit_2(text, words, capsys):
    assert main(["generate", "--speculative-config", text, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("afd: error: ") and err.count("\n") == 1, err
    assert words in err


def test_mtp_without_an_mtp_layer_is_a_start_up_error():
    spec = SpeculativeConfig("mtp", 1)
    without = SimpleNamespace(hf=SimpleNamespace())
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        check_speculation(spec, without)
    check_speculation(None, without)  # speculation off: nothing to check


def test_a_valid_config_is_refused_until_verification_exists(capsys):
    """Never accepted and silently ignored: the engine says verification is not built yet."""
    flag = '{"method": "ngram", "num_speculative_tokens": 2}'
    assert main(["generate", "--speculative-config", flag, "hi"]) == 2
    assert "verification is not built" in capsys.readouterr().err
    with_layer = SimpleNamespace(hf=SimpleNamespace(num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match="verification is not built"):
        check_speculation(SpeculativeConfig("mtp", 1), with_layer)


def test_config_crosses_to_the_engine_core_as_a_declared_record():
    import msgspec

    config = EngineConfig.from_flat(
        speculative_config={"method": "ngram", "num_speculative_tokens": 2}
    )
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=EngineConfig)
    assert back.limits.speculative_config == SpeculativeConfig("ngram", 2)
