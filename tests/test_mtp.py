"""DeepSeek-V3 MTP drafter: loading its layer, its draft logits against a reference written from
the paper's equations, and the main model unchanged by the extra KV layer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_greedy

from afd.kernels.metadata import AttentionMetadata
from afd.loader import load_model
from afd.models import allocate_kv_cache
from afd.models.mtp import propose
from afd.models.tiny import add_mtp_weights, build_tiny_checkpoint

BLOCK = 4
PROMPT = [5, 77, 301, 12, 9, 140]


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory):
    path = build_tiny_checkpoint("deepseek-v3", tmp_path_factory.mktemp("v3mtp"), seed=4)
    return add_mtp_weights(path, seed=5)


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _reference(mtp_dir, hidden, tokens):
    """Dense MTP over a whole sequence: h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)] (the
    released weights put the embedding half first), transformers' DeepSeek-V3 decoder block as
    layer num_hidden_layers with causal attention over all positions, shared_head norm + head."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((mtp_dir / "config.json").read_text())
    n, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    w = {
        k.split(".", 3)[3]: v
        for k, v in load_file(str(mtp_dir / "model-00002-of-00002.safetensors")).items()
    }
    # transformers loads layer n as an ordinary decoder layer when told there are n + 1
    hf = AutoModelForCausalLM.from_pretrained(
        mtp_dir, dtype=torch.float32, num_hidden_layers=n + 1, attn_implementation="eager"
    ).eval()
    emb = hf.model.embed_tokens(torch.tensor(tokens))
    x = torch.cat([_rms(emb, w["enorm.weight"], eps), _rms(hidden, w["hnorm.weight"], eps)], -1)
    x = (x @ w["eh_proj.weight"].T)[None]
    t = x.shape[1]
    pos = torch.arange(t)[None]
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    out = hf.model.layers[n](
        x, attention_mask=mask, position_ids=pos, position_embeddings=hf.model.rotary_emb(x, pos)
    )
    out = out[0] if isinstance(out, tuple) else out
    out = out[0]
    logits = _rms(out, w["shared_head.norm.weight"], eps) @ w["shared_head.head.weight"].T
    return out, logits


def _prefill(model, ids, caches, table):
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [table], BLOCK)
    with torch.inference_mode():
        normed, hidden = model(
            torch.tensor(ids), torch.arange(len(ids)), meta, caches, return_hidden=True
        )
        return int(model.compute_logits(normed[-1:])[0].argmax()), hidden


def test_mtp_prefill_logits_match_reference(mtp_dir):
    model = load_model(mtp_dir, mtp=True)
    n = model.config.num_hidden_layers
    caches = allocate_kv_cache(model.config, 8, BLOCK, torch.float32, "cpu", extra_layers=1)
    table = [3, 1, 5, 2]
    nxt, hidden = _prefill(model, PROMPT, caches, table)
    tokens = PROMPT[1:] + [nxt]  # pair i: (h_i, t_{i+1})
    t = len(PROMPT)
    meta = AttentionMetadata.build([t], [t], [table], BLOCK)
    with torch.inference_mode():
        _, logits = model.mtp(model.embed(torch.tensor(tokens)), hidden, torch.arange(t), meta,
                              caches[n])  # fmt: skip
        _, want = _reference(mtp_dir, hidden, tokens)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_mtp_propose_matches_reference(mtp_dir, k):
    """Drafts from the paged MTP KV (prompt pairs prefilled, then K one-token steps, K = 2 on
    the layer's own output) equal the dense reference, tokens and logits."""
    model = load_model(mtp_dir, mtp=True)
    n = model.config.num_hidden_layers
    caches = allocate_kv_cache(model.config, 8, BLOCK, torch.float32, "cpu", extra_layers=1)
    table = [6, 2, 4, 1]
    nxt, hidden = _prefill(model, PROMPT, caches, table)
    t = len(PROMPT)
    meta = AttentionMetadata.build([t - 1], [t - 1], [table], BLOCK)
    metas = [AttentionMetadata.build([1], [t + i], [table], BLOCK) for i in range(k)]
    with torch.inference_mode():
        model.mtp(model.embed(torch.tensor(PROMPT[1:])), hidden[:-1], torch.arange(t - 1), meta,
                  caches[n])  # fmt: skip
        drafts, logits = propose(model.mtp, model.embed, hidden[-1], nxt, t - 1, metas, caches[n])
        seq_h, seq_t = hidden, PROMPT[1:] + [nxt]
        for i in range(k):
            out, want = _reference(mtp_dir, seq_h, seq_t)
            torch.testing.assert_close(logits[i], want[-1], atol=1e-4, rtol=1e-4)
            assert drafts[i] == int(want[-1].argmax())
            seq_h, seq_t = torch.cat([seq_h, out[-1:]]), seq_t + [drafts[i]]
    assert len(drafts) == k


def test_extra_kv_layer_keeps_greedy_tokens(mtp_dir):
    """The main model with the MTP layer loaded and its KV layer allocated still decodes
    transformers' greedy tokens."""
    model = load_model(mtp_dir, mtp=True)
    caches = allocate_kv_cache(model.config, 8, BLOCK, torch.float32, "cpu", extra_layers=1)
    table = [7, 3, 1, 5]
    seq = list(PROMPT)
    nxt, _ = _prefill(model, seq, caches, table)
    out = [nxt]
    for _ in range(5):
        seq.append(out[-1])
        meta = AttentionMetadata.build([1], [len(seq)], [table], BLOCK)
        with torch.inference_mode():
            h = model(torch.tensor([seq[-1]]), torch.tensor([len(seq) - 1]), meta, caches)
            out.append(int(model.compute_logits(h)[0].argmax()))
    tokens, _ = hf_greedy(mtp_dir, [PROMPT], 6)
    assert out == tokens[0]


def test_mtp_errors(tmp_path, mtp_dir):
    plain = build_tiny_checkpoint("deepseek-v3", tmp_path / "plain", seed=4)
    with pytest.raises(ValueError, match="has no MTP weights"):
        load_model(plain, mtp=True)
    cfg = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match="num_nextn_predict_layers >= 1"):
        load_model(plain, mtp=True)
    qwen = build_tiny_checkpoint("qwen3-moe", tmp_path / "qwen", seed=4)
    with pytest.raises(ValueError, match="needs a DeepSeek-V3 checkpoint"):
        load_model(qwen, mtp=True)
    with pytest.raises(ValueError, match="part 'full'"):
        load_model(mtp_dir, part="attention", mtp=True)
    # without mtp=True the MTP layer is skipped and the model is the plain one
    assert not hasattr(load_model(mtp_dir), "mtp")
