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

from afd.cache import cache_dir

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


def builtin_model_dir(name: str) -> Path:
    """Where built-in model `name` lives once generated."""
    return cache_dir() / "models" / f"{name}-v{VERSION}"


def resolve_tokenizer(tokenizer: str | None, download_dir: str | None, model_path: Path) -> Path:
    """The tokenizer's directory: --tokenizer's (a directory or Hub id), else the model's."""
    if not tokenizer:
        return Path(model_path)
    return resolve_model(tokenizer, None, download_dir, tokenizer_only=True)


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
    from afd.tokenizer import Tokenizer

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


# ---- the built-in tokenizer: byte-level BPE trained on a built-in corpus ----------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen's ChatML layout; list-of-parts content (OpenAI style) is joined from its text parts.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts model routes every token to a
few experts, and only those experts run for that token. Attention workers hold the key value cache
while expert workers hold the weights of the experts. Micro batches ping pong between the two
sides so that both of them stay busy, and the time spent sending hidden states is hidden behind
the time spent computing.

Hello, my name is Ada and I like to write programs in Python. What is the capital of France?
Paris is the capital of France. Berlin is the capital of Germany, Rome is the capital of Italy,
and Madrid is the capital of Spain. Tokyo, Beijing, Seoul and Delhi are large cities in Asia.

Once upon a time there was a small model that generated random text. It lived on a server in a
cold room full of humming machines. Every morning the operators asked it questions, and every
morning it answered with words that nobody could understand. Still, they were proud of it.

User: How are you today?
Assistant: I am fine, thank you for asking. How can I help you?
User: Please summarise the following paragraph in one sentence.
Assistant: Sure! Here is a short summary of the paragraph you sent me.

def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(i, fibonacci(i))

{"name": "weather", "arguments": {"city": "London", "unit": "celsius"}}
<html><body><p>Welcome to the home page.</p></body></html>
SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;

Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 42 64 100 128 256 512 1000 1024 2048 4096 65536.
Dates and times: 2024-01-15, 12:30:45, Monday, Tuesday, Wednesday, Thursday, Friday.
Punctuation: commas, periods. Questions? Exclamations! Quotes "like this" and 'like that';
parentheses (round) [square] {curly} <angle>; dashes - and -- and slashes / \\ | ~ ^ * & % $ # @.

Some words from other languages: café, naïve, résumé, über, Straße, señor, smörgåsbord,
日本語, 中文, 한국어, русский язык, ελληνικά, العربية, हिन्दी, and a few emoji: 🙂 🚀 ✨.

Science: water boils at one hundred degrees Celsius at sea level. The speed of light is about
three hundred thousand kilometres per second. Energy equals mass times the speed of light squared.
The mitochondria is the powerhouse of the cell. Plants turn sunlight, water and carbon dioxide
into sugar and oxygen.
"""

_SUBJECTS = ["The model", "A worker", "The scheduler", "Each expert", "My friend", "The cat"]
_VERBS = ["reads", "writes", "sends", "computes", "finds", "keeps", "likes", "moves"]
_OBJECTS = ["the cache", "a token", "many numbers", "the answer", "some data", "a long story"]
_ENDINGS = [".", "!", "?", " quickly.", " again.", " every day."]


def builtin_corpus() -> str:
    """A few KB of varied English (plus code, numbers, non-ASCII), the same on every call."""
    lines = []
    # Deterministic walk over subject/verb/object combinations: varied, reproducible text.
    for i in range(120):
        s = _SUBJECTS[i % len(_SUBJECTS)]
        v = _VERBS[(i * 3) % len(_VERBS)]
        o = _OBJECTS[(i * 5) % len(_OBJECTS)]
        e = _ENDINGS[(i * 7) % len(_ENDINGS)]
        lines.append(f"{s} {v} {o}{e} ({i * 37 % 1000})")
    return _CORPUS + "\n".join(lines) + "\n"


def train_bytelevel_bpe(
    out_dir: str | Path,
    vocab_size: int,
    seed_text: str | None = None,
    *,
    chat_template: str = CHATML_TEMPLATE,
) -> None:
    """Train a byte-level BPE tokenizer of exactly `vocab_size` ids on a built-in corpus (plus
    `seed_text`); writes tokenizer.json and tokenizer_config.json, byte-identical per input."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} for byte-level BPE")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = builtin_corpus() + (seed_text or "")
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    # A small corpus runs out of merges before a large vocab is full; reserved special tokens fill
    # the rest so every id a model of this vocab size can emit decodes.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"trained vocabulary has {tok.get_vocab_size()} ids, not {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": chat_template,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# Benchmark models: tiny random MoE checkpoints shaped so that on a CPU the attention side and
# the expert side take the balance the name says (generated once into the AFD cache, resolved by
# name like the built-ins). The three Qwen3-MoE shapes are the ones the profiler and planner were
# tuned on; the held-out ones are other architectures, for accuracy the step model was never
# fitted to (docs/planner.md).
# Eight layers each: filling and draining the ping-pong costs about one layer of one side.
_COMMON = dict(num_hidden_layers=8, mlp_only_layers=[], intermediate_size=512, head_dim=64)
BENCH_MODELS: dict[str, dict] = {
    # attention (projections + paged attention over ~32-64 tokens) ~ experts (top-2 of 4)
    "bench-balanced-moe": dict(
        _COMMON,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=768,
    ),
    # many KV heads and cheap experts: the attention side dominates, more so at long context
    "bench-attention-heavy": dict(
        _COMMON,
        hidden_size=256,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_experts=8,
        num_experts_per_tok=1,
        moe_intermediate_size=128,
    ),
    # one KV head and wide top-4 experts: the expert side dominates
    "bench-expert-heavy": dict(
        _COMMON,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=1024,
    ),
    # held out: DeepSeek-V2-style MLA (compressed KV, decoupled RoPE), a dense first layer,
    # shared experts beside group-limited top-2 routing
    "bench-heldout-mla": dict(
        family="deepseek-v2",
        num_hidden_layers=8,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=1024,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=512,
    ),
    # held out: Qwen2-MoE, a gated shared expert on every layer, QKV bias, unnormalised top-4
    "bench-heldout-qwen2-moe": dict(
        family="qwen2-moe",
        num_hidden_layers=8,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=1024,
    ),
}
HELD_OUT = ("bench-heldout-mla", "bench-heldout-qwen2-moe")
_BENCH_VERSION = {"bench-balanced-moe": 5}


def bench_model_path(name: str) -> Path:
    """The checkpoint of benchmark model `name`, built on first use."""
    from afd.models.tiny import build_tiny_checkpoint

    path = cache_dir() / "models" / f"{name}-v{_BENCH_VERSION.get(name, 1)}"
    if not (path / "config.json").is_file():
        shape = dict(BENCH_MODELS[name])
        family = shape.pop("family", "qwen3-moe")
        train_bytelevel_bpe(path, VOCAB_SIZE)
        build_tiny_checkpoint(family, path, seed=0, vocab_size=VOCAB_SIZE, **shape)
    return path
