"""Compile every Triton kernel for a CUDA target without a GPU (Triton's bundled ptxas), so CI
on CPU catches kernels that only the interpreter accepts. Run with TRITON_INTERPRET unset:
`python -m afd.kernels.triton_compile_check`."""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_arch = [90]
_compiled: list[str] = []


def _compile(fn, ptr_types: dict[str, str], floats=(), const: dict | None = None) -> None:
    """Compile `fn` with the given pointer types; other runtime args are i32 (floats fp32)."""
    const = const or {}
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    triton.compile(src, target=GPUTarget("cuda", _arch[0], 32))
    _compiled.append(fn.__name__)


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp32")) -> list[str]:
    """Compile each kernel for each activation dtype; returns the names compiled."""
    from afd.kernels import triton_moe, triton_norm, triton_rope
    from afd.kernels.triton_utils import INTERPRET

    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the kernels were defined for the interpreter")
    _arch[0] = arch
    _compiled.clear()
    for dt in dtypes:
        _compile(
            triton_norm._rms_norm_kernel,
            {p: f"*{dt}" for p in ["x_ptr", "res_ptr", "w_ptr", "y_ptr", "res_out_ptr"]},
            ["eps"],
            dict(HAS_RESIDUAL=True, BLOCK_H=4096),
        )
        _compile_moe_gemms(dt)
        _compile_fp8(dt)
        _compile(
            triton_moe._moe_combine_kernel,
            {"partial_ptr": f"*{dt}", "ids_ptr": "*i64", "out_ptr": f"*{dt}"},
            (),
            dict(TOP_K=8, BLOCK_N=1024),
        )
        _compile_attention(dt)
        _compile(
            triton_rope._rotary_kernel,
            {"x_ptr": f"*{dt}", "cos_ptr": f"*{dt}", "sin_ptr": f"*{dt}", "out_ptr": f"*{dt}"},
            (),
            dict(INTERLEAVED=True, BLOCK_H=16, BLOCK_F=32),
        )
    return list(_compiled)


def _compile_moe_gemms(dt: str) -> None:
    """The fused-MoE gate/up and down GEMMs with `dt` activations and weights."""
    from afd.kernels import triton_moe

    ie = dt == "fp32"
    _compile(
        triton_moe._moe_gate_up_kernel,
        {
            "x_ptr": f"*{dt}",
            "w13_ptr": f"*{dt}",
            "inter_ptr": f"*{dt}",
            "sorted_ids_ptr": "*i32",
            "block_experts_ptr": "*i32",
            "xs_ptr": f"*{dt}",
            "ws_ptr": f"*{dt}",
        },
        (),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, UPCAST=False, IEEE=ie, FP8=False),
    )
    _compile(
        triton_moe._moe_down_kernel,
        {
            "inter_ptr": f"*{dt}",
            "w2_ptr": f"*{dt}",
            "out_ptr": f"*{dt}",
            "weights_ptr": "*fp32",
            "sorted_ids_ptr": "*i32",
            "block_experts_ptr": "*i32",
            "is_ptr": f"*{dt}",
            "ws_ptr": f"*{dt}",
        },
        (),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, UPCAST=False, IEEE=ie, FP8=False),
    )


def _compile_attention(dt: str) -> None:
    """Paged decode (split-K without RoPE, MLA with RoPE) and the split merge, `dt` activations."""
    from afd.kernels import triton_attention

    ie = dt == "fp32"
    for rope, bd, bdv, split in ((False, 128, 128, True), (True, 512, 512, False)):
        _compile(
            triton_attention._paged_decode_kernel,
            {
                "q_ptr": f"*{dt}",
                "qr_ptr": f"*{dt}",
                "k_ptr": f"*{dt}",
                "kr_ptr": f"*{dt}",
                "v_ptr": f"*{dt}",
                "block_tables_ptr": "*i32",
                "seq_lens_ptr": "*i32",
                "out_ptr": "*fp32" if split else f"*{dt}",
                "lse_ptr": "*fp32",
            },
            ["scale"],
            dict(
                BLOCK_H=16,
                BLOCK_N=32 if rope else 64,
                BLOCK_D=bd,
                BLOCK_R=64,
                BLOCK_DV=bdv,
                HAS_ROPE=rope,
                SPLIT=split,
                UPCAST=dt == "fp32",
                IEEE=ie,
                HEADS_FASTEST=rope,
            ),
        )
    _compile(
        triton_attention._merge_splits_kernel,
        {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dt}"},
        (),
        dict(BLOCK_S=8, BLOCK_DV=512),
    )


def _compile_fp8(dt: str) -> None:
    """The block-FP8 kernels with `dt` activations: quantization, GEMM, both fused-MoE GEMMs."""
    from afd.kernels import triton_fp8, triton_moe

    f8 = "*fp8e4nv"
    _compile(
        triton_fp8._quant_fp8_kernel,
        {"x_ptr": f"*{dt}", "q_ptr": f8, "s_ptr": "*fp32"},
        (),
        dict(BLOCK_T=16, GROUP_P2=128),
    )
    _compile(
        triton_fp8._fp8_gemm_kernel,
        {"a_ptr": f8, "as_ptr": "*fp32", "b_ptr": f8, "bs_ptr": "*fp32", "bias_ptr": f"*{dt}",
         "c_ptr": f"*{dt}"},
        (),
        dict(HAS_BIAS=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128),
    )  # fmt: skip
    moe = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, UPCAST=False, IEEE=False, FP8=True)
    _compile(
        triton_moe._moe_gate_up_kernel,
        {"x_ptr": f8, "w13_ptr": f8, "inter_ptr": f"*{dt}", "sorted_ids_ptr": "*i32",
         "block_experts_ptr": "*i32", "xs_ptr": "*fp32", "ws_ptr": "*fp32"},
        (),
        moe,
    )  # fmt: skip
    _compile(
        triton_moe._moe_down_kernel,
        {"inter_ptr": f8, "w2_ptr": f8, "out_ptr": f"*{dt}", "weights_ptr": "*fp32",
         "sorted_ids_ptr": "*i32", "block_experts_ptr": "*i32", "is_ptr": "*fp32",
         "ws_ptr": "*fp32"},
        (),
        moe,
    )  # fmt: skip


if __name__ == "__main__":
    names = compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
    print(f"compiled {len(names)} kernel specialisations")
