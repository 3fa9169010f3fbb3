"""Model configuration: one normalised view over the Hugging Face configs of the MoE families."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        return cls.from_hf(AutoConfig.for_model(model_type, **fields))

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        model_type = hf.model_type
        is_mla = model_type.startswith("deepseek")
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        num_heads = hf.num_attention_heads
        dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
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
        )

    def is_moe_layer(self, i: int) -> bool:
        """Same rule as transformers' decoder layer for the family."""
        hf = self.hf
        if self.is_mla:
            return i >= (getattr(hf, "first_k_dense_replace", 0) or 0)
        mlp_only = getattr(hf, "mlp_only_layers", None) or []
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        return i not in mlp_only and self.n_routed_experts > 0 and (i + 1) % step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def kv_cache_block_shape(self, block_size: int) -> tuple[tuple[int, ...], int]:
        """(shape of one cache tensor per block, tensors per layer): MLA 1 latent, GQA K and V."""
        if self.is_mla:
            return (block_size, self.kv_lora_rank + self.qk_rope_head_dim), 1
        return (block_size, self.num_key_value_heads, self.head_dim), 2
