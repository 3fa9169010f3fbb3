"""Published decode operating points, reproduced from hardware presets and the models' public
configurations (docs/planner.md cites the sources and discusses the residuals)."""

from __future__ import annotations

from dataclasses import dataclass

from afd.scheduler.planner.step_model import ModelShape, StepConfig

# DeepSeek-V3 config.json (deepseek-ai/DeepSeek-V3): 61 layers, the first 3 dense, MLA.
DEEPSEEK_V3 = ModelShape(
    name="deepseek-v3",
    hidden=7168,
    layers=61,
    moe_layers=58,
    vocab=129280,
    experts=256,
    top_k=8,
    moe_intermediate=2048,
    shared_intermediate=2048,
    dense_intermediate=18432,
    attention="mla",
    q_heads=128,
    kv_heads=128,
    head_dim=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
)
# Step-3 (arXiv 2507.19427 Table 1): 61 layers, MoE in all but the first four and the last, MFA
# with a 2048-wide low-rank query, 64 query heads sharing one 256-wide key and value head; 48
# routed experts top-3 and one shared expert, 5120 wide; dense layers 18432 wide (these widths
# give the paper's 316B total and 38B activated parameters).
STEP3 = ModelShape(
    name="step3",
    hidden=7168,
    layers=61,
    moe_layers=56,
    vocab=128815,
    experts=48,
    top_k=3,
    moe_intermediate=5120,
    shared_intermediate=5120,
    dense_intermediate=18432,
    attention="mfa",
    q_heads=64,
    kv_heads=1,
    head_dim=256,
    q_lora_rank=2048,
)
PUBLISHED_SHAPES = {s.name: s for s in (DEEPSEEK_V3, STEP3)}


@dataclass(frozen=True)
class OperatingPoint:
    """A published decode figure and the configuration that produced it."""

    name: str
    source: str
    hardware: str
    shape: ModelShape
    config: StepConfig
    weight_dtype: str
    kv_dtype: str
    tokens_per_s_per_gpu: float
    step_ms: float | None = None


POINTS = [
    OperatingPoint(
        "DeepSeek-V3 decode profile (EP, 2 micro-batches)",
        "deepseek-ai/profile-data; 2,324 TGS as cited in arXiv 2507.19427 Table 8",
        "H800",
        DEEPSEEK_V3,
        StepConfig(kind="ep", attention_workers=128, micro_batches=2, batch=128, context=4096),
        "fp8",
        "bf16",
        2324.0,
        128 / 2324 * 1e3,
    ),
    OperatingPoint(
        "Step-3 2A2F, FP8 attention, 4K",
        "arXiv 2507.19427 Table 8 and Sec. 7.3 (batch 6144 in 3 micro-batches of 2048)",
        "H800",
        STEP3,
        StepConfig(
            kind="afd",
            attention_workers=16,
            expert_workers=16,
            micro_batches=3,
            batch=384,
            context=4096,
        ),
        "fp8",
        "fp8",
        4039.0,
        6144 / (4039 * 32) * 1e3,
    ),
    OperatingPoint(
        "Step-3 3A2F, BF16 attention, 4K",
        "arXiv 2507.19427 Table 8 (batch 6048, 3 micro-batches of 672 per instance)",
        "H800",
        STEP3,
        StepConfig(
            kind="afd",
            attention_workers=24,
            expert_workers=16,
            micro_batches=3,
            batch=252,
            context=4096,
        ),
        "fp8",
        "bf16",
        3321.0,
        6048 / (3321 * 40) * 1e3,
    ),
    OperatingPoint(
        "Step-3 4A2F, FP8 attention, 8K",
        "arXiv 2507.19427 Table 8",
        "H800",
        STEP3,
        StepConfig(
            kind="afd",
            attention_workers=32,
            expert_workers=16,
            micro_batches=3,
            batch=192,
            context=8192,
        ),
        "fp8",
        "fp8",
        2643.0,
        6144 / (2643 * 48) * 1e3,
    ),
]


# Both systems schedule on the host while the GPUs run the previous step (and one host
# process serves each attention GPU), so none of their host time is on the step's path.
OVERLAPPED_HOST = {"host_step_s": 0.0, "host_per_seq_s": 0.0}


def reproduce() -> list[dict]:
    """Predicted against published tokens/s per GPU for every point (preset efficiencies,
    host time overlapped)."""
    from dataclasses import replace

    from afd.scheduler.planner.hardware import RooflineCosts, get_preset
    from afd.scheduler.planner.step_model import predict

    rows = []
    for p in POINTS:
        hw = get_preset(p.hardware)
        hw = replace(hw, efficiency=hw.efficiency.with_overrides(OVERLAPPED_HOST))
        costs = RooflineCosts(p.shape, hw, p.weight_dtype, p.kv_dtype, workers=p.config.workers)
        pred = predict(costs, p.config)
        per_gpu = pred.decode_tokens_per_s / p.config.workers
        rows.append(
            {
                "name": p.name,
                "source": p.source,
                "hardware": p.hardware,
                "topology": p.config.label(),
                "gpus": p.config.workers,
                "micro_batches": p.config.micro_batches,
                "batch_per_attention_gpu": p.config.batch,
                "context": p.config.context,
                "published_tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
                "predicted_tokens_per_s_per_gpu": per_gpu,
                "residual": per_gpu / p.tokens_per_s_per_gpu - 1.0,
                "published_step_ms": p.step_ms,
                "predicted_step_ms": pred.step_time_s * 1e3,
                "stages_ms": {k: v * 1e3 for k, v in pred.stages_s.items()},
                "bubble_fraction": pred.bubble_fraction,
                "bottleneck": pred.bottleneck,
                "memory_ok": pred.memory_ok,
            }
        )
    return rows
