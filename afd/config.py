"""Model configuration: one normalised view over the Hugging Face configs of the MoE families."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from afd.quantization import Fp8Config

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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def worker_count_error(prefill: int, attention: int, expert: int) -> str | None:
    """Why these pool sizes cannot run together, naming the flags that fix it; None when they
    can (0/0/0 is the single process, attention and expert workers >= 1 a cluster)."""
    for flag, n in (("prefill", prefill), ("attention", attention), ("expert", expert)):
        if n < 0:
            return f"--num-{flag}-workers must be >= 0, got {n}"
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


@dataclass
class EngineConfig:
    """Everything needed to build an engine; topology fields pick the executor."""

    model: str = "tiny-qwen3-moe"
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: kv_cache_memory_mb worth of blocks
    kv_cache_memory_mb: int = 256
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # Fraction of the device's memory (CPU: of the RAM available at start) for weights and KV
    # cache together; sets the KV cache size unless num_kv_blocks is given (vLLM's name).
    gpu_memory_utilization: float | None = None
    # The default seed of requests that set none: request i gets a seed derived from (seed, i),
    # so a run's requests are reproducible in order (vLLM's --seed). None: unseeded.
    seed: int | None = None
    # Model sources: a Hub revision (branch, tag or commit) and cache folder for org/name ids;
    # a different tokenizer (directory or Hub id) and a chat template (file or Jinja text).
    revision: str | None = None
    download_dir: str | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    enable_prefix_caching: bool = True
    kernel_backend: str = "auto"
    # auto: keep a block-FP8 checkpoint in FP8 on CUDA, dequantize it on CPU; fp8: keep (or
    # quantize) the weights in FP8; none: dequantize while loading (vLLM's names)
    quantization: str = "auto"
    # Disaggregated decode (0 attention workers = everything in this process).
    num_prefill_workers: int = 0  # 0: attention workers prefill too
    num_attention_workers: int = 0
    num_expert_workers: int = 0
    num_micro_batches: int = 1
    # Decode steps per scheduling step (vLLM's multi-step scheduling): workers feed each sampled
    # token back themselves, and the micro-batch pipeline runs on across the steps.
    num_scheduler_steps: int = 1
    comm_backend: str = "auto"
    # A->F activations on the wire: auto = the compute dtype; fp8 = e4m3 + a float32 scale per
    # 128 channels (DeepEP's low-latency format), dequantized by the expert worker
    dispatch_dtype: str = "auto"
    # GPUs a node's workers share (None: one GPU per worker, an error when a node has too few);
    # fewer GPUs than workers puts several workers on one GPU (the world then runs over gloo)
    gpus_per_node: int | None = None
    # Several nodes: node 0 runs the scheduler and HTTP server (see `afd launch --nnodes`).
    nnodes: int = 1
    dist_init_addr: str | None = None
    node_roles: str | None = None
    # Failures: each node's supervisor replaces a dead (or hung) worker at most
    # max_worker_restarts times within restart_window_s; past that the cluster stops serving.
    # A worker whose main thread makes no progress for worker_timeout_s (or that stops sending
    # heartbeats, e.g. SIGSTOP) is killed and replaced; a healthy step of a batch of 512 on 2 CPU
    # cores takes ~0.5 s, and the check counts each layer and each wait as progress.
    max_worker_restarts: int = 5
    restart_window_s: float = 600.0
    worker_timeout_s: float = 60.0
    extra: dict = field(default_factory=dict)

    def torch_dtype(self, model_config: ModelConfig) -> torch.dtype:
        if self.dtype == "auto":
            name = model_config.torch_dtype or "float32"
            if self.device == "cpu" and name == "float16":
                name = "float32"  # fp16 matmuls on CPU are slow and inexact
            return DTYPES.get(name, torch.float32)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]
