from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from afd.builtin import BUILTIN_MODELS, VERSION, build_builtin, resolve_model
from afd.tokenizer import Tokenizer


def _digests(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_resolve_passthrough_and_errors(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="neither a directory nor a built-in model") as e:
        resolve_model("no-such-model")
    assert all(name in str(e.value) for name in BUILTIN_MODELS)
    with pytest.raises(ValueError):
        resolve_model(str(tmp_path / "missing-dir"))


def test_builtin_model_is_consistent_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("AFD_CACHE_DIR", str(tmp_path / "cache"))
    path = resolve_model("tiny-qwen3-moe")
    assert path == tmp_path / "cache" / "models" / f"tiny-qwen3-moe-v{VERSION}"
    assert resolve_model("tiny-qwen3-moe") == path  # second call reuses the cache
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    # no build folders or partial models left behind
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == [path.name]

    config = json.loads((path / "config.json").read_text())
    tok = Tokenizer.from_pretrained(path)
    assert config["vocab_size"] == tok.vocab_size
    assert set(config["eos_token_id"]) == {
        tok.token_to_id("<|endoftext|>"),
        tok.token_to_id("<|im_end|>"),
    }
    assert tok.eos_token_ids == set(config["eos_token_id"])
    assert config["max_position_embeddings"] == 2048
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("assistant\n")

    build_builtin("tiny-qwen3-moe", tmp_path / "again")
    assert _digests(tmp_path / "again") == _digests(path)


@pytest.mark.slow
def test_concurrent_first_use(tmp_path):
    """Two processes generating the same built-in model at once both get one complete copy."""
    code = "from afd.builtin import resolve_model; print(resolve_model('tiny-qwen2-moe'))"
    env = {**os.environ, "AFD_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-2000:] for o in outs]
    paths = {o[0].decode().strip() for o in outs}
    assert paths == {str(tmp_path / "models" / f"tiny-qwen2-moe-v{VERSION}")}
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [
        f"tiny-qwen2-moe-v{VERSION}"
    ]
    assert Tokenizer.from_pretrained(paths.pop()).vocab_size == 512
