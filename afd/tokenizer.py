"""Tokenizers of Hugging Face model folders: transformers' fast tokenizer encodes, decodes and
renders chat templates (as vLLM and lm-eval load it), tokenizers' DecodeStream detokenizes
incrementally, on from the prompt's last tokens; stop strings."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger("afd.tokenizer")


def _as_id_set(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


class TooManyTokensError(ValueError):
    """A text has more tokens than allowed; `at_least` is a lower bound of its count."""

    def __init__(self, at_least: int):
        super().__init__(f"the text has at least {at_least} tokens")
        self.at_least = at_least


class Tokenizer:
    """encode / decode / chat template of a model folder's tokenizer, as transformers' fast
    tokenizer does them (special tokens declared only in tokenizer_config.json included)."""

    def __init__(self, hf_tokenizer: Any, eos_ids: Iterable[int] = ()):
        self.hf = hf_tokenizer  # transformers' fast tokenizer
        # tokenizers' own Tokenizer, holding every added token transformers registered
        self.backend = hf_tokenizer.backend_tokenizer
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.eos_token_ids: set[int] = set(eos_ids)
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """The folder's tokenizer (local files only, no remote code) and its eos ids
        (tokenizer, generation_config.json and config.json together)."""
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in model directory {model_dir}")
        eos_ids = _as_id_set(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        eos_ids |= _as_id_set(_read_json(model_dir / "config.json").get("eos_token_id"))
        return cls(_load_fast_tokenizer(model_dir), eos_ids)

    @property
    def chat_template(self) -> str | dict | None:
        """The template apply_chat_template renders (a dict when the folder names several)."""
        return self.hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS added as the tokenizer adds them."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (its longest vocabulary entry): a text
        of c characters has at least c / max_token_chars tokens, known without encoding it."""
        return max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    def encode_capped(
        self, text: str, max_tokens: int, add_special_tokens: bool = True
    ) -> list[int]:
        """encode(text), or TooManyTokensError as soon as the text certainly has more than
        `max_tokens` tokens: from its length alone, or from a prefix's tokens, so a huge text
        is refused without encoding all of it."""
        if len(text) > max_tokens * self.max_token_chars:
            raise TooManyTokensError(len(text) // self.max_token_chars)
        probe = 4 * max_tokens + 256  # characters: enough for max_tokens of ordinary text
        if len(text) > 2 * probe:
            head = len(self.backend.encode(text[:probe], add_special_tokens=False).ids)
            if head > max_tokens + 16 + max_tokens // 100:  # beyond any effect of the cut
                raise TooManyTokensError(head - 16)
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        if len(ids) > max_tokens:
            raise TooManyTokensError(len(ids))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as transformers' decode gives it."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def set_chat_template(self, template: str) -> None:
        """Use `template` (Jinja text) instead of the tokenizer config's chat template."""
        self.hf.chat_template = template

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's chat template (transformers' apply_chat_template);
        `kwargs` reach the template as variables."""
        if not self.chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template; use the completions API "
                "or a model whose tokenizer_config.json has a chat_template"
            )
        from jinja2.exceptions import TemplateError

        try:
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_fast_tokenizer(model_dir: Path) -> Any:
    """AutoTokenizer as vLLM and lm-eval load the folder; the generic fast tokenizer over its
    tokenizer.json when the class the folder names cannot load here (remote code, a package
    not installed) or is not a fast one (DecodeStream needs tokenizers' own tokenizer)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    options = {"local_files_only": True, "trust_remote_code": False}
    try:
        hf = AutoTokenizer.from_pretrained(model_dir, **options)
        if hf.is_fast:
            return hf
        why = f"{type(hf).__name__} is no fast tokenizer"
    except Exception as e:  # transformers raises many kinds here
        why = f"{type(e).__name__}: {e}"
    logger.warning(
        "AutoTokenizer cannot load %s (%s): PreTrainedTokenizerFast reads it", model_dir, why
    )
    return PreTrainedTokenizerFast.from_pretrained(model_dir, **options)


# ---- stop strings ------------------------------------------------------------------------------


class StopChecker:
    """Finds the earliest stop string in a growing text and how much of its tail to hold back."""

    def __init__(self, stop: Iterable[str] | str | None, include_stop: bool = False):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stop = stops
        self.include_stop = include_stop  # keep the stop string at the end of the text
        self.max_len = max((len(s) for s in stops), default=0)

    def find(self, text: str, start: int = 0) -> tuple[int, str] | None:
        """(position, stop string) of the earliest stop string starting at or after `start`."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def check(self, text: str, prev_len: int = 0, floor: int = 0) -> tuple[str, str] | None:
        """(text cut before the stop string, or after it with include_stop, stop string) if one
        occurs; `prev_len` is the length of a prefix already checked, so only the region a new
        match could touch is searched; none starts before `floor`."""
        if not self.stop:
            return None
        hit = self.find(text, max(floor, prev_len - self.max_len + 1))
        if hit is None:
            return None
        end = hit[0] + len(hit[1]) if self.include_stop else hit[0]
        return text[:end], hit[1]

    def holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


def truncate_at_stop(text: str, stop: Iterable[str] | str | None) -> tuple[str, str | None]:
    """`text` cut before its earliest stop string (excluded), and that string (or None)."""
    hit = StopChecker(stop).check(text)
    return (text, None) if hit is None else hit


# ---- incremental detokenization ----------------------------------------------------------------

# The prompt tokens an output is decoded on from: the shortest suffix of _TAIL_MIN.._TAIL_MAX
# tokens with whole text (vLLM's rule), else the last _TAIL_FALLBACK (bounded cost).
_TAIL_MIN, _TAIL_MAX, _TAIL_FALLBACK = 4, 24, 256


def _prompt_tail(backend: Any, prompt_ids: list[int], skip: bool) -> tuple[list[int], str]:
    """The prompt's last tokens whose text neither starts inside a broken character nor is empty
    (a tail of skipped special tokens would lose the space a decoder puts before a word), and
    that text."""
    for k in range(_TAIL_MIN, min(len(prompt_ids), _TAIL_MAX) + 1):
        tail = prompt_ids[-k:]
        text = backend.decode(tail, skip_special_tokens=skip)
        if text and "\ufffd" not in text:
            return tail, text
    tail = prompt_ids[-_TAIL_FALLBACK:]
    return tail, backend.decode(tail, skip_special_tokens=skip)


class IncrementalDetokenizer:
    """Streaming text of one sequence's output tokens.

    The output is decoded on from the prompt's last tokens (tokenizers' DecodeStream primed with
    them, as vLLM does), so its text is what decoding prompt + output gives after the prompt's
    text: a WordPiece or Metaspace decoder keeps the space before the first output word. `text`
    only grows, never ends in a broken UTF-8 character or in a tail that could start a stop
    string, and once finished is that whole text (cut before the first stop string, or after it
    with include_stop_str_in_output). Stop strings count only once min_tokens tokens are out, as
    in vLLM.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Iterable[int] | None = None,
        params: Any = None,
        *,
        stop: Iterable[str] | str | None = None,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.min_tokens = 0
        if params is None:
            self.stop_checker = StopChecker(stop)
        else:
            self.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
            self.skip_special_tokens = params.skip_special_tokens
            self.min_tokens = params.min_tokens
        self._stop_floor_text = ""  # text out before min_tokens: no stop string starts in it
        self.ids: list[int] = []
        self.decoded = ""  # all complete text so far (cut at a stop string once one is found)
        self.text = ""  # what may be shown now
        self.stop_reason: str | None = None
        self.finished = False
        self._backend = tokenizer.backend
        skip = self.skip_special_tokens
        prompt = prompt_ids if isinstance(prompt_ids, list) else list(prompt_ids or ())
        prompt = [int(t) for t in prompt[-_TAIL_FALLBACK:]]
        self._context, self._context_text = _prompt_tail(self._backend, prompt, skip)
        self._streamed = 0  # ids given to the stream (deferred ones wait)
        self._stream: Any = None  # a DecodeStream, from the first token decoded on its own

    def add_token(self, token_id: int, final: bool = False) -> bool:
        """Add one token; True when a stop string was found (the text is cut before it)."""
        if self.stop_reason is not None:
            return True
        if self.finished:
            raise RuntimeError("add_token after the detokenizer was finished")
        self.ids.append(int(token_id))
        prev_len = len(self.decoded)
        if final:
            self.decoded = self._final_text()
        else:
            self.decoded += self._new_text()
        if len(self.ids) < self.min_tokens:
            # no stop string counts yet (nor will one that starts in this text): show it all
            self.text = self._stop_floor_text = self.decoded
            if final:
                self.finished = True
            return False
        hit = self.stop_checker.check(self.decoded, prev_len, len(self._stop_floor_text))
        if hit is not None:
            self.decoded, self.stop_reason = hit
            self.text = self.decoded
            self.finished = True
            return True
        if final:
            self.text = self.decoded
            self.finished = True
        else:
            visible = self.decoded[: len(self.decoded) - self.stop_checker.holdback(self.decoded)]
            if len(visible) > len(self.text):
                self.text = visible
        return False

    def defer_token(self, token_id: int) -> None:
        """Keep a token without decoding it: the final add_token decodes all of them at once.
        For text nobody reads before the end and with no stop string to watch for."""
        if self.stop_checker.stop:
            raise RuntimeError("a detokenizer with stop strings must decode every token")
        if self.finished:
            raise RuntimeError("defer_token after the detokenizer was finished")
        self.ids.append(int(token_id))

    def add_tokens(self, token_ids: Iterable[int], final: bool = False) -> bool:
        """Add several tokens (e.g. a speculative or batched step); True on a stop string."""
        ids = list(token_ids)
        for i, t in enumerate(ids):
            if self.add_token(t, final=final and i == len(ids) - 1):
                return True
        return False

    def finalize(self) -> None:
        """Flush held-back text: the sequence ended for a reason other than a stop string."""
        if self.stop_reason is None and not self.finished:
            decoded = self._final_text()
            hit = self.stop_checker.check(decoded, len(self.decoded), len(self._stop_floor_text))
            if hit is not None:
                decoded, self.stop_reason = hit
            self.decoded = self.text = decoded
            self.finished = True

    def _stream_from(self, ids: list[int]) -> Any:
        """A DecodeStream whose next text is what follows the text of `ids`."""
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=ids, skip_special_tokens=self.skip_special_tokens)

    def _new_text(self) -> str:
        """Text the ids not yet streamed add ("" while they end inside a character)."""
        new = self.ids[self._streamed :]
        self._streamed = len(self.ids)
        if self._stream is None:
            if self._context_text.endswith("\ufffd"):
                return self._first_text()
            self._stream = self._stream_from(self._context)
        try:
            chunk = self._stream.step(self._backend, new[0] if len(new) == 1 else new)
        except Exception as e:
            if not str(e).startswith("Invalid prefix"):
                raise
            # The decoder rewrote text already out (it is not monotonic, e.g. a replacement
            # across tokens): go on from these tokens alone, as vLLM does.
            self._stream = self._stream_from([])
            chunk = self._stream.step(self._backend, new)
        return chunk or ""

    def _first_text(self) -> str:
        """The first output text after a context ending in a broken character or in U+FFFD
        (no prefix DecodeStream can keep): what follows the context's text once the whole text
        ends in a complete character; the stream goes on from there."""
        full = self._backend.decode(self._context + self.ids, self.skip_special_tokens)
        if full.endswith("\ufffd"):
            return ""
        self._stream = self._stream_from(self._context + self.ids)
        return self._after_context(full)

    def _final_text(self) -> str:
        return self._after_context(
            self._backend.decode(self._context + self.ids, self.skip_special_tokens)
        )

    def _after_context(self, full: str) -> str:
        """`full` (the text of context + ids) less the context's text; a broken character the
        context ends with is the output's once an output token completes it."""
        for head in (self._context_text, self._context_text.rstrip("\ufffd")):
            if full.startswith(head):
                return full[len(head) :]
        return self._backend.decode(self.ids, self.skip_special_tokens)


def load_chat_template(value: str) -> str:
    """A chat template given as a file path or as the Jinja text itself (vLLM's --chat-template);
    ValueError when it is neither a readable file nor a template that compiles."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    path = Path(value).expanduser()
    looks_like_path = "{" not in value and "\n" not in value
    if looks_like_path:
        if not path.is_file():
            raise ValueError(f"--chat-template {value!r}: no such file (nor Jinja text)")
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {path}: cannot read it: {e}") from None
    try:
        _compile_jinja_template(value)  # the environment apply_chat_template renders in
    except Exception as e:  # jinja2.TemplateSyntaxError and friends
        raise ValueError(f"--chat-template is not a valid Jinja template: {e}") from None
    return value
