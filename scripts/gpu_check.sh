#!/usr/bin/env bash
# The GPU check: run it on any machine with one (or more) CUDA GPU where AFD is installed
# (scripts/setup.sh, or `pip install -e ".[test]"` with a CUDA torch). No network, nothing else to
# install, at most 8 minutes (each step has its own time limit):
#   1. every tests/test_gpu*.py (the kernel gate: compiled Triton kernels incl. the FP8 GEMMs
#      against their references; the CUDA engine against the CPU engine, the 1P+1A+1F and 1P+2A+2F clusters on the one GPU answering the
#      openai client with the CPU engine's greedy text);
#   2. afd bench kernels (default GPU sweep of the Triton kernels, FP8 GEMMs and FP8 fused MoE
#      included);
#   3. afd bench pipeline --device cuda, all workers on one GPU, bf16, with the activations
#      dispatched in bf16 and in FP8 (the wire bytes should about halve).
# Results: benchmarks/results/<gpu name>/ (kernels.json, pipeline-gpu-*.json, gpu_check.json
# and one log per step); a summary is printed at the end. Exit code 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0

if ! GPU=$("$PY" -c "import torch; assert torch.cuda.is_available(); \
from afd.benchmarks.results import machine_name; print(machine_name('cuda'))" 2>/dev/null); then
    echo "gpu_check: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 2
fi
OUT="benchmarks/results/$GPU"
mkdir -p "$OUT"
echo "gpu_check: $GPU -> $OUT"
STEPS=()

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/gpu_check_NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "gpu_check: [$name] $* (limit ${limit}s)"
    timeout --signal=INT --kill-after=5 "$limit" "$@" >"$OUT/gpu_check_$name.log" 2>&1
    rc=$?
    STEPS+=("$name $rc $(($(date +%s) - start))")
    tail -n 3 "$OUT/gpu_check_$name.log"
}

step tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu*.py
# triton only: the torch references take minutes at these sizes (tests/ compares them)
step kernels 70 "$PY" -m afd bench kernels --backends triton --output "$OUT/kernels.json"
for dd in auto fp8; do
    step "pipeline-$dd" 40 "$PY" -m afd bench pipeline --device cuda --gpus-per-node 1 \
        --dtype bfloat16 --dispatch-dtype "$dd" --batch-size 256 --steps 6 --warmup 2 \
        --no-colocated --output-dir "$OUT" --name "pipeline-gpu-$dd"
done

"$PY" - "$OUT" "${STEPS[@]}" <<'EOF'
"""Summary of the GPU check: step results, kernel rates, FP8 vs bf16, the pipeline's bytes."""
import json
import sys
from pathlib import Path

from afd.benchmarks.results import write_result

out = Path(sys.argv[1])
steps = []
for item in sys.argv[2:]:
    name, rc, seconds = item.split()
    steps.append({"step": name, "exit_code": int(rc), "seconds": int(seconds)})
    state = "ok" if rc == "0" else ("TIMED OUT" if rc in ("124", "137") else f"FAILED ({rc})")
    print(f"{name:16s} {state:12s} {seconds:>4s} s  log: {out}/gpu_check_{name}.log")


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


summary = {"steps": steps}
kernels = load("kernels.json")
if kernels:
    limits = kernels["limits"]
    print(f"\n{kernels['device']}: copy {limits['copy_GBps']:.0f} GB/s, "
          f"matmul {limits['matmul_TFLOPs']:.0f} TFLOP/s ({kernels['dtype']})")
    for row in kernels["results"]:
        if row["backend"] != "triton":
            continue
        rate = (f"{row['TFLOPs']:8.1f} TFLOP/s {row['fraction_of_matmul']:5.0%} of matmul"
                if "TFLOPs" in row else
                f"{row['GBps']:8.0f} GB/s    {row['fraction_of_copy_bw']:5.0%} of copy")
        print(f"  {row['kernel']:16s} {rate}  {row['shape']}")
    moe = {}
    for row in kernels["results"]:
        if row["backend"] == "triton" and row["kernel"] in ("fused_moe", "fused_moe_fp8"):
            moe.setdefault(json.dumps(row["shape"], sort_keys=True), {})[row["kernel"]] = row
    pairs = [(k, v) for k, v in moe.items() if len(v) == 2]
    summary["fp8_over_bf16_moe"] = []
    for shape, v in pairs:
        ratio = v["fused_moe_fp8"]["TFLOPs"] / v["fused_moe"]["TFLOPs"]
        summary["fp8_over_bf16_moe"].append({"shape": json.loads(shape), "ratio": ratio})
        print(f"  FP8 / bf16 fused MoE {ratio:.2f}x at {shape}")
wire = {}
for dd in ("auto", "fp8"):
    result = load(f"pipeline-gpu-{dd}.json")
    if result:
        best = max(result["runs"], key=lambda r: r["decode_tokens_per_s"])
        wire[dd] = best["wire_bytes_per_step"].get("dispatch", 0)
        print(f"\npipeline dispatch {dd}: {best['decode_tokens_per_s']:.0f} tok/s (m={best['m']}), "
              f"A->F {wire[dd] / 1e6:.3f} MB per decode step")
if len(wire) == 2 and wire["auto"]:
    summary["fp8_dispatch_bytes_ratio"] = wire["fp8"] / wire["auto"]
    print(f"FP8 dispatch sends {wire['fp8'] / wire['auto']:.2f}x the bf16 bytes")
path = write_result("gpu_check", summary, device="cuda", path=out / "gpu_check.json")
print(f"\nwrote {path}")
sys.exit(0 if all(s["exit_code"] == 0 for s in steps) else 1)
EOF
