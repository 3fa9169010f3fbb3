"""Tokenizers from Hugging Face model folders (no transformers needed), local BPE training,
chat templates, and incremental detokenization with stop strings."""

from __future__ import annotations

import json
from pathlib import Path

from afd.sampling_params import SamplingParams

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts model routes every token to a
few experts. Attention workers hold the key value cache while expert workers hold the weights of
the experts. Micro batches ping pong between the two sides so that both stay busy. Hello, my name
is Ada and I like to write programs in Python. What is the capital of France? Paris is the capital
of France. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Once upon a time there was a small model that
generated random text. User: how are you today? Assistant: I am fine, thank you for asking.
"""


def train_bytelevel_bpe(
    out_dir: str | Path, vocab_size: int, chat_template: str = CHATML_TEMPLATE
) -> None:
    """Train a byte-level BPE tokenizer of exactly `vocab_size` ids on a built-in corpus."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"trained vocabulary {tok.get_vocab_size()} exceeds {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": chat_template,
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


class Tokenizer:
    """encode / decode / chat template over a `tokenizers` tokenizer.json."""

    def __init__(self, hf_tokenizer, config: dict, eos_ids: set[int]):
        self._tok = hf_tokenizer
        self.config = config
        self.chat_template = config.get("chat_template")
        bos = _token_text(config.get("bos_token"))
        self.bos_token_id = hf_tokenizer.token_to_id(bos) if bos else None
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_token_id is not None
        eos = _token_text(config.get("eos_token"))
        self.eos_token_ids = set(eos_ids)
        if eos and hf_tokenizer.token_to_id(eos) is not None:
            self.eos_token_ids.add(hf_tokenizer.token_to_id(eos))
        self.vocab_size = hf_tokenizer.get_vocab_size()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in model directory {model_dir}")
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_file = model_dir / "chat_template.jinja"
        if not config.get("chat_template") and template_file.is_file():
            config["chat_template"] = template_file.read_text()
        eos_ids: set[int] = set()
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            eos_ids |= set([eos] if isinstance(eos, int) else (eos or []))
        return cls(HFTokenizer.from_file(str(path)), config, eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=_token_text(self.config.get("bos_token")) or "",
                eos_token=_token_text(self.config.get("eos_token")) or "",
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class IncrementalDetokenizer:
    """Text of one sequence's output so far; holds back broken UTF-8 and possible stop-string
    prefixes from `text`, and reports when a stop string ends the output."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.stop: list[str] = list(params.stop or [])
        self.ids: list[int] = []
        self.full_text = ""
        self.text = ""  # what may be shown now
        self.stop_reason: str | None = None

    def add_token(self, token_id: int, final: bool = False) -> bool:
        """Add a token; True when a stop string was found (the text is cut before it)."""
        if self.stop_reason is not None:
            return True
        self.ids.append(token_id)
        # Full re-decode keeps merges across tokens exact; outputs here are short.
        self.full_text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            pos = self.full_text.find(s)
            if pos != -1:
                self.full_text = self.full_text[:pos]
                self.text = self.full_text
                self.stop_reason = s
                return True
        visible = self.full_text
        if not final:
            if visible.endswith("\ufffd"):
                visible = visible.rstrip("\ufffd")
            hold = max((_overlap(visible, s) for s in self.stop), default=0)
            visible = visible[: len(visible) - hold]
        if len(visible) >= len(self.text) or final:
            self.text = visible
        return False

    def finalize(self) -> None:
        if self.stop_reason is None:
            self.text = self.full_text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
