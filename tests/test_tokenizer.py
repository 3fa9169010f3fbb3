from __future__ import annotations

import hashlib
import json
import random

import pytest

from afd.builtin import SPECIAL_TOKENS, train_bytelevel_bpe
from afd.sampling.params import SamplingParams
from afd.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer, truncate_at_stop

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the capital of France? café 🙂"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_bytelevel_bpe(path, 512)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


def _digest(path) -> dict[str, str]:
    return {
        name: hashlib.sha256((path / name).read_bytes()).hexdigest()
        for name in ("tokenizer.json", "tokenizer_config.json")
    }


def test_training_is_deterministic_and_exact_size(tmp_path, tok_dir, tok):
    train_bytelevel_bpe(tmp_path / "again", 512)
    assert _digest(tmp_path / "again") == _digest(tok_dir)
    assert tok.vocab_size == 512
    for name in SPECIAL_TOKENS:
        assert tok.token_to_id(name) is not None
    # a large vocab cannot be filled by merges from a small corpus: reserved tokens pad it
    train_bytelevel_bpe(tmp_path / "big", 3000, seed_text="extra words for the corpus")
    big = Tokenizer.from_pretrained(tmp_path / "big")
    assert big.vocab_size == 3000
    assert all(big.id_to_token(i) is not None for i in range(3000))
    with pytest.raises(ValueError):
        train_bytelevel_bpe(tmp_path / "tiny", 100)


def test_roundtrip_and_matches_transformers(tok_dir, tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    texts = ["Hello, world!", "  spaces  and\ttabs\n", "日本語 naïve 🚀", "<|im_start|>user\nhi"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert all(0 <= i < tok.vocab_size for i in tok.encode("anything at all ⚙"))
    rendered = tok.apply_chat_template(MESSAGES)
    assert rendered == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n")
    assert not tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith(
        "assistant\n"
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}]
    assert "<|im_start|>user\nab<|im_end|>" in tok.apply_chat_template(parts)


def test_eos_bos_and_config_handling(tmp_path, tok_dir):
    # Llama-3 style: tokenizer.json's post-processor adds BOS (transformers takes BOS/EOS from
    # there when a tokenizer.json exists, whatever add_bos_token says)
    tok_json = json.loads((tok_dir / "tokenizer.json").read_text())
    tok_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                            "tokens": ["<|im_start|>"]}},
    }  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    # Llama-style config: explicit BOS and a template using raise_exception / tojson / bos_token
    config.update(
        bos_token={"__type": "AddedToken", "content": "<|im_start|>", "special": True},
        add_bos_token=True,
        chat_template=(
            "{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
            "{{ m['content'] | tojson }}{% endfor %}"
        ),
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.bos_token_id == 1
    assert t.eos_token_ids == {0, 1, 2}
    assert t.encode("hi")[0] == 1
    assert t.encode("hi", add_special_tokens=False)[0] != 1
    assert t.apply_chat_template([{"role": "user", "content": "é<"}]) == '<|im_start|>"é<"'
    with pytest.raises(ValueError, match="no tools"):
        t.apply_chat_template([{"role": "tool", "content": "x"}])
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES)


def _stream(tok, ids, stop=None):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=stop))
    shown = []
    for i, t in enumerate(ids):
        before = detok.text
        stopped = detok.add_token(t, final=i == len(ids) - 1)
        assert detok.text.startswith(before), "streamed text must only grow"
        assert "\ufffd" not in detok.text[len(before) :] or "\ufffd" in tok.decode(ids)
        shown.append(detok.text)
        if stopped:
            break
    return detok, shown


def test_incremental_detokenizer_equals_full_decode(tok):
    text = "Grüße aus 日本 🙂🚀 and plain words, numbers 12345."
    ids = tok.encode(text)
    detok, shown = _stream(tok, ids)
    assert detok.text == tok.decode(ids) == text
    # a multi-byte char split over byte tokens is never shown half-decoded
    assert all(not s.endswith("\ufffd") for s in shown)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        detok, _ = _stream(tok, ids)
        assert detok.text == tok.decode(ids)
    # finalize() flushes held-back text when the caller never marks a token final
    d = IncrementalDetokenizer(tok, stop=["xyz"])
    for t in tok.encode("abc x"):
        d.add_token(t)
    assert d.text == "abc "
    d.finalize()
    assert d.text == "abc x" and d.stop_reason is None


def test_stop_strings(tok):
    ids = tok.encode("The answer is 42. STOP here and more")
    detok, shown = _stream(tok, ids, stop=["never", "STOP"])
    assert detok.stop_reason == "STOP"
    assert detok.text == "The answer is 42. "
    # no streamed prefix ever contained a piece of the stop string past the cut
    assert all(len(s) <= len("The answer is 42. ") for s in shown)
    # the earliest occurrence wins, not the first in the list
    assert truncate_at_stop("a b c", ["c", "b"]) == ("a ", "b")
    assert truncate_at_stop("abc", None) == ("abc", None)
    checker = StopChecker(["</end>", "##"])
    assert checker.holdback("text </e") == 3
    assert checker.holdback("text #") == 1
    assert checker.holdback("text") == 0
    # a stop string spanning token boundaries is found once complete
    ids = tok.encode("one two three")
    detok, _ = _stream(tok, ids, stop="o thr")
    assert detok.text == "one tw" and detok.stop_reason == "o thr"
    with pytest.raises(ValueError):
        StopChecker([""])
