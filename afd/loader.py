"""Weight loading from Hugging Face safetensors, tensor by tensor, only what a part owns."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from afd.config import ModelConfig
from afd.kernels import torch_ops
from afd.models import build_model
from afd.models.layers import convert_to_fp8
from afd.quantization import (
    SCALE_SUFFIX,
    Fp8Config,
    resolve_quantization,
    scale_name,
)

_EXPERT_KEY = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight(_scale_inv)?$"
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


def checkpoint_numel(model_dir: Path) -> tuple[int, int]:
    """(routed-expert elements, all other elements) of a checkpoint, from its headers only."""
    from safetensors import safe_open

    experts = rest = 0
    by_file: dict[Path, list[str]] = {}
    for name, f in safetensors_files(Path(model_dir)).items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as st:
            for name in names:
                numel = math.prod(st.get_slice(name).get_shape())
                if ".mlp.experts." in name:
                    experts += numel
                else:
                    rest += numel
    return experts, rest


class _Checkpoint:
    """Open safetensors files by tensor name (each file opened once), for reads out of order:
    a weight's scale may live in another shard."""

    def __init__(self, files: dict[str, Path], stack: contextlib.ExitStack):
        self.files, self.stack = files, stack
        self.handles: dict[Path, object] = {}

    def handle(self, f: Path):
        if f not in self.handles:
            if not f.is_file():
                raise FileNotFoundError(f"weight file {f} named in the checkpoint index is missing")
            from safetensors import safe_open

            self.handles[f] = self.stack.enter_context(safe_open(str(f), framework="pt"))
        return self.handles[f]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"checkpoint has an FP8 tensor {name[: -len(SCALE_SUFFIX)]} "
                             f"but no {name}")  # fmt: skip
        return self.handle(self.files[name]).get_tensor(name)

    def fp8_names(self) -> set[str]:
        """Names of the float8_e4m3fn tensors, read from the file headers only."""
        out = set()
        for name, f in self.files.items():
            if self.handle(f).get_slice(name).get_dtype() == "F8_E4M3":
                out.add(name)
        return out


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    part: str = "full",
    expert_range: tuple[int, int] | None = None,
    quantization: str = "auto",
    mtp: bool = False,
) -> nn.Module:
    """Build the `part` ('full', 'attention', 'experts') and fill it from the checkpoint.

    Block-FP8 weights stay FP8 where `quantization` keeps them (see resolve_quantization) and
    are otherwise dequantized one tensor at a time as they are read. `mtp` (part 'full' only)
    also loads DeepSeek-V3's multi-token-prediction layer as `model.mtp`, outside forward."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config = ModelConfig.from_pretrained(model_dir)
    dtype = _resolve_dtype(dtype, config)
    keep = resolve_quantization(quantization, config.quant, device)
    with torch.device("meta"):
        model = build_model(config, part, expert_range)
    # cast on meta first so only the target dtype is ever allocated
    model = model.to(dtype)
    files = safetensors_files(model_dir)
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(files, stack)
        if keep is not None:
            fp8 = ckpt.fp8_names() if config.quant is not None else None
            convert_to_fp8(model, keep, lambda n: fp8 is None or n in fp8)  # None: quantize all
        if mtp:  # after the FP8 switch: the MTP layer stays dense (FP8 weights dequantized)
            _attach_mtp(model, config, part, dtype, files)
        model = model.to_empty(device=device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        _keep_router_bias_fp32(model)
        targets = dict(model.named_parameters())
        targets.update(
            {k: v for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")}
        )
        loaded: set[str] = set()
        by_file: dict[Path, list[str]] = {}
        for name, f in files.items():
            by_file.setdefault(f, []).append(name)
        block = (config.quant or keep or Fp8Config()).block

        def store(name: str, tensor: torch.Tensor) -> None:
            target_name, param, index = _destination(name, model, part, targets)
            with torch.no_grad():
                view = param if index is None else param[index]
                if view.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(tensor.shape)} does not match "
                        f"the model's {tuple(view.shape)}"
                    )
                view.copy_(tensor.to(param.dtype))
            loaded.add(target_name if index is None else f"{target_name}[{index}]")

        for f, names in by_file.items():
            st = ckpt.handle(f)
            for name in names:
                dest = _destination(name, model, part, targets)
                if dest is None or dest[0] not in targets:
                    continue
                tensor = st.get_tensor(name)
                if not name.endswith(SCALE_SUFFIX):
                    tensor = _convert(tensor, name, dest[1], block, ckpt, store)
                store(name, tensor)
    _check_complete(model, targets, loaded, part)
    for module in model.modules():
        if hasattr(module, "fuse_qkv"):
            module.fuse_qkv()
    return model.eval()


def _convert(tensor, name, param, block, ckpt: _Checkpoint, store_scale):
    """A checkpoint weight in the form its parameter holds: dequantized when the checkpoint is FP8
    and the parameter is not; quantized (scales handed to store_scale) in the opposite case."""
    fp8 = torch_ops.FP8_DTYPE
    if tensor.dtype == fp8 and param.dtype != fp8:
        scale = ckpt.get(scale_name(name))
        want = tuple(-(-d // b) for d, b in zip(tensor.shape, block, strict=True))
        if tuple(scale.shape) != want:
            raise ValueError(
                f"{scale_name(name)}: shape {tuple(scale.shape)} does not match {want} "
                f"for a {tuple(tensor.shape)} weight in {list(block)} blocks"
            )
        return torch_ops.dequant_fp8(tensor, scale, block, param.dtype)
    if tensor.dtype != fp8 and param.dtype == fp8:
        q, scale = torch_ops.quant_fp8_blocks(tensor, block)
        store_scale(scale_name(name), scale)
        return q
    return tensor


def _expert_scale(shard, prefix: str, local: int, proj: str):
    """(name, scale parameter, index) of expert `local`'s `proj` scales in an FP8 shard."""
    if proj == "down":
        return f"{prefix}.w2_scale", shard.w2_scale, local
    half = shard.w13_scale.shape[1] // 2
    rows = slice(0, half) if proj == "gate" else slice(half, 2 * half)
    return f"{prefix}.w13_scale", shard.w13_scale, (local, rows)


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


def _attach_mtp(model: nn.Module, config: ModelConfig, part: str, dtype, files) -> None:
    from afd.models.mtp import MTPLayer, require_mtp

    require_mtp(config)
    if f"model.layers.{config.num_hidden_layers}.eh_proj.weight" not in files:
        raise ValueError(
            f"speculative method 'mtp': the checkpoint declares num_nextn_predict_layers but has "
            f"no MTP weights (model.layers.{config.num_hidden_layers}.eh_proj.weight)"
        )
    if part != "full":
        raise ValueError(f"the MTP drafter layer loads with part 'full', not {part!r}")
    with torch.device("meta"):
        model.mtp = MTPLayer(config).to(dtype)


def _mtp_name(name: str, model: nn.Module) -> str | None:
    """Our name for a tensor of the MTP layer (model.layers.{N}.*), '' to skip (embed_tokens is
    the main model's; shared_head.head is loaded here), None when `name` is not the MTP layer."""
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    if not name.startswith(prefix):
        return None
    if not hasattr(model, "mtp"):
        return ""  # layers past num_hidden_layers are unused without MTP
    rest = name[len(prefix) :]
    if rest.startswith("embed_tokens."):
        return ""
    if rest.startswith(("enorm.", "hnorm.", "eh_proj.", "shared_head.")):
        return f"mtp.{rest}"
    return f"mtp.block.{rest}"


def _destination(name: str, model: nn.Module, part: str, targets: dict[str, torch.Tensor]):
    """(our parameter name, tensor, index into a stacked expert tensor or None), or None to skip."""
    mtp_name = _mtp_name(name, model)
    if mtp_name == "":
        return None
    m = _EXPERT_KEY.match(name)
    if m is not None:
        layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
        cfg = model.config
        if part == "attention" or layer > cfg.num_hidden_layers or not cfg.is_moe_layer(layer):
            return None
        if part == "experts":
            shard, prefix = model.experts[str(layer)], f"experts.{layer}"
        elif mtp_name is not None:
            shard, prefix = model.mtp.block.mlp.experts, "mtp.block.mlp.experts"
        else:
            shard = model.model.layers[layer].mlp.experts
            prefix = f"model.layers.{layer}.mlp.experts"
        if not shard.start <= expert < shard.end:
            return None
        local = expert - shard.start
        if m.group(4):  # a scale: an FP8 shard holds it, others dequantize with the weight
            return None if shard.block is None else _expert_scale(shard, prefix, local, proj)
        inter = shard.w2.shape[-1]
        if proj == "down":
            return f"{prefix}.w2", shard.w2, local
        rows = slice(0, inter) if proj == "gate" else slice(inter, 2 * inter)
        return f"{prefix}.w13", shard.w13, (local, rows)
    name = mtp_name or name
    if part == "experts" or name not in targets:
        return None  # (a scale of a weight dequantized here is read along with the weight)
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
        per = {".w13": 2, ".w2": 1, ".w13_scale": 2, ".w2_scale": 1}
        suffix = next((s for s in per if name.endswith(s)), None)
        if suffix is not None:
            if stacked.get(name, 0) != per[suffix] * targets[name].shape[0]:
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
