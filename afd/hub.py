"""Models from the Hugging Face Hub: `org/name` ids resolved to a local snapshot through
huggingface_hub (its cache, `HF_HOME`, `HF_HUB_OFFLINE` and revisions), fetching only the files
AFD reads."""

from __future__ import annotations

import os
import re
from pathlib import Path

# what the loader, the config and the tokenizer read; nothing else of a repository is fetched
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",  # eos ids
    "generation_config.json",
]

# owner/name as the Hub spells them (huggingface_hub validates the details)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """`org/name` (not a path: no leading '/', '.', '~', at most one '/')."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def download_model(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    tokenizer_only: bool = False,
) -> Path:
    """The local snapshot folder of `repo_id` at `revision` (default: main), downloaded into the
    Hugging Face cache unless it is there; offline (`HF_HUB_OFFLINE=1`) it must be cached.
    ValueError, in one line, when it cannot be had."""
    from huggingface_hub import snapshot_download

    patterns = TOKENIZER_FILES if tokenizer_only else MODEL_FILES + TOKENIZER_FILES
    # huggingface_hub reads these variables once, at import; AFD reads them at each call, so
    # a process that set them later (a test, a notebook) is honoured too
    env = os.environ
    if cache_dir is None and env.get("HF_HUB_CACHE"):
        cache_dir = env["HF_HUB_CACHE"]
    elif cache_dir is None and env.get("HF_HOME"):
        cache_dir = os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
    offline = env.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        path = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=patterns,
                local_files_only=offline,
            )
        )
    except Exception as e:  # huggingface_hub's errors, network errors: all mean "not available"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(
            f"model {repo_id!r}{at} is not a directory, a built-in model, or a Hugging Face Hub "
            f"model this machine can get ({type(e).__name__}: {first[:200]})"
        ) from None
    wanted = "tokenizer.json" if tokenizer_only else "config.json"
    if not (path / wanted).is_file():
        raise ValueError(f"Hub model {repo_id!r} has no {wanted} (snapshot {path})")
    if not tokenizer_only and not any(path.glob("*.safetensors")):
        raise ValueError(f"Hub model {repo_id!r} has no safetensors weights (snapshot {path})")
    return path
