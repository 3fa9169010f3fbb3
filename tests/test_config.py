"""EngineConfig as frozen parts: vLLM's flat keywords map onto them, every value is checked
once where it is declared (naming the flag to fix), and the command-line flags come from the
same field metadata (so `afd serve` rebuilds a config from the flags made of it)."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from afd.config import (
    PARTS,
    CacheConfig,
    ClusterConfig,
    EngineConfig,
    FailurePolicy,
    ModelSource,
    SchedulerLimits,
    resolve_worker_counts,
)
from afd.entrypoints.cli import build_parser, main
from afd.entrypoints.flags import engine_argv, engine_config_from_args
from afd.entrypoints.serving import ServerConfig

ROOT = Path(__file__).resolve().parent.parent


def test_flat_keywords_go_to_their_parts():
    config = EngineConfig.from_flat(
        model="org/name", dtype="half", num_gpu_blocks_override=9, max_num_seqs=8,
        num_attention_workers=2, num_expert_workers=1, max_worker_restarts=0,
    )  # fmt: skip
    assert config.source == ModelSource(model="org/name", dtype="float16")
    assert config.cache == CacheConfig(num_kv_blocks=9)
    assert config.limits == SchedulerLimits(max_num_seqs=8)
    assert config.cluster == ClusterConfig(num_attention_workers=2, num_expert_workers=1)
    assert config.failure == FailurePolicy(max_worker_restarts=0)
    flat = config.flat()
    assert flat["num_kv_blocks"] == 9 and "num_gpu_blocks_override" not in flat
    assert EngineConfig.from_flat(**flat) == config
    assert config.replace(num_scheduler_steps=4).limits.num_scheduler_steps == 4
    assert config.limits.num_scheduler_steps == 1  # replace made a copy


def test_unknown_or_doubled_keywords_are_type_errors():
    with pytest.raises(TypeError, match="bogus"):
        EngineConfig.from_flat(bogus=1)
    with pytest.raises(TypeError, match="num_gpu_blocks_override and num_kv_blocks"):
        EngineConfig.from_flat(num_kv_blocks=3, num_gpu_blocks_override=4)
    with pytest.raises(TypeError, match="unknown LLM argument.*bogus"):
        from afd import LLM

        LLM("tiny-qwen3-moe", bogus=1)


def test_parts_are_frozen():
    config = EngineConfig.from_flat()
    for part in PARTS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, part, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.block_size = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().port = 1  # type: ignore[misc]


BIG, NAN, INF = 2**64, math.nan, math.inf


@pytest.mark.parametrize(
    "settings,words",
    [
        ({"block_size": 0}, "--block-size must be at least 1"),
        ({"block_size": -1}, "--block-size must be at least 1"),
        ({"block_size": BIG}, "--block-size must be at most"),
        ({"block_size": 1.5}, "--block-size must be an integer"),
        ({"block_size": True}, "--block-size must be an integer"),
        ({"block_size": NAN}, "--block-size must be an integer"),
        ({"num_kv_blocks": 0}, "--num-kv-blocks must be at least 1"),
        ({"kv_cache_memory_mb": 0}, "--kv-cache-memory-mb must be at least 1"),
        ({"gpu_memory_utilization": 0}, "(0, 1]"),
        ({"gpu_memory_utilization": 1.5}, "(0, 1]"),
        ({"gpu_memory_utilization": NAN}, "(0, 1]"),
        ({"gpu_memory_utilization": INF}, "(0, 1]"),
        ({"max_num_seqs": 0}, "--max-num-seqs must be at least 1"),
        ({"max_num_batched_tokens": BIG}, "--max-num-batched-tokens must be at most"),
        ({"max_model_len": 1}, "--max-model-len must be at least 2"),
        ({"num_scheduler_steps": 0}, "--num-scheduler-steps must be at least 1"),
        ({"num_micro_batches": 0}, "--num-micro-batches must be at least 1"),
        ({"gpus_per_node": 0}, "--gpus-per-node must be at least 1"),
        ({"nnodes": 0}, "--nnodes must be at least 1"),
        ({"nnodes": 2}, "--dist-init-addr HOST:PORT"),
        ({"nnodes": 2, "dist_init_addr": "host:http"}, "--dist-init-addr HOST:PORT"),
        ({"nnodes": 2, "dist_init_addr": "h:1", "node_roles": "5=expert"}, "--node-roles"),
        ({"nnodes": 2, "dist_init_addr": "h:1", "comm_backend": "shm"}, "one node"),
        ({"num_expert_workers": 2}, "--num-expert-workers 2 needs attention workers"),
        ({"num_prefill_workers": -1}, "--num-prefill-workers must be >= 0"),
        ({"num_attention_workers": BIG, "num_expert_workers": 1}, "at most"),
        ({"max_worker_restarts": -1}, "--max-worker-restarts must be >= 0"),
        ({"restart_window_s": 0}, "--restart-window-s must be a positive number of seconds"),
        ({"restart_window_s": NAN}, "--restart-window-s must be a positive"),
        ({"worker_timeout_s": INF}, "--worker-timeout-s must be a positive"),
        ({"node_timeout_s": 0}, "--node-timeout-s must be a positive"),
        ({"seed": BIG}, "--seed must be at most"),
        ({"model": ""}, "--model must not be empty"),
        ({"tokenizer": " "}, "--tokenizer must not be empty"),
        ({"chat_template": "\udcff"}, "is not valid UTF-8"),
        ({"revision": 3}, "--revision must be a string"),
        ({"dtype": "fp4"}, "unknown dtype 'fp4'"),
        ({"quantization": "int4"}, "unknown quantization 'int4'"),
        ({"comm_backend": "nccl-please"}, "unknown comm backend"),
        ({"dispatch_dtype": "fp4"}, "unknown dispatch dtype"),
        ({"kernel_backend": "cuda"}, "unknown kernel backend"),
        ({"device": "tpu"}, "unknown device"),
        ({"num_threads_per_worker": 0}, "--num-threads-per-worker must be at least 1"),
        ({"num_threads_per_worker": -2}, "--num-threads-per-worker must be at least 1"),
        ({"num_threads_per_worker": 10**6}, "--num-threads-per-worker must be at most 1024"),
        ({"num_threads_per_worker": 1.5}, "--num-threads-per-worker must be an integer"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_where_declared(settings, words):
    with pytest.raises(ValueError) as e:
        EngineConfig.from_flat(**settings)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "settings,words",
    [
        ({"port": 0}, "--port must be 1..65535"),
        ({"port": 2**64}, "--port must be 1..65535"),
        ({"api_key": "a b"}, "visible ASCII"),
        ({"api_key": ""}, "must not be empty"),
        ({"served_model_names": ["a", "a"]}, "twice"),
        ({"served_model_names": [""]}, "must not be empty"),
        ({"max_queue_len": 0}, "--max-queue-len"),
        ({"max_body_bytes": 0}, "--max-request-body-mb"),
        ({"header_timeout_s": NAN}, "--http-header-timeout-s"),
        ({"shutdown_timeout_s": -1}, "--shutdown-timeout"),
        ({"log_level": "loud"}, "unknown log level"),
    ],
)
def test_bad_server_settings_are_refused(settings, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        ServerConfig(**settings)


def test_pools_not_given_follow_a_colocated_zero():
    one = dict.fromkeys(("num_prefill_workers", "num_attention_workers", "num_expert_workers"), 1)
    none = dict.fromkeys(one)
    assert resolve_worker_counts(none, one) == one
    got = resolve_worker_counts({**none, "num_attention_workers": 0}, one)
    assert got == dict.fromkeys(one, 0)
    got = resolve_worker_counts({**none, "num_attention_workers": 3}, one)
    assert got == {**one, "num_attention_workers": 3}


def _serve_config(argv: list[str]) -> EngineConfig:
    return engine_config_from_args(build_parser().parse_args(["serve", *argv]))


def test_flags_made_from_a_config_give_it_back():
    config = EngineConfig.from_flat(
        model="tiny-deepseek-v3", dtype="bfloat16", seed=-3, block_size=4, num_kv_blocks=40,
        enable_prefix_caching=False, max_model_len=128, num_scheduler_steps=2,
        num_attention_workers=2, num_expert_workers=3, num_prefill_workers=0,
        num_micro_batches=2, comm_backend="torch", dispatch_dtype="fp8", gpus_per_node=1,
        restart_window_s=30.5, nnodes=2, dist_init_addr="10.0.0.1:29500",
        node_roles="0=attention,prefill;1=expert",
    )  # fmt: skip
    assert _serve_config(engine_argv(config, ("engine", "nodes"))) == config
    assert _serve_config(engine_argv(EngineConfig.from_flat())) == EngineConfig.from_flat()


def test_every_flagged_setting_is_a_flag_of_serve_and_only_there_the_node_ones():
    parser = build_parser()
    subs = parser._subparsers._group_actions[0].choices

    def dests(name):
        return {a.dest for a in subs[name]._actions}

    for cls in (*PARTS.values(), ServerConfig):
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag is not None:
                assert flag.dest(f.name) in dests("serve"), f.name
                assert (flag.dest(f.name) in dests("generate")) == (flag.scope == "engine")


def test_a_bad_value_in_a_config_file_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("block_size: 1.5\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == "afd: error: --block-size must be an integer, got 1.5\n"


def test_cli_and_launch_do_not_import_each_other():
    """launch (and the flag helpers) build on afd.entrypoints.flags, never on cli."""
    for name in ("launch.py", "flags.py"):
        tree = ast.parse((ROOT / "afd" / "entrypoints" / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "afd.entrypoints.cli" not in imported, name
