from __future__ import annotations

import hashlib
import json
import random
import re

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


# -- other decoders: text as transformers and vLLM make it -----------------------------------------


def _save(tok, out, config: dict) -> None:
    """tokenizer.json plus a tokenizer_config.json; no transformers cleanup of decoded text (vLLM's
    streamed text never has it, so the comparisons below are with the decode vLLM makes)."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              **config}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def train_wordpiece(out, vocab_size: int = 512) -> None:
    """A BERT-style WordPiece tokenizer (lower case, [CLS] text [SEP]) of exactly `vocab_size`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    from afd.builtin import builtin_corpus

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(builtin_corpus().splitlines(), trainer=trainer)
    tok.add_special_tokens([f"[unused{i}]" for i in range(vocab_size - tok.get_vocab_size())])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    names = ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token")
    _save(tok, out, dict(zip(names, specials, strict=True)))


def train_metaspace(out, vocab_size: int = 400) -> None:
    """A SentencePiece-style Unigram tokenizer with a Metaspace pre-tokenizer and decoder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from afd.builtin import builtin_corpus

    tok = HFTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(builtin_corpus().splitlines(), trainer=trainer)
    _save(tok, out, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})


def train_byte_fallback(out, vocab_size: int = 600) -> None:
    """Llama 2 / Mistral style: BPE with byte fallback (<0xNN> tokens in the vocabulary) and the
    Replace, ByteFallback, Fuse, Strip decoder chain."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, trainers

    from afd.builtin import builtin_corpus

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    specials = ["<unk>", "<s>", "</s>", *byte_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(builtin_corpus().splitlines(), trainer=trainer)
    spec = json.loads(tok.to_str())
    # the byte tokens are ordinary vocabulary entries, as in Llama's, not special added tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    tok = HFTokenizer.from_str(json.dumps(spec))
    _save(tok, out, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})


TRAINERS = {"wordpiece": train_wordpiece, "metaspace": train_metaspace,
            "byte_fallback": train_byte_fallback}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def other_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    TRAINERS[request.param](path)
    return path


def _streamed(tok, prompt, out, skip: bool, final: bool = True) -> IncrementalDetokenizer:
    """Stream `out` after `prompt`; the text only grows, ends as a whole text."""
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    for i, t in enumerate(out):
        before = d.text
        d.add_token(t, final=final and i == len(out) - 1)
        assert d.text.startswith(before), (prompt, out[: i + 1])
    if not final:
        d.finalize()
    return d


def _after(whole: str, head: str) -> str:
    """transformers' decode of prompt + output less the prompt's decode; a broken character the
    prompt ends with is completed by the output (vLLM's reading; the difference is none then)."""
    if not whole.startswith(head):
        head = head.rstrip("\ufffd")
    assert whole.startswith(head)
    return whole[len(head) :]


def test_streamed_text_equals_transformers_decode_of_prompt_and_output(other_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(other_dir)
    tok = Tokenizer.from_pretrained(other_dir)
    assert tok.vocab_size == len(hf)
    # Outputs leave out byte-fallback tokens (<0xNN>): a run of them that turns invalid makes
    # every byte of it U+FFFD, also one already shown as a character, so no stream (vLLM's
    # neither) can show only what the final decode keeps; valid runs are checked below.
    pool = [i for i in range(tok.vocab_size) if not re.fullmatch(r"<0x..>", tok.id_to_token(i))]
    rng = random.Random(19)
    for trial in range(300):
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        out = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            d = _streamed(tok, prompt, out, skip, final=trial % 2 == 0)
            head = hf.decode(prompt, skip_special_tokens=skip)
            whole = hf.decode(prompt + out, skip_special_tokens=skip)
            assert d.text == _after(whole, head), (prompt, out, skip)
    # text prompts, and the echo of prompt + completion: what vLLM gives (lm-eval's case)
    for text in ("w200", "The quick brown fox", "café naïve", "what is 12 + 30 ?"):
        prompt = hf.encode(text)
        for reply in ("w639", "jumps over the dog.", "##ing", "Paris", "жук € 𝄞"):
            out = hf.encode(reply, add_special_tokens=False)
            for skip in (True, False):
                d = _streamed(tok, prompt, out, skip)
                whole = hf.decode(prompt + out, skip_special_tokens=skip)
                assert tok.decode(prompt, skip) + d.text == whole


def test_wordpiece_output_keeps_the_space_before_its_first_word(tmp_path):
    # what lm-eval's generate_until and echo saw differ from vLLM: `w639` for ` w639`
    train_wordpiece(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    prompt, out = tok.encode("w200"), tok.encode("w639", add_special_tokens=False)
    d = _streamed(tok, prompt, out, True)
    assert d.text == " w639" and tok.decode(prompt) + d.text == "w200 w639"


def test_stop_strings_after_a_prompt(other_dir):
    tok = Tokenizer.from_pretrained(other_dir)
    prompt = tok.encode("the answer is")
    out = tok.encode("forty two . stop here and more", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(stop=[" stop"]))
    shown = []
    for t in out:
        if d.add_token(t):
            break
        shown.append(d.text)
    assert d.stop_reason == " stop"
    want = _after(tok.decode(prompt + out), tok.decode(prompt)).split(" stop")[0]
    assert d.text == want and want.startswith(" forty")
    # held back while streaming: no shown text holds a piece of the stop string past the cut
    assert all(want.startswith(s) for s in shown) and shown


def test_special_tokens_only_in_tokenizer_config(tmp_path):
    """Tokens declared in tokenizer_config.json alone (added_tokens_decoder, additional special
    tokens) are matched as added tokens, as by transformers, vLLM and lm-eval's tokenizer."""
    from transformers import AutoTokenizer

    train_wordpiece(tmp_path, 400)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config["added_tokens_decoder"] = {
        "400": {"content": "<tool_call>", **entry, "special": True},
        "401": {"content": "<think>", **entry, "special": False},
    }
    config["additional_special_tokens"] = ["<tool_call>", "<extra>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    text = "hello <tool_call> world <think> x <extra>"
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert {400, 401, tok.token_to_id("<extra>")} <= set(ids) and tok.vocab_size == 403
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
        d = _streamed(tok, ids[:3], ids[3:], skip)
        assert d.text == _after(hf.decode(ids, skip_special_tokens=skip),
                                hf.decode(ids[:3], skip_special_tokens=skip))  # fmt: skip
    assert "<tool_call>" not in tok.decode(ids) and "<think>" in tok.decode(ids)


def test_byte_level_text_is_unchanged_by_the_prompt(tok):
    """The built-in byte-level BPE: the output's text is what decoding it alone gives (today's
    text), whatever the prompt before it."""
    rng = random.Random(8)
    prompts = [tok.encode(t) for t in ("Hello", "日本語 🙂", "a", "<|im_start|>assistant\n")]
    prompts += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
                for _ in range(20)]  # fmt: skip
    for prompt in prompts:
        if tok.decode(prompt, False).endswith("\ufffd"):
            continue  # the output completes the prompt's last character: not its own text
        for _ in range(10):
            out = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
            for skip in (True, False):
                d = _streamed(tok, prompt, out, skip, final=rng.random() < 0.5)
                assert d.text == tok.decode(out, skip), (prompt, out)


def test_prompts_ending_in_a_broken_or_replacement_character(tok):
    text = "Grüße aus 日本 🙂"
    ids = tok.encode(text)
    cut = next(i for i in range(len(ids) - 1, 0, -1) if tok.decode(ids[:i]).endswith("\ufffd"))
    d = _streamed(tok, ids[:cut], ids[cut:], True)
    assert tok.decode(ids[:cut]).rstrip("\ufffd") + d.text == text
    for prompt_text in ("odd \ufffd", "\ufffd"):  # U+FFFD itself stays the prompt's
        prompt = tok.encode(prompt_text)
        d = _streamed(tok, prompt, tok.encode(" and more"), True)
        assert d.text == " and more"


def test_a_decoder_that_rewrites_earlier_text(tmp_path):
    """A decoder whose text of earlier tokens changes (a replacement across tokens) breaks
    DecodeStream's prefix: the stream goes on, and the finished text is the whole decode's."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    _save(hf, tmp_path, {"unk_token": "[UNK]"})
    tok = Tokenizer.from_pretrained(tmp_path)
    d = IncrementalDetokenizer(tok, [3])
    for t in (1, 2, 3):
        d.add_token(t)
    assert d.text  # streamed on past the rewrite
    d.finalize()
    assert d.text == "Xc" == _after(tok.decode([3, 1, 2, 3]), tok.decode([3]))
