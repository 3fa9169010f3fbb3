"""Built-in tiny models: random weights from a fixed seed plus a locally trained tokenizer.

Their weights are random, so the text they generate is gibberish. They exist so that every
feature runs and is tested with no download. Generated once into `$AFD_CACHE_DIR` (default
`~/.cache/afd`)/models/<name>-v<version>.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_MODELS = {
    "tiny-qwen3-moe": "qwen3-moe",
    "tiny-qwen2-moe": "qwen2-moe",
    "tiny-deepseek-v2": "deepseek-v2",
    "tiny-deepseek-v3": "deepseek-v3",
}
VERSION = 1
VOCAB_SIZE = 512


def cache_dir() -> Path:
    return Path(os.environ.get("AFD_CACHE_DIR", Path.home() / ".cache" / "afd"))


def resolve_model(name_or_path: str | Path) -> Path:
    """A model directory as is, or a built-in name generated on first use."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"model {name!r} is neither a directory nor a built-in model "
            f"({', '.join(BUILTIN_MODELS)})"
        )
    target = cache_dir() / "models" / f"{name}-v{VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private temp dir and rename: concurrent first uses never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_builtin(name, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_builtin(name: str, out_dir: Path) -> None:
    from afd.models.tiny import build_tiny_checkpoint
    from afd.tokenizer import train_bytelevel_bpe

    train_bytelevel_bpe(out_dir, VOCAB_SIZE)
    from afd.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(out_dir)
    eos = [tok._tok.token_to_id("<|endoftext|>"), tok._tok.token_to_id("<|im_end|>")]
    build_tiny_checkpoint(
        BUILTIN_MODELS[name],
        out_dir,
        seed=0,
        vocab_size=VOCAB_SIZE,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=eos[0],
    )
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
