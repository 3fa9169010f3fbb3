"""Configuration: `ModelConfig`, one normalised view over the Hugging Face configs of the MoE
families, and `EngineConfig`, what an engine is built from, as frozen parts (model source, KV
cache, scheduler limits, cluster topology, failure policy), each checking itself once."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afd.choices import DISPATCH_DTYPES, DTYPE_NAMES, KERNEL_BACKENDS, TRANSPORTS
from afd.options import (
    check_choice,
    check_int,
    check_seconds,
    check_text,
    is_number,
    keywords,
    option,
)
from afd.quantization import QUANTIZATION_MODES, Fp8Config
from afd.spec import SpeculativeConfig, as_speculative_config, parse_speculative_json
from afd.threads import MAX_THREADS

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


def _first(hf: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(hf, name, None)
        if value is not None:
            return value
    return default


@dataclass
class ModelConfig:
    """The fields AFD needs, read from a transformers config (`hf` keeps the original)."""

    hf: Any
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: list[int]
    bos_token_id: int | None
    torch_dtype: str | None
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    # MLA (DeepSeek); zero / None elsewhere
    is_mla: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # rotary: rope_scaling is None for plain RoPE, else transformers' rope_parameters (e.g. YaRN)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = False
    # which layers are MoE (the family's own rule reads these, see is_moe_layer)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # block-FP8 checkpoint (quantization_config); None for bf16/fp32 weights
    quant: Fp8Config | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a model directory; clear errors for missing/unsupported."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        raw = json.loads(config_file.read_text())
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: dict) -> ModelConfig:
        from transformers import AutoConfig

        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; "
                f"AFD supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        fields = {k: v for k, v in raw.items() if k != "model_type"}
        if "torch_dtype" in fields:  # the pre-transformers-5 name
            fields.setdefault("dtype", fields.pop("torch_dtype"))
        return cls.from_hf(AutoConfig.for_model(model_type, **fields))

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """From a config.json dict or a transformers `PretrainedConfig`."""
        if isinstance(hf, dict):
            return cls.from_hf_dict(hf)
        model_type = hf.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; "
                f"AFD supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        is_mla = model_type.startswith("deepseek")
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        num_heads = hf.num_attention_heads
        # transformers 5 reads config.json's torch_dtype into `dtype` (the old attribute warns)
        dtype = getattr(hf, "dtype", None)
        # transformers 5 folds old-style rope_theta / rope_scaling into rope_parameters
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        rope_theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            hf=hf,
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=_first(hf, "num_key_value_heads", default=num_heads),
            head_dim=_first(hf, "head_dim", default=hf.hidden_size // num_heads),
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
            torch_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            n_routed_experts=_first(hf, "n_routed_experts", "num_local_experts", "num_experts"),
            num_experts_per_tok=hf.num_experts_per_tok,
            moe_intermediate_size=hf.moe_intermediate_size,
            is_mla=is_mla,
            q_lora_rank=getattr(hf, "q_lora_rank", None) if is_mla else None,
            kv_lora_rank=getattr(hf, "kv_lora_rank", 0) if is_mla else 0,
            qk_nope_head_dim=getattr(hf, "qk_nope_head_dim", 0) if is_mla else 0,
            qk_rope_head_dim=getattr(hf, "qk_rope_head_dim", 0) if is_mla else 0,
            v_head_dim=getattr(hf, "v_head_dim", 0) if is_mla else 0,
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type != "default" else None,
            # DeepSeek-V2 always pairs adjacent dims; V3 only when rope_interleave is set
            rope_interleave=model_type == "deepseek_v2"
            or (model_type == "deepseek_v3" and bool(getattr(hf, "rope_interleave", False))),
            decoder_sparse_step=getattr(hf, "decoder_sparse_step", None) or 1,
            mlp_only_layers=tuple(getattr(hf, "mlp_only_layers", None) or ()),
            first_k_dense_replace=getattr(hf, "first_k_dense_replace", None) or 0,
            moe_layer_freq=getattr(hf, "moe_layer_freq", None) or 1,
            quant=Fp8Config.from_hf(getattr(hf, "quantization_config", None)),
        )

    def is_moe_layer(self, i: int) -> bool:
        """Same rule as transformers' decoder layer for the family."""
        if self.n_routed_experts <= 0:
            return False
        if self.is_mla:
            # transformers ignores moe_layer_freq; every published checkpoint has it at 1
            return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
        step = self.decoder_sparse_step
        return i not in self.mlp_only_layers and (i + 1) % step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def kv_cache_block_shape(self, block_size: int) -> tuple[tuple[int, ...], int]:
        """(shape of one cache tensor per block, tensors per layer): MLA 1 latent, GQA K and V."""
        if self.is_mla:
            return (block_size, self.kv_lora_rank + self.qk_rope_head_dim), 1
        return (block_size, self.num_key_value_heads, self.head_dim), 2

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        """Shapes of one layer's cache tensors: GQA [k, v] [N, bs, Hkv, D]; MLA [N, bs, L + R]."""
        shape, n = self.kv_cache_block_shape(block_size)
        return [(num_blocks, *shape)] * n


DTYPES = DTYPE_NAMES  # torch dtypes by these names (torch_dtype); a tuple keeps torch out
# vLLM's dtype names, as it spells them too
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
DTYPE_CHOICES = ("auto", *DTYPES, *DTYPE_ALIASES)
DEVICES = ("cpu", "cuda")
INT64 = (-(2**63), 2**63 - 1)


def dtype_name(text: str) -> str:
    """A --dtype value in AFD's spelling (vLLM's half and float too); ValueError otherwise."""
    value = DTYPE_ALIASES.get(text, text)
    if value != "auto" and value not in DTYPES:
        raise ValueError(f"invalid choice {text!r} (choose from {', '.join(DTYPE_CHOICES)})")
    return value


def _check_transport(name: str) -> None:
    """A built-in transport is checked without torch; another one asks the registry."""
    if name not in TRANSPORTS:
        from afd.comm.dispatch import transport_names

        check_choice("comm backend", name, transport_names())


def _check_optional_text(self: Any, *names: str) -> None:
    for name in names:
        if getattr(self, name) is not None:
            check_text("--" + name.replace("_", "-"), getattr(self, name))


@dataclass(frozen=True)
class ModelSource:
    """Where the weights and the tokenizer come from, and how the weights are held."""

    model: str = option(
        "tiny-qwen3-moe",
        "a model directory, a built-in tiny model or a Hugging Face Hub id (org/name)",
    )
    # a Hub revision (branch, tag or commit) and cache folder for org/name ids
    revision: str | None = option(
        None, "Hub revision (branch, tag or commit) of an org/name model (default: main)"
    )
    download_dir: str | None = option(
        None, "Hugging Face cache folder for Hub models (default: $HF_HOME/hub)"
    )
    # a different tokenizer (directory or Hub id) and a chat template (file or Jinja text)
    tokenizer: str | None = option(
        None, "another tokenizer: a directory or Hub id with tokenizer.json (default: the model's)"
    )
    chat_template: str | None = option(
        None, "a chat template: a Jinja file or the template text (default: the tokenizer's)"
    )
    dtype: str = option(
        "auto",
        "weights and activations: auto (the checkpoint's; float32 for float16 on CPU), "
        "float32, bfloat16, float16 (vLLM's half and float too)",
        parse=dtype_name,
    )
    # auto: keep a block-FP8 checkpoint in FP8 on CUDA, dequantize it on CPU; fp8: keep (or
    # quantize) the weights in FP8; none: dequantize while loading (vLLM's names)
    quantization: str = option(
        "auto",
        "fp8: keep (or make) block-FP8 weights; none: dequantize FP8 checkpoints while "
        "loading; auto: FP8 checkpoints stay FP8 on CUDA, are dequantized on CPU",
        choices=QUANTIZATION_MODES,
    )
    # The default seed of requests that set none: request i gets a seed derived from (seed, i),
    # so a run's requests are reproducible in order (vLLM's --seed). None: unseeded.
    seed: int | None = option(
        None,
        "seed of requests that give none: each gets one derived from this and its arrival "
        "order, so a run repeats (default: unseeded)",
    )

    def __post_init__(self) -> None:
        check_text("--model", self.model)
        _check_optional_text(self, "revision", "download_dir", "tokenizer", "chat_template")
        if isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        check_choice("dtype", self.dtype, ("auto", *DTYPES))
        check_choice("quantization", self.quantization, QUANTIZATION_MODES)
        if self.seed is not None:
            check_int("--seed", self.seed, *INT64)


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache: block size, how many blocks, prefix caching."""

    block_size: int = option(16, "tokens per KV-cache block")
    num_kv_blocks: int | None = option(  # default: kv_cache_memory_mb worth of blocks
        None,
        "KV-cache blocks per cache (default: from --gpu-memory-utilization or "
        "--kv-cache-memory-mb)",
        aliases=("--num-gpu-blocks-override",),
    )
    # Fraction of the device's memory (CPU: of the RAM available at start) for weights and KV
    # cache together; sets the KV cache size unless num_kv_blocks is given (vLLM's name).
    gpu_memory_utilization: float | None = option(
        None,
        "fraction of memory for weights + KV cache: of each GPU, or on CPU of the RAM "
        "available at start (all workers together); sizes the KV cache (default: "
        "--kv-cache-memory-mb)",
    )
    kv_cache_memory_mb: int = option(
        256, "KV-cache size per cache, unless --num-kv-blocks or --gpu-memory-utilization"
    )
    enable_prefix_caching: bool = option(
        True,
        "reuse the KV blocks of prompt prefixes seen before",
        negatable=True,
        off=("--no-prefix-caching", "same as --no-enable-prefix-caching"),
    )

    def __post_init__(self) -> None:
        check_int("--block-size", self.block_size, 1, 2**16)
        if self.num_kv_blocks is not None:
            check_int("--num-kv-blocks", self.num_kv_blocks, 1)
        util = self.gpu_memory_utilization
        if util is not None and not (is_number(util) and 0 < util <= 1):  # also NaN
            raise ValueError(f"--gpu-memory-utilization must be a fraction in (0, 1], got {util}")
        check_int("--kv-cache-memory-mb", self.kv_cache_memory_mb, 1)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError("--enable-prefix-caching must be True or False")


@dataclass(frozen=True)
class SchedulerLimits:
    """How much a scheduling step may take on."""

    max_num_seqs: int = option(64, "sequences in a running batch (per replica)")
    max_num_batched_tokens: int = option(
        512, "tokens per forward: prefill chunks and decodes share it"
    )
    max_model_len: int | None = option(  # default: the model's max_position_embeddings
        None, "context length: prompt + output tokens (default: the model's)"
    )
    # Decode steps per scheduling step (vLLM's multi-step scheduling): workers feed each sampled
    # token back themselves, and the micro-batch pipeline runs on across the steps.
    num_scheduler_steps: int = option(
        1, "decode steps per scheduling step (workers feed sampled tokens back themselves)"
    )
    speculative_config: SpeculativeConfig | None = option(
        None,
        "speculative decoding, vLLM's JSON object: keys method (ngram | mtp), "
        "num_speculative_tokens, prompt_lookup_max, prompt_lookup_min",
        parse=parse_speculative_json,
        metavar="JSON",
    )

    def __post_init__(self) -> None:
        check_int("--max-num-seqs", self.max_num_seqs, 1)
        check_int("--max-num-batched-tokens", self.max_num_batched_tokens, 1)
        if self.max_model_len is not None:
            if is_number(self.max_model_len) and self.max_model_len < 2:
                raise ValueError(
                    "--max-model-len must be at least 2 (a prompt token and an output token)"
                )
            check_int("--max-model-len", self.max_model_len, 2)
        check_int("--num-scheduler-steps", self.num_scheduler_steps, 1, 1024)
        # a dict from LLM(...) or from a decoded record becomes the validated config
        spec = as_speculative_config(self.speculative_config)
        object.__setattr__(self, "speculative_config", spec)


WORKER_POOLS = ("num_prefill_workers", "num_attention_workers", "num_expert_workers")
MAX_WORKERS = 4096  # per pool


def worker_count_error(prefill: int, attention: int, expert: int) -> str | None:
    """Why these pool sizes cannot run together, naming the flags that fix it; None when they
    can (0/0/0 is the single process, attention and expert workers >= 1 a cluster)."""
    for flag, n in (("prefill", prefill), ("attention", attention), ("expert", expert)):
        if not isinstance(n, int) or isinstance(n, bool):
            return f"--num-{flag}-workers must be an integer, got {n!r:.40}"
        if n < 0:
            return f"--num-{flag}-workers must be >= 0, got {n}"
        if n > MAX_WORKERS:
            return f"--num-{flag}-workers must be at most {MAX_WORKERS}, got {n}"
    one_process = "for one process"
    if attention and not expert:
        return (
            f"--num-attention-workers {attention} needs expert workers: add "
            f"--num-expert-workers N (N >= 1), or give --num-attention-workers 0 {one_process}"
        )
    if expert and not attention:
        return (
            f"--num-expert-workers {expert} needs attention workers: add "
            f"--num-attention-workers N (N >= 1), or give --num-expert-workers 0 {one_process}"
        )
    if prefill and not attention:
        return (
            f"--num-prefill-workers {prefill} needs a disaggregated cluster: add "
            "--num-attention-workers N and --num-expert-workers N (N >= 1), or give "
            f"--num-prefill-workers 0 {one_process}"
        )
    return None


def resolve_worker_counts(given: dict[str, int | None], defaults: dict[str, int]) -> dict[str, int]:
    """The pool sizes, those not given (None) from `defaults`; with --num-attention-workers or
    --num-expert-workers given as 0 (one process) the pools not given are 0, so that
    `afd serve M --num-attention-workers 0` alone runs colocated."""
    colocated = 0 in (given.get("num_attention_workers"), given.get("num_expert_workers"))
    return {
        name: (0 if colocated else defaults[name]) if given.get(name) is None else given[name]
        for name in WORKER_POOLS
    }


def parse_node_roles(text: str | None, nnodes: int) -> dict[int, list[str]]:
    """'0=prefill,attention;1=expert' -> {0: [...], 1: [...]}; default: node 0 prefill and
    attention, the other nodes experts (node 0 too when it is the only node)."""
    if not text:
        roles = {0: ["prefill", "attention"]}
        for n in range(1, nnodes):
            roles[n] = ["expert"]
        if nnodes == 1:
            roles[0].append("expert")
        return roles
    out: dict[int, list[str]] = {}
    for part in text.split(";"):
        node, _, names = part.partition("=")
        try:
            n = int(node)
        except ValueError:
            raise ValueError(f"--node-roles: bad node {node!r} in {text!r}") from None
        if not 0 <= n < nnodes:
            raise ValueError(f"--node-roles: node {n} is outside 0..{nnodes - 1}")
        bad = [r for r in names.split(",") if r not in ("prefill", "attention", "expert")]
        if bad or not names:
            raise ValueError(f"--node-roles: unknown role {bad[0] if bad else ''!r} for node {n}")
        out[n] = names.split(",")
    return out


_POOL_DEFAULT = "(default: {workers}{colocated})"


@dataclass(frozen=True)
class ClusterConfig:
    """The topology: where workers run, how many of each role, how they talk, on which nodes."""

    device: str = option("cpu", "where workers run", choices=DEVICES)
    kernel_backend: str = option(
        "auto",
        "auto: Triton kernels for CUDA tensors, the cpu fast paths for CPU tensors; torch: "
        "the references everywhere",
        choices=KERNEL_BACKENDS,
    )
    native_kernels: bool = option(
        True,
        "the compiled CPU kernels (fp32 fused MoE; gcc at first use) where they apply; "
        "--no-native-kernels: the torch fast paths (as AFD_NATIVE_KERNELS=0)",
        negatable=True,
    )
    # Disaggregated decode (0 attention workers = everything in this process). On the command
    # line a pool not given is None until resolve_worker_counts fills it in.
    num_prefill_workers: int = option(  # 0: attention workers prefill too
        0,
        f"prefill pool size, 0: attention workers prefill too {_POOL_DEFAULT}",
        flag_default=None,
    )
    num_attention_workers: int = option(
        0,
        "attention workers (KV cache, attention, sampling); 0 runs the whole model in "
        "this process, and the other pools default to 0 (default: {workers})",
        flag_default=None,
    )
    num_expert_workers: int = option(
        0,
        f"expert workers, each holding a shard of the routed experts {_POOL_DEFAULT}",
        flag_default=None,
    )
    num_micro_batches: int = option(
        1, "micro-batches ping-ponging between attention and expert workers"
    )
    comm_backend: str = option(
        "auto",
        "A<->F transport: shm on one CPU node, torch (gloo/NCCL) across nodes, deepep",
        choices=TRANSPORTS,
    )
    # A->F activations on the wire: auto = the compute dtype; fp8 = e4m3 + a float32 scale per
    # 128 channels (DeepEP's low-latency format), dequantized by the expert worker
    dispatch_dtype: str = option(
        "auto",
        "A->F activations: the compute dtype (auto) or e4m3 + a float32 scale per 128 "
        "channels (fp8); combine stays in the compute dtype",
        choices=DISPATCH_DTYPES,
    )
    # GPUs a node's workers share (None: one GPU per worker, an error when a node has too few);
    # fewer GPUs than workers puts several workers on one GPU (the world then runs over gloo)
    gpus_per_node: int | None = option(
        None,
        "GPUs a node's workers share, several workers per GPU when fewer than workers "
        "(default: one GPU per worker)",
    )
    # Several nodes: node 0 runs the scheduler and HTTP server (see `afd serve --nnodes`).
    nnodes: int = option(1, "nodes in the cluster", scope="nodes")
    dist_init_addr: str | None = option(None, "HOST:PORT of node 0 (nnodes > 1)", scope="nodes")
    node_roles: str | None = option(
        None,
        "which roles run where, e.g. '0=prefill,attention;1=expert' (default: node 0 "
        "prefill and attention, the others experts)",
        scope="nodes",
    )
    # the HMAC key of every control message (comm/auth); generated when one node runs alone
    cluster_secret_file: str | None = option(
        None,
        "file holding the cluster's secret (the same on every node; needed with --nnodes > 1; "
        "one node generates one)",
        scope="nodes",
    )
    # torch intra-op threads (vLLM and SGLang leave them to OMP_NUM_THREADS and
    # *_CPU_OMP_THREADS_BIND); None: chosen from the cores by afd.threads.thread_plan
    num_threads_per_worker: int | None = option(
        None,
        "torch intra-op threads of each process running the model: the colocated engine, each "
        "worker (default: colocated all cores; a cluster splits the cores evenly among a "
        "node's workers; the API server and a cluster's driver run 1)",
    )
    progress: bool = False  # print each worker's start-up (the launcher's start-up lines)

    def __post_init__(self) -> None:
        check_choice("device", self.device, DEVICES)
        check_choice("kernel backend", self.kernel_backend, KERNEL_BACKENDS)
        error = worker_count_error(
            self.num_prefill_workers, self.num_attention_workers, self.num_expert_workers
        )
        if error:
            raise ValueError(error)
        check_int("--num-micro-batches", self.num_micro_batches, 1, 1024)
        _check_transport(self.comm_backend)
        check_choice("dispatch dtype", self.dispatch_dtype, DISPATCH_DTYPES)
        if self.gpus_per_node is not None:
            check_int("--gpus-per-node", self.gpus_per_node, 1, 1 << 16)
        check_int("--nnodes", self.nnodes, 1, 1 << 16)
        if self.num_threads_per_worker is not None:
            check_int("--num-threads-per-worker", self.num_threads_per_worker, 1, MAX_THREADS)
        self._check_nodes()

    def _check_nodes(self) -> None:
        if self.cluster_secret_file is not None:
            from afd.comm.auth import read_secret_file

            read_secret_file(self.cluster_secret_file)  # missing, unreadable, empty: now
        if self.nnodes == 1:
            return
        if self.comm_backend == "shm":
            raise ValueError("--comm-backend shm needs every worker on one node; use torch")
        addr = self.dist_init_addr
        host, _, port = (addr or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
        parse_node_roles(self.node_roles, self.nnodes)


@dataclass(frozen=True)
class FailurePolicy:
    """Failures: each node's supervisor replaces a dead (or hung) worker at most
    max_worker_restarts times within restart_window_s; past that the cluster stops serving."""

    max_worker_restarts: int = option(
        5,
        "replacements of dead or hung workers allowed per node within --restart-window-s; "
        "past that the service stops (HTTP 503, exit code 1)",
    )
    restart_window_s: float = option(600.0, "the window --max-worker-restarts counts in, seconds")
    # A worker whose main thread makes no progress for worker_timeout_s (or that stops sending
    # heartbeats, e.g. SIGSTOP) is killed and replaced; a healthy step of a batch of 512 on 2 CPU
    # cores takes ~0.5 s, and the check counts each layer and each wait as progress.
    worker_timeout_s: float = option(
        60.0, "a worker without progress (or heartbeat) this long is killed and replaced"
    )
    # Both directions of node loss: a node > 0 whose node 0 stops answering this long stops its
    # workers and exits; node 0 stops serving when a node's workers leave it waiting this long.
    node_timeout_s: float = option(
        60.0,
        "a node silent this long is lost: node 0 stops serving (HTTP 503), another node stops "
        "its workers",
        scope="nodes",
    )

    def __post_init__(self) -> None:
        n = self.max_worker_restarts
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError("--max-worker-restarts must be >= 0")
        check_int("--max-worker-restarts", n, 0)
        check_seconds("--restart-window-s", self.restart_window_s)
        check_seconds("--worker-timeout-s", self.worker_timeout_s)
        check_seconds("--node-timeout-s", self.node_timeout_s)


# EngineConfig's parts: attribute -> type, in the order their flags are listed
PARTS: dict[str, type] = {
    "source": ModelSource,
    "cache": CacheConfig,
    "limits": SchedulerLimits,
    "cluster": ClusterConfig,
    "failure": FailurePolicy,
}


@functools.cache
def _flat_names() -> dict[str, tuple[str, str]]:
    """Flat keyword (vLLM's names and aliases) -> (part, field)."""
    out = {}
    for part, cls in PARTS.items():
        for key, name in keywords(cls).items():
            out[key] = (part, name)
    return out


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an engine, as parts; the cluster part picks the executor.
    `EngineConfig.from_flat(model=..., block_size=...)` takes vLLM's flat keywords."""

    source: ModelSource = field(default_factory=ModelSource)
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: SchedulerLimits = field(default_factory=SchedulerLimits)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    failure: FailurePolicy = field(default_factory=FailurePolicy)

    def __post_init__(self) -> None:
        for part, cls in PARTS.items():
            if not isinstance(getattr(self, part), cls):
                raise TypeError(f"EngineConfig.{part} must be a {cls.__name__}")

    @classmethod
    def keywords(cls) -> set[str]:
        """Every flat keyword from_flat takes."""
        return set(_flat_names())

    @classmethod
    def from_flat(cls, **kwargs: Any) -> EngineConfig:
        """From flat keywords, as `LLM(...)` and vLLM's EngineArgs take them; each goes to the
        part declaring it. An unknown keyword is a TypeError naming it."""
        where = _flat_names()
        unknown = sorted(set(kwargs) - set(where))
        if unknown:
            raise TypeError(f"unknown EngineConfig argument(s): {', '.join(unknown)}")
        parts: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
        for key, value in kwargs.items():
            part, name = where[key]
            if name in parts[part]:
                raise TypeError(f"{key} and {name} are the same setting; give one")
            parts[part][name] = value
        return cls(**{part: PARTS[part](**values) for part, values in parts.items()})

    def flat(self) -> dict[str, Any]:
        """Every setting under its flat keyword (what from_flat takes back)."""
        return {
            f.name: getattr(getattr(self, part), f.name)
            for part in PARTS
            for f in dataclasses.fields(PARTS[part])
        }

    def replace(self, **kwargs: Any) -> EngineConfig:
        """A copy with some settings changed, given as flat keywords."""
        where = _flat_names()
        unknown = sorted(set(kwargs) - set(where))
        if unknown:
            raise TypeError(f"unknown EngineConfig argument(s): {', '.join(unknown)}")
        parts: dict[str, dict[str, Any]] = {}
        for key, value in kwargs.items():
            part, name = where[key]
            parts.setdefault(part, {})[name] = value
        changed = {p: dataclasses.replace(getattr(self, p), **v) for p, v in parts.items()}
        return dataclasses.replace(self, **changed)

    def torch_dtype(self, model_config: ModelConfig) -> torch.dtype:
        """The compute dtype: --dtype, or for auto the checkpoint's (float32 for float16 on
        CPU: fp16 matmuls on CPU are slow and inexact)."""
        import torch

        if self.source.dtype != "auto":
            return getattr(torch, self.source.dtype)
        name = model_config.torch_dtype or "float32"
        if self.cluster.device == "cpu" and name == "float16":
            name = "float32"
        return getattr(torch, name if name in DTYPES else "float32")
