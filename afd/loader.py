"""Weight loading from Hugging Face safetensors, tensor by tensor, only what a part owns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from afd.config import ModelConfig
from afd.models import build_model

_EXPERT_KEY = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$"
)


def safetensors_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from the sharded index or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in model directory {model_dir}")
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                names[name] = f
    return names


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    part: str = "full",
    expert_range: tuple[int, int] | None = None,
) -> nn.Module:
    """Build the `part` ('full', 'attention', 'experts') and fill it from the checkpoint."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config = ModelConfig.from_pretrained(model_dir)
    dtype = _resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = build_model(config, part, expert_range)
    # cast on meta first so only the target dtype is ever allocated
    model = model.to(dtype).to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _keep_router_bias_fp32(model)
    targets = dict(model.named_parameters())
    targets.update(
        {k: v for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")}
    )
    loaded: set[str] = set()
    files = safetensors_files(model_dir)
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        if not f.is_file():
            raise FileNotFoundError(f"weight file {f} named in the checkpoint index is missing")
        with safe_open(str(f), framework="pt") as st:
            for name in names:
                dest = _destination(name, model, part, targets)
                if dest is None:
                    continue
                target_name, param, index = dest
                if target_name not in targets:
                    continue
                tensor = st.get_tensor(name)
                with torch.no_grad():
                    view = param if index is None else param[index]
                    if view.shape != tensor.shape:
                        raise ValueError(
                            f"{name}: checkpoint shape {tuple(tensor.shape)} does not match "
                            f"the model's {tuple(view.shape)}"
                        )
                    view.copy_(tensor.to(param.dtype))
                loaded.add(target_name if index is None else f"{target_name}[{index}]")
    _check_complete(model, targets, loaded, part)
    return model.eval()


def _resolve_dtype(dtype: torch.dtype | str, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = config.torch_dtype or "float32"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(table)}")
    return table[dtype]


def _keep_router_bias_fp32(model: nn.Module) -> None:
    # the noaux_tc selection compares biased sigmoid scores in float32
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.data = buf.data.float()


def _destination(name: str, model: nn.Module, part: str, targets: dict[str, torch.Tensor]):
    """(our parameter name, tensor, index into a stacked expert tensor or None), or None to skip."""
    m = _EXPERT_KEY.match(name)
    if m is not None:
        layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        # layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction layer) are unused
        cfg = model.config
        if part == "attention" or layer >= cfg.num_hidden_layers or not cfg.is_moe_layer(layer):
            return None
        shard = (
            model.experts[str(layer)]
            if part == "experts"
            else model.model.layers[layer].mlp.experts
        )
        if not shard.start <= expert < shard.end:
            return None
        local = expert - shard.start
        inter = shard.w2.shape[-1]
        prefix = f"experts.{layer}" if part == "experts" else f"model.layers.{layer}.mlp.experts"
        if proj == "down":
            return f"{prefix}.w2", shard.w2, local
        rows = slice(0, inter) if proj == "gate" else slice(inter, 2 * inter)
        return f"{prefix}.w13", shard.w13, (local, rows)
    if part == "experts" or name not in targets:
        return None
    return name, targets[name], None


def _check_complete(
    model: nn.Module, targets: dict[str, torch.Tensor], loaded: set[str], part: str
) -> None:
    stacked: dict[str, int] = {}
    for item in loaded:
        if "[" in item:
            base = item.split("[", 1)[0]
            stacked[base] = stacked.get(base, 0) + 1
    missing = []
    for name in sorted(targets):
        if name.endswith(".w13") or name.endswith(".w2"):
            per = 2 if name.endswith(".w13") else 1
            if stacked.get(name, 0) != per * targets[name].shape[0]:
                missing.append(name)
        elif name not in loaded:
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint is missing tensors for {part} part: {', '.join(missing[:8])}")


def count_parameter_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
