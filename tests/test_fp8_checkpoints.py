"""Block-FP8 checkpoints (DeepSeek-V3's format): random DeepSeek-V3 and Qwen3-MoE models quantized
in 128x128 blocks and saved with the real quantization_config. Dequantized while loading, they
give transformers' greedy tokens (transformers runs the same weights dequantized), single-process
and 2A2F; kept in FP8 they hold half the bytes; loading dequantizes one tensor at a time (peak
memory measured); methods AFD cannot serve are refused with a clear message."""

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
    from afd.models import AttentionMetadata, allocate_kv_cache

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
