"""Block-quantized FP8 checkpoints (DeepSeek-V3/R1, Qwen3 FP8 releases): the config they carry,
which weights stay FP8 (afd.models.layers.convert_to_fp8 switches a skeleton's layers).

`quantization_config` = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}: every quantized linear weight is float8_e4m3fn with a float32
`weight_scale_inv` [ceil(out/128), ceil(in/128)] (value = fp8 * scale); norms, router gates,
embeddings, lm_head and e_score_correction_bias stay unquantized.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

QUANTIZATION_MODES = ("auto", "fp8", "none")
SCALE_SUFFIX = "_scale_inv"  # "<linear>.weight_scale_inv" next to "<linear>.weight"


@dataclass(frozen=True)
class Fp8Config:
    """Block FP8 weights with `block` = (rows, cols) per float32 scale."""

    block: tuple[int, int] = (128, 128)

    @classmethod
    def from_hf(cls, qc: dict | None) -> Fp8Config | None:
        """Parse a checkpoint's quantization_config; None when there is none. Anything AFD cannot
        serve is a ValueError naming what it found and what it reads."""
        if qc is None:
            return None
        if not isinstance(qc, dict):
            qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
        supported = (
            "AFD reads block-quantized FP8 checkpoints (quant_method 'fp8', fmt 'e4m3', "
            "activation_scheme 'dynamic', weight_block_size [128, 128] as DeepSeek-V3 ships)"
        )
        expected = (("quant_method", "fp8"), ("fmt", "e4m3"), ("activation_scheme", "dynamic"))
        for key, want in expected:
            got = qc.get(key, want if key != "quant_method" else None)
            if got != want:
                raise ValueError(f"{key} {str(got)[:40]!r} is not supported; {supported}")
        block = qc.get("weight_block_size")
        if block is None:
            raise ValueError(f"per-tensor fp8 (no weight_block_size) is not supported; {supported}")
        sizes_ok = isinstance(block, list | tuple) and len(block) == 2
        sizes_ok = sizes_ok and all(
            isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 4096 for b in block
        )
        if not sizes_ok:
            raise ValueError(f"weight_block_size {str(block)[:40]} is not two sizes in 1..4096")
        return cls(block=(int(block[0]), int(block[1])))


def resolve_quantization(
    mode: str, checkpoint: Fp8Config | None, device: str | torch.device
) -> Fp8Config | None:
    """The FP8 format to keep the weights in, or None to hold them in the compute dtype.

    auto: an FP8 checkpoint stays FP8 on CUDA when the Triton kernels import, else it is
    dequantized tensor by tensor while loading; fp8: keep FP8 (a bf16/fp32 checkpoint is
    quantized to 128x128 blocks while loading; on CPU the torch references run); none: dequantize.
    """
    if mode not in QUANTIZATION_MODES:
        choices = ", ".join(QUANTIZATION_MODES)
        raise ValueError(f"unknown quantization {str(mode)[:40]!r}; choose from {choices}")
    if mode == "none":
        return None
    if mode == "fp8":
        return checkpoint or Fp8Config()
    import torch  # here: the flags import this module and must not pay for torch

    if checkpoint is None or torch.device(device).type != "cuda":
        return None
    from afd.kernels.ops import triton_available

    return checkpoint if triton_available() else None


def scale_name(weight_name: str) -> str:
    """'...q_proj.weight' -> '...q_proj.weight_scale_inv'."""
    return weight_name + SCALE_SUFFIX


def is_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """Whether a block-FP8 checkpoint holds `name` in FP8: the decoder layers' linear weights,
    not the router gates, norms, embeddings or lm_head (what DeepSeek-V3's release does)."""
    return (
        tensor.dim() == 2
        and ".layers." in name
        and name.endswith(".weight")
        and not name.endswith((".mlp.gate.weight", ".shared_expert_gate.weight"))
        and "norm" not in name.rsplit(".", 2)[-2]
    )


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    block: tuple[int, int] = (128, 128),
    dequantized: str | Path | None = None,
) -> Path:
    """Write `src` (a bf16/fp32 safetensors checkpoint) as a block-FP8 checkpoint in `dst` with
    the quantization_config DeepSeek-V3 ships; with `dequantized`, also write the FP8 weights
    dequantized back to float32 there (what a reference implementation should compute with)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from afd.kernels import torch_ops

    src, dst = Path(src), Path(dst)
    outs = [(dst, True)] + ([(Path(dequantized), False)] if dequantized else [])
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {src}")
    for out, _ in outs:
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
                shutil.copy(f, out / f.name)
    index: dict[str, str] = {}
    for f in files:
        fp8: dict[str, torch.Tensor] = {}
        plain: dict[str, torch.Tensor] = {}
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                t = st.get_tensor(name)
                index[name] = f.name
                if is_quantizable(name, t):
                    q, s = torch_ops.quant_fp8_blocks(t, block)
                    fp8[name], fp8[scale_name(name)] = q, s
                    plain[name] = torch_ops.dequant_fp8(q, s, block)
                    index[scale_name(name)] = f.name
                else:
                    fp8[name] = plain[name] = t
        save_file(fp8, str(dst / f.name), metadata={"format": "pt"})
        if dequantized:
            plain = {k: v for k, v in plain.items() if not k.endswith(SCALE_SUFFIX)}
            save_file(plain, str(Path(dequantized) / f.name), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    for out, quantized in outs:
        c = dict(config)
        if quantized:
            c["quantization_config"] = {
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "weight_block_size": list(block),
            }
            if (src / "model.safetensors.index.json").is_file():
                weight_map = {"metadata": {}, "weight_map": index}
                (out / "model.safetensors.index.json").write_text(json.dumps(weight_map))
        (out / "config.json").write_text(json.dumps(c, indent=2))
    return dst
