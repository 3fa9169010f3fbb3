"""Hugging Face Hub ids (org/name) offline, from a cache laid out the way huggingface_hub lays
it out: blobs by hash, snapshots/<commit>/ of links to them, refs/<branch or tag>."""

from __future__ import annotations

import hashlib
import os
import shutil

import httpx
import pytest
from conftest import launched

from afd import LLM, SamplingParams
from afd.builtin import resolve_model
from afd.hub import MODEL_FILES, is_hub_id

REPO = "afd-test/tiny-moe"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_hub_cache(hub_dir, repo_id: str, source, commit: str, refs=("main",)) -> None:
    """Put the files of `source` into a huggingface_hub cache at `hub_dir` as `repo_id`."""
    repo = hub_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, builtin_path):
    home = tmp_path / "hf"
    fill_hub_cache(home / "hub", REPO, builtin_path("tiny-qwen3-moe"), COMMIT, ("main", "v1"))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def test_hub_ids_and_paths_are_told_apart():
    for name in ("Qwen/Qwen3-30B-A3B", "deepseek-ai/DeepSeek-V3", "a/b.c-d_e"):
        assert is_hub_id(name), name
    for name in ("/abs/path", "./rel", "~/x/y", "a/b/c", "../a", "a/..", "tiny-qwen3-moe", "",
                 "a/", "/a", "a b/c", "a/\udc80"):  # fmt: skip
        assert not is_hub_id(name), name
    assert MODEL_FILES[0] == "config.json"


def test_resolve_offline_from_the_cache(offline_hub):
    path = resolve_model(REPO)
    assert path == offline_hub / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    assert resolve_model(REPO, revision="v1") == path  # a tag
    assert resolve_model(REPO, revision=COMMIT) == path  # a commit
    with pytest.raises(ValueError, match="at revision 'nope'") as e:
        resolve_model(REPO, revision="nope")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a directory, a built-in model, or a Hugging Face"):
        resolve_model("afd-test/not-cached")
    # another cache folder (--download-dir) holds nothing
    with pytest.raises(ValueError):
        resolve_model(REPO, download_dir=str(offline_hub / "elsewhere"))


def test_llm_and_a_separate_tokenizer_from_the_hub(offline_hub, builtin_path):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = LLM("tiny-qwen3-moe", dtype="float32").generate(["Hello"], params, use_tqdm=False)
    got = LLM(REPO, dtype="float32", tokenizer=REPO).generate(["Hello"], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_a_checkpoint_without_weights_is_refused(tmp_path, monkeypatch, builtin_path):
    source = tmp_path / "src"
    shutil.copytree(builtin_path("tiny-qwen3-moe"), source)
    for f in source.glob("*.safetensors"):
        f.unlink()
    fill_hub_cache(tmp_path / "hf" / "hub", "afd-test/empty", source, COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="no safetensors"):
        resolve_model("afd-test/empty")


@pytest.mark.slow
def test_afd_serve_org_name_offline(offline_hub, monkeypatch):
    """`afd serve org/name` from a pre-filled cache with the Hub unreachable (single process)."""
    import openai

    args = [REPO, "--dtype", "float32", "--num-attention-workers", "0", "--num-expert-workers",
            "0", "--num-prefill-workers", "0", "--served-model-name", "tiny", REPO]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM("tiny-qwen3-moe", dtype="float32").generate(["Hello"], params, use_tqdm=False)
    with launched(*args, serve=True) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        cards = client.models.list().data
        assert [m.id for m in cards] == ["tiny", REPO]
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["root"] == REPO
        r = client.completions.create(model=REPO, prompt="Hello", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        assert r.model == "tiny" and r.choices[0].text == want[0].outputs[0].text
