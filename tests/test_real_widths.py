"""The published configs of DeepSeek-V2-Lite, Qwen3-30B-A3B and DeepSeek-V3 (hidden size, heads,
MLA ranks, expert width, expert count, routing groups, YaRN) with random weights, against
transformers, single process (with chunked prefill) and 2A2F: what toy widths cannot catch (head
dims of 128 and 192, kv_lora_rank 512, 128 heads, 64 and 128 experts, top-6 and top-8 routing,
the 8-group noaux_tc router, YaRN factor 40).

Reduced only where memory and the suite's time need it: fewer layers (V2-Lite keeps its dense
first layer and one MoE layer; Qwen3 and V3 one MoE layer each), DeepSeek-V3 16 of its 256 routed
experts (two per routing group, so the 8-group / top-4-group selection still decides), and the
vocabulary 1,024 instead of 100k+ (the lm_head is one plain matmul; bos/eos ids renumbered into
it). Weights are bfloat16 on disk, as released; both sides compute in float32.
"""

from __future__ import annotations

import gc

import pytest
import torch

from afd import LLM, SamplingParams
from afd.builtin import train_bytelevel_bpe
from afd.models.tiny import build_random_checkpoint

pytestmark = pytest.mark.slow

VOCAB = 1024
YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "original_max_position_embeddings": 4096,
        "type": "yarn"}  # fmt: skip

# config.json of deepseek-ai/DeepSeek-V2-Lite
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 2,  # of 27
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False,
    "tie_word_embeddings": False,
}
# config.json of Qwen/Qwen3-30B-A3B
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 1,  # of 48
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "tie_word_embeddings": False,
}
# config.json of deepseek-ai/DeepSeek-V3 (its quantization_config is test_fp8_checkpoints' part)
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 1,  # of 61
    "first_k_dense_replace": 0,  # 3 of the 61 layers are dense; the one kept here is MoE
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 16,  # of 256
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False,
    "tie_word_embeddings": False,
}
MODELS = {
    "deepseek-v2-lite": DEEPSEEK_V2_LITE,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "deepseek-v3": DEEPSEEK_V3,
}
NEW_TOKENS = 4


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    # 40 tokens: chunked (max_num_batched_tokens 32) and past two KV blocks of 16
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 19, 40)]


def _transformers(path, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    out = []
    with torch.no_grad():
        for p in prompts:
            n = NEW_TOKENS
            ids = torch.tensor([p])
            r = hf.eval().generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
            out.append(r[0, len(p) :].tolist())
    del hf
    gc.collect()
    return out


def _afd(path, prompts, **kw) -> list[list[int]]:
    llm = LLM(str(path), dtype="float32", **kw)
    try:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()
        del llm
        gc.collect()


@pytest.mark.parametrize("name", list(MODELS))
def test_real_width_matches_transformers(name, tmp_path):
    config = {**MODELS[name], "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1}
    path = build_random_checkpoint(config, tmp_path / name, seed=3)
    train_bytelevel_bpe(path, VOCAB)
    prompts = _prompts()
    expected = _transformers(path, prompts)
    assert _afd(path, prompts, max_num_batched_tokens=32) == expected
    cluster = dict(num_attention_workers=2, num_expert_workers=2, num_micro_batches=2)
    assert _afd(path, prompts, **cluster) == expected
