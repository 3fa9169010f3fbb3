"""Building blocks shared by the model families: norms, rotary, MLP, router, expert shard, MoE."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from afd.kernels import ops
from afd.quantization import Fp8Config


class RMSNorm(nn.Module):
    """RMSNorm; with `residual` it returns (norm(x + residual), x + residual)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding; `interleaved` pairs (x0, x1), (x2, x3) as DeepSeek does.

    Frequencies and the YaRN attention factor come from transformers' own rope init functions, so
    every scaling type it knows is computed the same way.
    """

    def __init__(self, hf_config, dim: int, interleaved: bool):
        super().__init__()
        self.hf_config, self.dim, self.interleaved = hf_config, dim, interleaved
        # Computed on first use, on the CPU: models are built on the meta device before loading.
        self._inv_freq: torch.Tensor | None = None
        self.attention_scaling = 1.0

    def _init_freqs(self) -> torch.Tensor:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf, dim = self.hf_config, self.dim
        params = getattr(hf, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        with torch.device("cpu"):
            if rope_type == "default":
                base = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
                inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
                scaling = 1.0
            elif rope_type in ROPE_INIT_FUNCTIONS:
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf)
            else:
                raise ValueError(f"unsupported rope_type {rope_type!r}")
        self.attention_scaling = float(scaling)
        return inv_freq

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = self._init_freqs().to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq[None, :]  # [T, d/2]
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]  # [T, 1, d/2]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cache: dict | None = None
    ):
        """Rotate q and k; `cache` (a forward's AttentionMetadata.derived) keeps cos/sin for the
        other layers of the forward: the same positions and rope everywhere."""
        key = ("rope", self.dim, self.interleaved, q.dtype)
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0] is positions:
            cos, sin = hit[1], hit[2]
        else:
            cos, sin = self.cos_sin(positions, q.dtype)
            cos, sin = cos[:, 0], sin[:, 0]
            if cache is not None:
                cache[key] = (positions, cos, sin)
        return ops.rotary_embedding(q, k, cos, sin, self.interleaved)


class DenseMLP(nn.Module):
    """SiLU-gated MLP (dense layers, shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The gate: top-k expert ids and weights per token, with every family's selection rule.

    `scoring`: softmax | sigmoid. `method`: greedy | group_limited_greedy | noaux_tc.
    `routed_scaling_factor` is folded into the returned weights.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        scoring: str = "softmax",
        method: str = "greedy",
        norm_topk_prob: bool = False,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        fp32_logits: bool = False,
        correction_bias: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.method = scoring, method
        self.norm_topk_prob = norm_topk_prob
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.fp32_logits = fp32_logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fp32_logits:
            logits = F.linear(x.float(), self.weight.float())  # [T, E]
        else:
            logits = F.linear(x, self.weight)
        if self.scoring == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        if self.method == "noaux_tc":
            ids = self._grouped_topk(scores + self.e_score_correction_bias, by_top2=True)
            weights = scores.gather(1, ids)
        elif self.method == "group_limited_greedy":
            ids = self._grouped_topk(scores, by_top2=False)
            weights = scores.gather(1, ids)
        else:
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            denom = weights.sum(dim=-1, keepdim=True)
            weights = weights / (denom + 1e-20 if self.method == "noaux_tc" else denom)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        if not self.fp32_logits:
            weights = weights.to(logits.dtype)
        return weights, ids  # [T, k], [T, k]

    def _grouped_topk(self, scores: torch.Tensor, by_top2: bool) -> torch.Tensor:
        t = scores.shape[0]
        grouped = scores.view(t, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if by_top2 else grouped.max(-1).values
        group_idx = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        keep = group_mask[:, :, None].expand_as(grouped).reshape(t, self.num_experts).bool()
        fill = float("-inf") if by_top2 else 0.0
        return torch.topk(scores.masked_fill(~keep, fill), self.top_k, dim=-1, sorted=False)[1]


def _fp8_param(*shape: int, device) -> nn.Parameter:
    data = torch.empty(*shape, dtype=torch.float8_e4m3fn, device=device)
    return nn.Parameter(data, requires_grad=False)


def _scale_param(rows: int, cols: int, block: tuple[int, int], *lead: int, device) -> nn.Parameter:
    """float32 scales of an [rows, cols] weight in `block` blocks: [*lead, Rb, Cb]."""
    shape = (*lead, -(-rows // block[0]), -(-cols // block[1]))
    return nn.Parameter(torch.empty(shape, dtype=torch.float32, device=device), requires_grad=False)


class Fp8Linear(nn.Module):
    """A linear layer holding a block-FP8 weight [out, in] and its float32 `weight_scale_inv`
    [ceil(out/bn), ceil(in/bk)] as the checkpoint stores them; activations are quantized per
    token and bk channels on every call (ops.fp8_linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, block, device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.weight = _fp8_param(out_features, in_features, device=device)
        self.weight_scale_inv = _scale_param(out_features, in_features, self.block, device=device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, block) -> Fp8Linear:
        """An FP8 twin of `linear` (same device, the bias keeps its dtype)."""
        dev = linear.weight.device
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, block, dev)
        if linear.bias is not None:
            new.bias = nn.Parameter(torch.empty_like(linear.bias))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = ops.fp8_linear(x.reshape(-1, shape[-1]), self.weight, self.weight_scale_inv,
                             self.block, self.bias)  # fmt: skip
        return out.view(*shape[:-1], self.out_features)


class ExpertShard(nn.Module):
    """Routed experts [start, end) stacked for a grouped GEMM; other ids contribute zero."""

    def __init__(self, hidden_size: int, intermediate_size: int, start: int, end: int):
        super().__init__()
        self.start, self.end = start, end
        n = end - start
        self.w13 = nn.Parameter(torch.empty(n, 2 * intermediate_size, hidden_size))  # [E, 2I, H]
        self.w2 = nn.Parameter(torch.empty(n, hidden_size, intermediate_size))  # [E, H, I]
        self.block: tuple[int, int] | None = None  # set by to_fp8

    def to_fp8(self, block: tuple[int, int]) -> None:
        """Hold block-FP8 experts: w13/w2 in e4m3 plus float32 scales; w13_scale stacks the
        gate's scale blocks, then the up projection's, so I need not be a multiple of bn."""
        n, two_inter, hidden = self.w13.shape
        inter, dev = two_inter // 2, self.w13.device
        self.block = tuple(block)
        self.w13 = _fp8_param(n, two_inter, hidden, device=dev)
        self.w2 = _fp8_param(n, hidden, inter, device=dev)
        gate = _scale_param(inter, hidden, self.block, n, device=dev)  # [E, Ib, Hb]
        self.w13_scale = nn.Parameter(torch.cat([gate, gate], dim=1), requires_grad=False)
        self.w2_scale = _scale_param(hidden, inter, self.block, n, device=dev)  # [E, Hb, Ib]

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        local = topk_ids - self.start
        local = torch.where((topk_ids >= self.start) & (topk_ids < self.end), local, -1)
        if self.block is not None:
            return ops.fused_moe_fp8(x, self.w13, self.w13_scale, self.w2, self.w2_scale,
                                     topk_weights, local, self.block)  # fmt: skip
        return ops.fused_moe(x, self.w13, self.w2, topk_weights, local)


class MoE(nn.Module):
    """Gate + routed experts + shared experts. In AFD the gate and shared part stay on the
    attention side and only `experts` runs on expert workers; `experts` is None there."""

    def __init__(
        self,
        gate: Router,
        experts: ExpertShard | None,
        shared: DenseMLP | None,
        shared_gate: bool,
        hidden_size: int,
        shared_attr: str,
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_attr = shared_attr
        if shared is not None:
            setattr(self, shared_attr, shared)
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_gate else None

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        mlp = getattr(self, self.shared_attr, None)
        if mlp is None:
            return None
        out = mlp(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        shared = self.shared(x)
        return out if shared is None else out + shared


# Linear layers that stay unquantized even when the rest is FP8: the absorbed MLA reads
# kv_b_proj's weight directly (dequantized once at load, as vLLM does), and the tiny
# shared-expert gate of Qwen2-MoE is a [1, H] vector.
KEEP_DENSE = ("kv_b_proj", "shared_expert_gate")


def convert_to_fp8(model: nn.Module, config: Fp8Config, is_fp8) -> None:
    """Switch a (meta) skeleton's linear layers and expert shards to FP8 where `is_fp8(name)`
    says the weight `name` (checkpoint naming) should be FP8. Run after any `.to(dtype)`."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and child_name not in KEEP_DENSE:
                if ".layers." in f".{full}" and is_fp8(f"{full}.weight"):
                    setattr(module, child_name, Fp8Linear.like(child, config.block))
            elif isinstance(child, ExpertShard):
                # "model.layers.3.mlp.experts" (full model) or "experts.3" (expert shard)
                layer = re.search(r"(?:layers\.(\d+)\.mlp\.experts|^experts\.(\d+))$", full)
                index = next(g for g in layer.groups() if g is not None)
                first = f"model.layers.{index}.mlp.experts.{child.start}.gate_proj.weight"
                if is_fp8(first):
                    child.to_fp8(config.block)
