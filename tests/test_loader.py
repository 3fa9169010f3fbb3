"""Config normalisation and the subset weight loader: sharded files, parts, clear errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from afd.comm.dispatch import expert_split
from afd.config import ModelConfig
from afd.loader import count_parameter_bytes, load_model
from afd.models import allocate_kv_cache, kv_cache_bytes_per_block
from afd.models.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_tiny_checkpoint("qwen3-moe", tmp_path_factory.mktemp("q3"), seed=1)


@pytest.fixture(scope="module")
def dsv3_dir(tmp_path_factory):
    return build_tiny_checkpoint("deepseek-v3", tmp_path_factory.mktemp("v3"), seed=2)


def _reshard(src, dst, num_shards: int):
    """Split model.safetensors into `num_shards` files with a model.safetensors.index.json."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
    with safe_open(str(src / "model.safetensors"), framework="pt") as st:
        names = sorted(st.keys())  # noqa: SIM118
        tensors = {n: st.get_tensor(n) for n in names}
    weight_map = {}
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[i::num_shards]
        save_file({n: tensors[n] for n in chunk}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    index = {"metadata": {}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def test_sharded_index_loads_same_weights(qwen3_dir, tmp_path):
    tensors = _reshard(qwen3_dir, tmp_path / "sharded", 3)
    single = load_model(qwen3_dir, dtype="float32")
    sharded = load_model(tmp_path / "sharded", dtype="float32")
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    # the stacked expert tensor is cat(gate, up) per expert, and w2 the down projection
    layer = single.config.moe_layers[0]
    exp = sharded.model.layers[layer].mlp.experts
    gate = tensors[f"model.layers.{layer}.mlp.experts.3.gate_proj.weight"]
    up = tensors[f"model.layers.{layer}.mlp.experts.3.up_proj.weight"]
    down = tensors[f"model.layers.{layer}.mlp.experts.3.down_proj.weight"]
    torch.testing.assert_close(exp.w13[3], torch.cat([gate, up]), atol=0, rtol=0)
    torch.testing.assert_close(exp.w2[3], down, atol=0, rtol=0)


def test_missing_shard_file_is_clear(qwen3_dir, tmp_path):
    _reshard(qwen3_dir, tmp_path / "sharded", 2)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(tmp_path / "sharded")


def test_parts_hold_only_their_tensors(dsv3_dir):
    full = load_model(dsv3_dir, dtype="float32")
    attn = load_model(dsv3_dir, dtype="float32", part="attention")
    cfg = full.config
    assert not any(".experts." in n for n, _ in attn.named_parameters())
    assert all(layer.mlp.experts is None for layer in attn.layers if layer.is_moe)
    per_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4
    routed = len(cfg.moe_layers) * cfg.n_routed_experts * per_expert
    assert count_parameter_bytes(full) - count_parameter_bytes(attn) == routed
    # shards from expert_split cover every expert exactly once
    ranges = expert_split(cfg.n_routed_experts, 3)
    shards = [load_model(dsv3_dir, dtype="float32", part="experts", expert_range=r) for r in ranges]
    for (lo, hi), shard in zip(ranges, shards, strict=True):
        assert count_parameter_bytes(shard) == len(cfg.moe_layers) * (hi - lo) * per_expert
        assert not any("embed" in n or "attn" in n for n, _ in shard.named_parameters())
    assert sum(count_parameter_bytes(s) for s in shards) == routed
    # summing the shards' outputs is the full routed-expert output (what combine relies on)
    layer = cfg.moe_layers[-1]
    moe = full.model.layers[layer].mlp
    x = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, ids = attn.model.layers[layer].mlp.gate(x)
        ref = moe.experts(x, weights, ids)
        summed = sum(s.forward_layer(layer, x, weights, ids) for s in shards)
        torch.testing.assert_close(summed, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe(x), ref + moe.shared(x), atol=1e-5, rtol=1e-5)


def test_dtype_and_router_bias(dsv3_dir):
    model = load_model(dsv3_dir, dtype="bfloat16")
    layer = model.model.layers[model.config.moe_layers[0]]
    assert layer.self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    bias = layer.mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0
    with safe_open(str(dsv3_dir / "model.safetensors"), framework="pt") as st:
        name = f"model.layers.{model.config.moe_layers[0]}.mlp.gate.e_score_correction_bias"
        torch.testing.assert_close(bias, st.get_tensor(name), atol=0, rtol=0)


def test_tied_embeddings_stay_tied(tmp_path):
    path = build_tiny_checkpoint("qwen2-moe", tmp_path / "tied", tie_word_embeddings=True)
    model = load_model(path, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_clear_errors(qwen3_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(qwen3_dir / "config.json", noweights / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(noweights)
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads((qwen3_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        load_model(bad)
    # drop one attention tensor and one expert tensor: both named in the error
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(qwen3_dir / "config.json", partial / "config.json")
    with safe_open(str(qwen3_dir / "model.safetensors"), framework="pt") as st:
        keep = {
            n: st.get_tensor(n)
            for n in st.keys()  # noqa: SIM118
            if n != "model.layers.0.self_attn.k_proj.weight"
            and n != "model.layers.2.mlp.experts.5.up_proj.weight"
        }
    save_file(keep, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="k_proj") as err:
        load_model(partial)
    assert "layers.2.mlp.experts.w13" in str(err.value)
    with pytest.raises(ValueError, match=r"experts\.2\.w13"):
        load_model(partial, part="experts", expert_range=(4, 8))
    load_model(partial, part="experts", expert_range=(0, 4))  # does not need the lost tensor
    with pytest.raises(ValueError, match="expert range"):
        load_model(qwen3_dir, part="experts", expert_range=(4, 99))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(qwen3_dir, dtype="int8")
    with pytest.raises(ValueError, match="unknown model part"):
        load_model(qwen3_dir, part="ffn")


def test_config_old_and_new_rope_styles():
    base = dict(
        model_type="deepseek_v3",
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        kv_lora_rank=32,
        q_lora_rank=None,
        first_k_dense_replace=2,
        n_routed_experts=8,
        bos_token_id=0,
        eos_token_id=[1, 2],
    )
    yarn = dict(factor=40.0, mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1)
    yarn["original_max_position_embeddings"] = 4096
    old = ModelConfig.from_hf(
        {**base, "rope_theta": 5000.0, "rope_scaling": {**yarn, "type": "yarn"}}
    )
    new = ModelConfig.from_hf(
        {**base, "rope_parameters": {**yarn, "rope_type": "yarn", "rope_theta": 5000.0}}
    )
    for cfg in (old, new):
        assert cfg.is_mla and cfg.rope_theta == 5000.0
        assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 40.0
        assert cfg.rope_interleave  # transformers' DeepSeek-V3 default
        assert cfg.moe_layers == [2, 3, 4]
        assert cfg.eos_token_ids == [1, 2] and cfg.bos_token_id == 0
        assert cfg.kv_cache_shape(10, 4) == [(10, 4, 32 + 8)]
    from afd.models.attention import _mla_softmax_scale

    mscale = 0.1 * math.log(40.0) + 1.0
    assert _mla_softmax_scale(new.rope_scaling, 24) == pytest.approx(24**-0.5 * mscale**2)
    plain = ModelConfig.from_hf({**base, "rope_theta": 5000.0, "rope_interleave": False})
    assert plain.rope_scaling is None and not plain.rope_interleave
    assert _mla_softmax_scale(plain.rope_scaling, 24) == pytest.approx(24**-0.5)
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_hf({"model_type": "mixtral"})


def test_config_moe_layer_rules_and_cache():
    q3 = ModelConfig.from_hf(
        dict(
            model_type="qwen3_moe",
            num_hidden_layers=6,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        )
    )
    assert q3.moe_layers == [1, 5] and q3.n_routed_experts == 8
    assert q3.kv_cache_shape(3, 4) == [(3, 4, 2, 16), (3, 4, 2, 16)]
    caches = allocate_kv_cache(q3, 3, 4, torch.bfloat16, "cpu")
    assert len(caches) == 6 and caches[0][0].shape == (3, 4, 2, 16)
    assert kv_cache_bytes_per_block(q3, 4, torch.bfloat16) == 6 * 2 * 4 * 2 * 16 * 2
    v2 = ModelConfig.from_hf(
        dict(
            model_type="deepseek_v2", num_hidden_layers=4, first_k_dense_replace=1, q_lora_rank=None
        )
    )
    assert v2.moe_layers == [1, 2, 3] and v2.rope_interleave and v2.q_lora_rank is None


def test_tiny_checkpoint_is_deterministic(tmp_path):
    def tensors(path):
        with safe_open(str(path / "model.safetensors"), framework="pt") as st:
            return {n: st.get_tensor(n) for n in st.keys()}  # noqa: SIM118

    a = tensors(build_tiny_checkpoint("deepseek-v2", tmp_path / "a", seed=7))
    b = tensors(build_tiny_checkpoint("deepseek-v2", tmp_path / "b", seed=7))
    c = tensors(build_tiny_checkpoint("deepseek-v2", tmp_path / "c", seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in a  # per-expert hub layout
    assert all(t.dtype == torch.float32 for t in a.values())
    with pytest.raises(ValueError, match="unknown tiny model family"):
        build_tiny_checkpoint("mixtral", tmp_path / "d")
