"""Built-in tiny models: random weights from a fixed seed plus a locally trained tokenizer.

Their weights are random, so the text they generate is gibberish. They exist so that every
feature (engine, disaggregated topologies, HTTP server, benchmarks) runs and is tested with no
download. Each is generated once, deterministically, into
`$AFD_CACHE_DIR` (default `~/.cache/afd`)/models/<name>-v<VERSION>.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BUILTIN_MODELS = {
    "tiny-qwen3-moe": "qwen3-moe",
    "tiny-qwen2-moe": "qwen2-moe",
    "tiny-deepseek-v2": "deepseek-v2",
    "tiny-deepseek-v3": "deepseek-v3",
}
# Bump when the generated files change (tokenizer corpus, tiny shapes), so stale caches are unused.
VERSION = 2
VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 2048
# A temp build folder older than this was left by a killed process and may be removed.
_STALE_BUILD_S = 3600.0


def cache_dir() -> Path:
    """Root of AFD's cache: `$AFD_CACHE_DIR` or `~/.cache/afd`."""
    return Path(os.environ.get("AFD_CACHE_DIR") or Path.home() / ".cache" / "afd").expanduser()


def builtin_model_dir(name: str) -> Path:
    """Where built-in model `name` lives once generated."""
    return cache_dir() / "models" / f"{name}-v{VERSION}"


def resolve_model(
    name_or_path: str | Path,
    revision: str | None = None,
    download_dir: str | None = None,
    tokenizer_only: bool = False,
) -> Path:
    """A model directory as is, a built-in name generated on first use, or a Hugging Face Hub
    id (`org/name`, at `revision`) from the Hub's cache or downloaded into it (afd.hub)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    from afd.benchmarks.models import BENCH_MODELS, bench_model_path
    from afd.hub import download_model, is_hub_id

    if name in BENCH_MODELS:  # benchmark models are built the same way, on first use
        return bench_model_path(name)
    if name not in BUILTIN_MODELS:
        if is_hub_id(name):
            return download_model(name, revision, download_dir, tokenizer_only)
        raise ValueError(
            f"model {name!r} is neither a directory nor a built-in model "
            f"({', '.join(BUILTIN_MODELS)}) nor a Hugging Face Hub id (org/name)"
        )
    target = builtin_model_dir(name)
    # The folder only ever appears by an atomic rename of a complete build.
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        if target.is_dir():  # another process built it while we waited
            return target
        _remove_stale_builds(target.parent, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=target.parent))
        try:
            build_builtin(name, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_builtin(name: str, out_dir: str | Path, **overrides) -> None:
    """Write built-in model `name` (weights, config, tokenizer) into `out_dir`; `overrides`
    change its config's shape (the peer benchmark models are built-in recipes, other shapes)."""
    from afd.models.tiny import build_tiny_checkpoint
    from afd.tokenizer import Tokenizer, train_bytelevel_bpe

    out_dir = Path(out_dir)
    train_bytelevel_bpe(out_dir, VOCAB_SIZE)
    tok = Tokenizer.from_pretrained(out_dir)
    eos = [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
    build_tiny_checkpoint(
        BUILTIN_MODELS[name],
        out_dir,
        seed=0,
        vocab_size=VOCAB_SIZE,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=eos[0],
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        **overrides,
    )
    gen_path = out_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen.update(eos_token_id=eos, pad_token_id=eos[0])
    gen_path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock across processes (flock); a no-op where flock is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone still keeps the cache consistent
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_builds(parent: Path, name: str) -> None:
    now = time.time()
    for old in parent.glob(f".{name}-build-*"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(old, ignore_errors=True)
