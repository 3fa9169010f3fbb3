"""Hardware presets for GPUs that are not at hand, and the roofline cost model built from them.

Peak figures are the vendors' dense (no sparsity) data-sheet numbers per GPU; NVLink and NIC
bandwidths are per GPU and per direction. Prices are assumed hourly list prices in USD, only for
ranking by cost: override them (`afd plan --price-per-hour`). Efficiencies say what fraction of
a peak a kernel reaches; their defaults are documented in docs/planner.md and can be overridden
(`--efficiency name=value`) or calibrated from an `afd bench kernels` JSON taken on that GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from afd.scheduler.planner.step_model import ModelShape


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak reached, and fixed per-kernel costs (seconds)."""

    matmul: float = 0.6  # weight GEMMs and grouped expert GEMMs, of peak FLOP/s
    attention_flops: float = 0.5  # attention core, of peak FLOP/s (bf16)
    memory: float = 0.7  # weight and KV streaming, of HBM bandwidth
    link: float = 0.7  # NVLink / NIC transfers, of link bandwidth
    attention_overhead_s: float = 30e-6  # launches and small kernels of one attention layer
    expert_overhead_s: float = 20e-6  # routing permutation, launches of one expert layer
    link_latency_s: float = 20e-6  # one dispatch or combine, beyond its bytes
    host_step_s: float = 1e-3  # scheduling, plans and results of one scheduling step
    host_per_seq_s: float = 2e-6  # the part that grows with the running sequences

    def with_overrides(self, overrides: dict[str, float]) -> Efficiency:
        names = {f.name for f in fields(self)}
        for key, value in overrides.items():
            if key not in names:
                raise ValueError(f"unknown efficiency {key!r}; choose from {', '.join(names)}")
            if not (isinstance(value, int | float) and 0 <= value < float("inf")):
                raise ValueError(f"efficiency {key} must be a finite number >= 0")
            if key in ("matmul", "attention_flops", "memory", "link") and not 0 < value <= 1:
                raise ValueError(f"efficiency {key} must be in (0, 1]")
        return replace(self, **overrides)


@dataclass(frozen=True)
class Hardware:
    """One GPU model: peaks, memory, links, price."""

    name: str
    bf16_tflops: float
    fp8_tflops: float | None  # None: no FP8 tensor cores (FP8 weights run as bf16)
    hbm_gbps: float  # GB/s
    hbm_gb: float
    nvlink_gbps: float  # per GPU, per direction; 0 = PCIe only
    nic_gbps: float  # GB/s per GPU (400 Gb/s = 50 GB/s)
    gpus_per_node: int
    price_per_hour: float
    efficiency: Efficiency = field(default_factory=Efficiency)

    def link_gbps(self, workers: int) -> float:
        """Bandwidth between two workers: NVLink inside one node, the NIC across nodes."""
        if workers <= self.gpus_per_node and self.nvlink_gbps > 0:
            return self.nvlink_gbps
        return self.nic_gbps


# Data-sheet numbers (dense). H800/A800: export variants with NVLink cut to 400 GB/s
# bidirectional (200 per direction); H20: Hopper with 296 FP8 TFLOP/s and 4.0 TB/s.
PRESETS: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("H100", 989, 1979, 3350, 80, 450, 50, 8, 3.0),
        Hardware("H200", 989, 1979, 4800, 141, 450, 50, 8, 3.8),
        Hardware("H800", 989, 1979, 3350, 80, 200, 50, 8, 3.0),
        Hardware("H20", 148, 296, 4000, 96, 450, 50, 8, 1.3),
        Hardware("A100", 312, None, 2039, 80, 300, 25, 8, 1.8),
        Hardware("A800", 312, None, 2039, 80, 200, 25, 8, 1.6),
        Hardware("L40S", 362, 733, 864, 48, 0, 25, 8, 1.0),
        Hardware("B200", 2250, 4500, 8000, 180, 900, 50, 8, 6.0),
    )
}
DTYPE_BYTES = {"fp8": 1.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}


def get_preset(name: str) -> Hardware:
    key = {k.lower(): k for k in PRESETS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown hardware {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[key]


def calibrate(hw: Hardware, kernels_json: str | Path) -> Hardware:
    """Efficiencies measured on that GPU by `afd bench kernels`: memory = median achieved GB/s
    of paged GQA decode over the data-sheet HBM bandwidth; matmul = best fused-MoE TFLOP/s over
    the data-sheet bf16 peak."""
    try:
        report = json.loads(Path(kernels_json).read_text())
        rows = report["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read an afd bench kernels JSON from {kernels_json}: {e}") from e
    if report.get("device_type") != "cuda":
        raise ValueError(f"{kernels_json} was not taken on a GPU (device_type != cuda)")
    gbps = sorted(r["GBps"] for r in rows if r.get("kernel") == "paged_attention")
    tflops = [r["TFLOPs"] for r in rows if r.get("kernel") == "fused_moe" and "TFLOPs" in r]
    overrides = {}
    if gbps:
        overrides["memory"] = min(1.0, gbps[len(gbps) // 2] / hw.hbm_gbps)
    if tflops:
        overrides["matmul"] = min(1.0, max(tflops) / hw.bf16_tflops)
    if not overrides:
        raise ValueError(f"{kernels_json} has no paged_attention or fused_moe rows")
    return replace(hw, efficiency=hw.efficiency.with_overrides(overrides))


class RooflineCosts:
    """Costs of a model on a preset GPU: each kernel takes max(FLOPs / FLOP/s, bytes / BW) at
    the preset's efficiencies, plus its fixed overhead (docs/planner.md)."""

    device = "cuda"
    cores = 1
    interference = (1.0, 1.0)

    def __init__(
        self,
        shape: ModelShape,
        hw: Hardware,
        weight_dtype: str = "bf16",
        kv_dtype: str = "bf16",
        workers: int = 8,
        memory_utilization: float = 0.9,
    ):
        if weight_dtype not in DTYPE_BYTES or kv_dtype not in DTYPE_BYTES:
            raise ValueError(f"dtypes must be one of {', '.join(DTYPE_BYTES)}")
        self.shape, self.hw = shape, hw
        self.eff = hw.efficiency
        self.weight_bytes = DTYPE_BYTES[weight_dtype]
        self.kv_bytes = DTYPE_BYTES[kv_dtype]
        self.act_bytes = 2  # bf16 activations on the wire
        fp8 = weight_dtype == "fp8" and hw.fp8_tflops
        self.mm_flops = (hw.fp8_tflops if fp8 else hw.bf16_tflops) * 1e12 * self.eff.matmul
        self.attn_flops = hw.bf16_tflops * 1e12 * self.eff.attention_flops
        self.bw = hw.hbm_gbps * 1e9 * self.eff.memory
        self.link = hw.link_gbps(workers) * 1e9 * self.eff.link
        self.memory_per_worker = hw.hbm_gb * 1e9 * memory_utilization

    def _gemm(self, tokens: float, params: float) -> float:
        return max(2 * tokens * params / self.mm_flops, params * self.weight_bytes / self.bw)

    def attention_layer(self, moe: bool, batch: int, context: float) -> float:
        s = self.shape
        core = max(
            batch * context * s.attention_flops_per_context_token() / self.attn_flops,
            batch * context * s.kv_elems_per_token() * self.kv_bytes / self.bw,
        )
        return (
            self.eff.attention_overhead_s + core + self._gemm(batch, s.attention_side_params(moe))
        )

    def expert_layer(self, pairs: float, active: float, held: int) -> float:
        p = self.shape.expert_params()
        flops = 2 * pairs * p / self.mm_flops
        return self.eff.expert_overhead_s + max(flops, active * p * self.weight_bytes / self.bw)

    def sample(self, batch: int) -> float:
        return self._gemm(batch, self.shape.vocab * self.shape.hidden) + 5e-6

    def prep(self, batch: int, context: float) -> float:
        return 0.0

    def transfer(self, nbytes: float, direction: str = "dispatch") -> tuple[float, float, float]:
        return 0.0, self.eff.link_latency_s + nbytes / self.link, 0.0

    def host(self, batch: int, disaggregated: bool, context: float) -> float:
        return self.eff.host_step_s + self.eff.host_per_seq_s * batch

    def colocated_step(self, batch: int, context: float) -> float | None:
        return None

    def prefill(self, tokens: int) -> float:
        s = self.shape
        params = sum(s.attention_side_params(moe) for moe in [False] * s.dense_layers)
        params += s.moe_layers * (s.attention_side_params(True) + s.top_k * s.expert_params())
        weights = s.dense_layers * s.attention_side_params(False)
        weights += s.moe_layers * (s.attention_side_params(True) + s.experts * s.expert_params())
        attn = s.layers * tokens * tokens / 2 * s.attention_flops_per_context_token()
        return max(2 * tokens * params / self.mm_flops, weights * self.weight_bytes / self.bw) + (
            attn / self.attn_flops
        )
