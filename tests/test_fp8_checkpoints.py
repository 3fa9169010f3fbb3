"""Block-FP8 checkpoints (DeepSeek-V3's format): random DeepSeek-V3 and Qwen3-MoE models quantized
in 128x128 blocks and saved with the real quantization_config. Dequantized while loading, they
give transformers' greedy tokens (transformers runs the same weights dequantized), single-process
and 2A2F; kept in FP8 they hold half the bytes; loading dequantizes one tensor at a time (peak
memory measured); methods AFD cannot serve are refused with a clear message. The scale
convention (value = fp8 * weight_scale_inv per block) is checked against e4m3 bytes and
expected values worked out by hand from the OCP FP8 spec, not against the project's own
dequantization."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import hf_greedy, mixed_prompts

from afd import LLM, SamplingParams
from afd.builtin import train_bytelevel_bpe
from afd.loader import count_parameter_bytes, load_model
from afd.models.tiny import build_tiny_checkpoint
from afd.quantization import quantize_checkpoint

# Widths around the 128-wide blocks: multiples (256), non-multiples (160, 144, 192, 320).
SHAPES = {
    "deepseek-v3": dict(
        hidden_size=256,
        intermediate_size=320,
        moe_intermediate_size=192,
        q_lora_rank=160,
        kv_lora_rank=144,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
    ),
    "qwen3-moe": dict(
        hidden_size=256, head_dim=64, intermediate_size=384, moe_intermediate_size=192
    ),
}
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    """family -> (FP8 checkpoint, the same weights dequantized to float32)."""
    out = {}
    for family, shape in SHAPES.items():
        root = tmp_path_factory.mktemp(family)
        train_bytelevel_bpe(root / "src", 512)
        build_tiny_checkpoint(family, root / "src", seed=5, **shape)
        fp8 = quantize_checkpoint(root / "src", root / "fp8", dequantized=root / "deq")
        out[family] = (fp8, root / "deq")
    return out


def _greedy(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()


def test_checkpoint_carries_the_real_format(fp8_models):
    from safetensors import safe_open

    fp8, _ = fp8_models["deepseek-v3"]
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    with safe_open(str(fp8 / "model.safetensors"), framework="pt") as st:
        w = st.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight")  # [192, 256]
        s = st.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert s.shape == (2, 2)  # ceil(192 / 128), ceil(256 / 128)
        kv_b = st.get_tensor("model.layers.0.self_attn.kv_b_proj.weight_scale_inv")
        assert kv_b.shape == (2, 2)  # [4 heads * (32 + 32), 144] in 128-blocks
        for kept in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight",
                     "lm_head.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                     "model.layers.0.input_layernorm.weight"):  # fmt: skip
            assert st.get_tensor(kept).dtype == torch.float32, kept


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SHAPES))
def test_dequantized_fp8_matches_transformers(fp8_models, family):
    """CPU (quantization auto = dequantize) and --quantization none, single process and 2A2F."""
    fp8, deq = fp8_models[family]
    prompts = mixed_prompts(4, 512, seed=3)
    expected, _ = hf_greedy(deq, prompts, NEW_TOKENS)
    assert _greedy(LLM(str(fp8), dtype="float32"), prompts) == expected
    assert _greedy(LLM(str(fp8), dtype="float32", quantization="none"), prompts) == expected
    cluster = LLM(str(fp8), dtype="float32", num_attention_workers=2, num_expert_workers=2,
                  num_micro_batches=2)  # fmt: skip
    assert _greedy(cluster, prompts) == expected


@pytest.mark.slow
def test_kept_fp8_serves_and_halves_expert_bytes(fp8_models):
    """--quantization fp8 keeps the FP8 weights (torch references on CPU): an expert worker's
    shard holds half the bytes of the same shard in bf16, and the 2A2F cluster computes what the
    single-process engine computes; activation quantization keeps it close to the dequantized
    model."""
    fp8, deq = fp8_models["deepseek-v3"]
    cfg = load_model(fp8, dtype="float32", part="experts", expert_range=(0, 8)).config
    bf16_shard = load_model(deq, dtype="bfloat16", part="experts", expert_range=(0, 8))
    fp8_shard = load_model(fp8, dtype="bfloat16", part="experts", expert_range=(0, 8),
                           quantization="fp8")  # fmt: skip
    ratio = count_parameter_bytes(fp8_shard) / count_parameter_bytes(bf16_shard)
    assert 0.5 <= ratio < 0.51, ratio  # e4m3 bytes + one float32 per 128 x 128 block
    shard = fp8_shard.experts[str(cfg.moe_layers[0])]
    assert shard.w13.dtype == torch.float8_e4m3fn and shard.w13_scale.dtype == torch.float32

    prompts = mixed_prompts(3, 512, seed=4)
    single = _greedy(LLM(str(fp8), dtype="float32", quantization="fp8"), prompts)
    llm = LLM(str(fp8), dtype="float32", quantization="fp8", num_attention_workers=2,
              num_expert_workers=2, num_micro_batches=2)  # fmt: skip
    expert_bytes = {
        rank: n for (role, rank), n in llm.engine.executor.param_bytes.items() if role == "expert"
    }
    assert _greedy(llm, prompts) == single
    per_expert_bf16 = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2 * len(cfg.moe_layers)
    for n in expert_bytes.values():  # 8 experts each
        assert 0.5 <= n / (8 * per_expert_bf16) < 0.51
    # the FP8 model against the dequantized one: same weights, activations rounded to e4m3
    full = load_model(deq, dtype="float32")
    kept = load_model(fp8, dtype="float32", quantization="fp8")
    assert isinstance(kept.model.layers[0].self_attn.q_a_proj.weight, torch.Tensor)
    assert kept.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert kept.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32  # absorbed
    # one decoder layer (random weights compound the error layer by layer): attention with
    # four e4m3-rounded GEMMs, then the MoE with its own
    ids = torch.tensor(prompts[0])
    for want, got, bound in zip(_first_layer(full, ids), _first_layer(kept, ids), (0.06, 0.1),
                                strict=True):  # fmt: skip
        assert float((want - got).norm() / want.norm()) < bound


def _first_layer(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention part's output, FFN part's output) of layer 0 for one prompt."""
    from afd.kernels.metadata import AttentionMetadata
    from afd.models import allocate_kv_cache

    n = ids.numel()
    meta = AttentionMetadata.build([n], [n], [list(range(-(-n // 16)))], 16)
    cache = allocate_kv_cache(model.config, -(-n // 16), 16, torch.float32, "cpu")[0]
    layer = model.model.layers[1]  # an MoE layer
    with torch.inference_mode():
        x, _ = layer.attention_part(model.embed(ids), None, torch.arange(n), meta, cache)
        return x, layer.ffn_part(x)


def test_kept_fp8_triton_kernels_in_the_engine(fp8_models):
    """The engine's FP8 layers through the Triton kernels (interpreted) give the torch path's
    tokens."""
    fp8, _ = fp8_models["qwen3-moe"]
    prompts = mixed_prompts(1, 512, seed=6)
    kw = dict(dtype="float32", quantization="fp8")
    torch_path = _greedy(LLM(str(fp8), kernel_backend="torch", **kw), prompts)
    assert _greedy(LLM(str(fp8), kernel_backend="triton", **kw), prompts) == torch_path


def test_plain_checkpoint_quantized_while_loading(fp8_models, tmp_path):
    """--quantization fp8 on a float32 checkpoint makes the same FP8 layers the FP8 file holds."""
    fp8, _ = fp8_models["qwen3-moe"]
    src = fp8.parent / "src"
    online = load_model(src, dtype="float32", quantization="fp8").state_dict()
    stored = load_model(fp8, dtype="float32", quantization="fp8").state_dict()
    assert online.keys() == stored.keys()
    for k in stored:
        assert torch.equal(online[k].view(torch.uint8) if online[k].dtype == torch.float8_e4m3fn
                           else online[k], stored[k].view(torch.uint8)
                           if stored[k].dtype == torch.float8_e4m3fn else stored[k]), k  # fmt: skip


_PEAK = textwrap.dedent(
    """
    import sys, torch
    from afd.config import ModelConfig
    from afd.loader import count_parameter_bytes, load_model
    from afd.models import build_model
    torch.set_num_threads(1)
    # first uses load code (imports, meta-device kernels): warm up on a skeleton and one expert
    with torch.device("meta"):
        build_model(ModelConfig.from_pretrained(sys.argv[1]))
    load_model(sys.argv[1], dtype="float32", quantization=sys.argv[2], part="experts",
               expert_range=(0, 1))

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    model = load_model(sys.argv[1], dtype="float32", quantization=sys.argv[2])
    print(status("VmHWM:") - before, count_parameter_bytes(model))
    """
)


def test_loading_dequantizes_tensor_by_tensor(tmp_path):
    """Peak memory of loading, measured in a fresh process: dequantizing to float32 adds only the
    model's own bytes and the FP8 file's mapped pages (holding the model twice would add the model
    again), and keeping FP8 adds the FP8 bytes and the file."""
    src = tmp_path / "src"
    build_tiny_checkpoint("deepseek-v3", src, seed=1, num_hidden_layers=2, hidden_size=512,
                          moe_intermediate_size=512, n_routed_experts=32, intermediate_size=512,
                          vocab_size=512)  # fmt: skip
    fp8 = quantize_checkpoint(src, tmp_path / "fp8")
    file_bytes = (fp8 / "model.safetensors").stat().st_size
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    measured = {}
    for mode in ("none", "fp8"):
        r = subprocess.run([sys.executable, "-c", _PEAK, str(fp8), mode], capture_output=True,
                           text=True, timeout=120, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        measured[mode] = [int(v) for v in r.stdout.split()]
    grew, model_bytes = measured["none"]
    assert model_bytes > 100 * 2**20  # float32; the temporaries of one tensor are ~1 MiB
    assert grew < model_bytes + file_bytes + 0.1 * model_bytes, (grew, model_bytes, file_bytes)
    grew_fp8, fp8_bytes = measured["fp8"]
    assert fp8_bytes < 0.3 * model_bytes  # the linear weights in e4m3, the rest float32
    assert grew_fp8 < fp8_bytes + file_bytes + 0.1 * model_bytes, (grew_fp8, fp8_bytes)


@pytest.mark.parametrize(
    "qc,message",
    [
        ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
        ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "per-tensor fp8"),
        ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt 'e5m2'"),
        (
            {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
            "activation_scheme 'static'",
        ),  # fmt: skip
        ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "two sizes"),
        ({"quant_method": "fp8", "weight_block_size": "big"}, "two sizes"),
        ({"quant_method": "fp8", "weight_block_size": [2**64, 128]}, "two sizes"),
        ({"quant_method": "\udcff" * 100}, "is not supported"),
    ],
)
def test_unsupported_quantization_is_a_clear_error(fp8_models, tmp_path, qc, message):
    from afd.entrypoints.cli import main

    fp8, _ = fp8_models["qwen3-moe"]
    model = tmp_path / "m"
    model.mkdir()
    for f in fp8.iterdir():
        (model / f.name).symlink_to(f)
    (model / "config.json").unlink()
    config = json.loads((fp8 / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(ValueError, match=message):
        load_model(model)
    assert main(["generate", "--model", str(model), "--max-tokens", "1", "hi"]) == 2


def test_quantization_flag_values(fp8_models, capsys):
    from afd.entrypoints.cli import main

    fp8, _ = fp8_models["qwen3-moe"]
    assert main(["generate", "--model", str(fp8), "--quantization", "int4", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("afd: error: argument --quantization") and err.count("\n") == 1
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        LLM(str(fp8), quantization="int4")
    assert main(["generate", "--model", str(fp8), "--quantization", "fp8", "--max-tokens", "2",
                 "hi"]) == 0  # fmt: skip


def test_broken_fp8_tensors_are_clear_errors(fp8_models, tmp_path):
    """A weight without its scale, or a scale of the wrong shape: one clear error, kept or not."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    fp8, _ = fp8_models["qwen3-moe"]
    with safe_open(str(fp8 / "model.safetensors"), framework="pt") as st:
        tensors = {n: st.get_tensor(n) for n in st.keys()}  # noqa: SIM118
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    for case, edit in (("missing", None), ("shape", torch.ones(1, 1))):
        model = tmp_path / case
        model.mkdir()
        for f in fp8.iterdir():
            if f.name != "model.safetensors":
                (model / f.name).symlink_to(f)
        broken = {n: t for n, t in tensors.items() if n != name}
        if edit is not None:
            broken[name] = edit
        save_file(broken, str(model / "model.safetensors"))
        for quantization in ("none", "fp8"):
            with pytest.raises(ValueError, match="q_proj.weight"):
                load_model(model, dtype="float32", quantization=quantization)


# -- an independent check of the convention: e4m3 bytes and block scales written out by hand ------

# OCP FP8 (E4M3FN): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
# (m/8 * 2^-6); no infinities, S.1111.111 is NaN, so 448 (0.1111.110) is the largest value.
# Each value below was worked out by hand from its bits, not by any code.
E4M3 = [
    (0x00, 0.0),  # 0.0000.000
    (0x80, -0.0),  # 1.0000.000
    (0x01, 0.001953125),  # 0.0000.001: 1/8 * 2^-6, the smallest subnormal
    (0x07, 0.013671875),  # 0.0000.111: 7/8 * 2^-6, the largest subnormal
    (0x08, 0.015625),  # 0.0001.000: 2^-6, the smallest normal
    (0x26, 0.21875),  # 0.0100.110: 2^-3 * 1.75
    (0x30, 0.5),  # 0.0110.000: 2^-1
    (0x38, 1.0),  # 0.0111.000: 2^0
    (0x3C, 1.5),  # 0.0111.100: 1 + 4/8
    (0x3F, 1.875),  # 0.0111.111: 1 + 7/8
    (0x40, 2.0),  # 0.1000.000: 2^1
    (0x44, 3.0),  # 0.1000.100: 2 * 1.5
    (0x4D, 6.5),  # 0.1001.101: 4 * 1.625
    (0x5A, 20.0),  # 0.1011.010: 16 * 1.25
    (0x77, 240.0),  # 0.1110.111: 128 * 1.875
    (0x7E, 448.0),  # 0.1111.110: 256 * 1.75, the largest finite value
    (0xB8, -1.0),  # 1.0111.000
    (0xC9, -4.5),  # 1.1001.001: -(4 * 1.125)
    (0xFE, -448.0),  # 1.1111.110
]
# name -> (shape, block scales [ceil(rows/128), ceil(cols/128)], pattern (a, b, c)): element
# [i, j] holds E4M3[(a*i + b*j + c) % len(E4M3)], scaled by its block's weight_scale_inv.
# Scales differ per block (value = fp8 * scale: dividing, or swapping rows and columns of the
# scale grid, gives other values); 192 and 384 leave partial edge blocks.
HAND_TENSORS = {
    "model.layers.0.self_attn.q_proj.weight": ((256, 256), [[0.5, 2.0], [0.25, 3.0]], (7, 3, 0)),
    "model.layers.0.self_attn.k_proj.weight": ((128, 256), [[4.0, 0.125]], (1, 5, 2)),
    "model.layers.0.mlp.experts.3.gate_proj.weight": (
        (192, 256), [[1.0, 0.5], [2.0, 0.0625]], (3, 1, 4),
    ),
    "model.layers.0.mlp.experts.3.up_proj.weight": (
        (192, 256), [[0.75, 1.25], [8.0, 0.5]], (2, 7, 1),
    ),
    "model.layers.0.mlp.experts.3.down_proj.weight": (
        (256, 192), [[3.0, 0.5], [1.0, 16.0]], (5, 2, 3),
    ),
    "model.layers.1.mlp.down_proj.weight": (
        (256, 384), [[1.0, 2.0, 4.0], [0.5, 0.25, 0.125]], (1, 1, 6),
    ),
}  # fmt: skip
# a few elements worked through in full: (tensor, row, col) -> value
HAND_SPOT_CHECKS = {
    # 7*0 + 3*0 = 0 -> 0x00 = 0.0, block (0, 0): * 0.5
    ("model.layers.0.self_attn.q_proj.weight", 0, 0): 0.0,
    # 3*130 = 390 = 20*19 + 10 -> 0x40 = 2.0, block (0, 1): * 2.0
    ("model.layers.0.self_attn.q_proj.weight", 0, 130): 4.0,
    # 7*200 + 3*255 = 2165 = 113*19 + 18 -> 0xFE = -448.0, block (1, 1): * 3.0
    ("model.layers.0.self_attn.q_proj.weight", 200, 255): -1344.0,
    # 1 + 5 + 2 = 8 -> 0x3C = 1.5, block (0, 0): * 4.0
    ("model.layers.0.self_attn.k_proj.weight", 1, 1): 6.0,
    # 3*191 + 255 + 4 = 832 = 43*19 + 15 -> 0x7E = 448.0, block (1, 1) (a partial one): * 0.0625
    ("model.layers.0.mlp.experts.3.gate_proj.weight", 191, 255): 28.0,
    # 5*255 + 2*191 + 3 = 1660 = 87*19 + 7 -> 0x38 = 1.0, block (1, 1): * 16.0
    ("model.layers.0.mlp.experts.3.down_proj.weight", 255, 191): 16.0,
}


def _hand_indices(shape, pattern) -> torch.Tensor:
    a, b, c = pattern
    i = torch.arange(shape[0])[:, None]
    j = torch.arange(shape[1])[None, :]
    return (a * i + b * j + c) % len(E4M3)


def hand_fp8(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scales, expected float32 values) of one hand-written tensor; the
    expected values come from the table above times the block's scale, nothing else."""
    shape, scales, pattern = HAND_TENSORS[name]
    index = _hand_indices(shape, pattern)
    codes = torch.tensor([code for code, _ in E4M3], dtype=torch.uint8)[index]
    values = torch.tensor([v for _, v in E4M3], dtype=torch.float32)[index]
    rows = torch.arange(shape[0])[:, None] // 128
    cols = torch.arange(shape[1])[None, :] // 128
    expected = values * torch.tensor(scales, dtype=torch.float32)[rows, cols]
    return codes.view(torch.float8_e4m3fn), torch.tensor(scales, dtype=torch.float32), expected


def test_hand_table_is_the_e4m3_encoding():
    """The hand-worked table against torch's own e4m3 decoding (no project code), and the spot
    checks against the table."""
    codes = torch.tensor([code for code, _ in E4M3], dtype=torch.uint8)
    decoded = codes.view(torch.float8_e4m3fn).float().tolist()
    assert decoded == [v for _, v in E4M3]
    assert [str(v)[0] == "-" for v in decoded] == [code >= 0x80 for code, _ in E4M3]  # -0.0 too
    for (name, i, j), value in HAND_SPOT_CHECKS.items():
        assert float(hand_fp8(name)[2][i, j]) == value, (name, i, j)


def _hand_checkpoint(fp8_dir, out):
    """The FP8 checkpoint with the hand-written tensors in place of some of its own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir()
    for f in fp8_dir.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).symlink_to(f)
    with safe_open(str(fp8_dir / "model.safetensors"), framework="pt") as st:
        tensors = {n: st.get_tensor(n) for n in st.keys()}  # noqa: SIM118
    for name in HAND_TENSORS:
        weight, scales, _ = hand_fp8(name)
        assert tensors[name].shape == weight.shape and tensors[name].dtype == weight.dtype, name
        tensors[name], tensors[name + "_scale_inv"] = weight, scales
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_hand_fp8_values_load_as_the_spec_says(fp8_models, tmp_path):
    """Loaded through the checkpoint path, dequantized: every element is the hand-computed
    fp8 value times its block's scale; kept FP8: the bytes and scales as written, and the FP8
    GEMM (torch reference and Triton, interpreted here) of a one-hot activation returns the
    weight's column."""
    from afd.kernels import ops

    model_dir = _hand_checkpoint(fp8_models["qwen3-moe"][0], tmp_path / "hand")
    want = {name: hand_fp8(name) for name in HAND_TENSORS}
    expert = "model.layers.0.mlp.experts.3."
    deq = dict(load_model(model_dir, dtype="float32", quantization="none").named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):  # fmt: skip
        assert torch.equal(deq[name], want[name][2]), name
    w13, w2 = deq["model.layers.0.mlp.experts.w13"][3], deq["model.layers.0.mlp.experts.w2"][3]
    assert torch.equal(w13[:192], want[expert + "gate_proj.weight"][2])
    assert torch.equal(w13[192:], want[expert + "up_proj.weight"][2])
    assert torch.equal(w2, want[expert + "down_proj.weight"][2])

    kept = load_model(model_dir, dtype="float32", quantization="fp8")
    params = dict(kept.named_parameters())
    q_name = "model.layers.0.self_attn.q_proj.weight"
    q_bytes, q_scales, q_values = want[q_name]
    assert torch.equal(params[q_name].view(torch.uint8), q_bytes.view(torch.uint8))
    assert torch.equal(params[q_name + "_scale_inv"], q_scales)
    shard = "model.layers.0.mlp.experts."
    assert torch.equal(params[shard + "w13"][3, :192].view(torch.uint8),
                       want[expert + "gate_proj.weight"][0].view(torch.uint8))  # fmt: skip
    assert torch.equal(params[shard + "w13_scale"][3], torch.cat(
        [want[expert + "gate_proj.weight"][1], want[expert + "up_proj.weight"][1]]))  # fmt: skip
    assert torch.equal(params[shard + "w2_scale"][3], want[expert + "down_proj.weight"][1])
    columns = [0, 130, 255]
    x = torch.zeros(len(columns), 256)
    x[range(len(columns)), columns] = 1.0  # a one-hot token quantizes exactly (1 -> 448 * 1/448)
    q_proj = kept.model.layers[0].self_attn.q_proj
    before = ops.get_kernel_backend()
    try:
        for backend in ("torch", "triton"):
            ops.set_kernel_backend(backend)
            with torch.inference_mode():
                out = q_proj(x)
            torch.testing.assert_close(out, q_values[:, columns].t(), rtol=1e-6, atol=0,
                                       msg=backend)  # fmt: skip
    finally:
        ops.set_kernel_backend(before)
