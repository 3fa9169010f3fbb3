"""One offline-generation round of `afd bench peer`, run as a script in a fresh process of the
engine's own venv (vLLM's from the peer venv, which has no AFD):

    python peer_offline.py {afd|vllm|transformers} JOB.json OUT.json [--reference]

JOB.json: {"model": dir, "dtype": "float32", "max_model_len": N, "seed": S,
"workloads": {name: {"prompts": [[token ids]], "max_tokens": N}}}. OUT.json: per workload the
greedy tokens, the seconds of the timed generate call and tok/s, plus load time and torch threads.
`--reference` (transformers): also each prompt's greedy tokens generated alone, untimed, as the
reference the engines must equal (a left-padded batch can flip a near tie).
Only the standard library is imported at the top: each engine's imports happen in its function.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

WARMUP_PROMPTS = 2  # short untimed requests first: lazy inits and first-call costs stay out


def _warmup_prompts(workload: dict) -> list[list[int]]:
    return [p[:16] for p in workload["prompts"][:WARMUP_PROMPTS]]


def run_afd(job: dict) -> dict[str, Any]:
    """afd.LLM (the single-process engine), greedy, EOS ignored."""
    import torch

    import afd.version
    from afd.entrypoints.llm import LLM
    from afd.sampling.params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        seed=job["seed"],
    )
    load_s = time.perf_counter() - t0

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    result = _timed(
        job, generate, load_s, torch.get_num_threads(), f"afd {afd.version.__version__}"
    )
    result["afd_path"] = afd.version.__file__  # which checkout ran (afd bench offline's two sides)
    return result


def run_vllm(job: dict) -> dict[str, Any]:
    """vllm.LLM from the peer venv, greedy, EOS ignored (its engine core logs its threads)."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        seed=job["seed"],
    )
    load_s = time.perf_counter() - t0

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        return [list(o.outputs[0].token_ids) for o in outs]

    return _timed(job, generate, load_s, torch.get_num_threads(), f"vllm {vllm.__version__}")


def run_transformers(job: dict) -> dict[str, Any]:
    """transformers `generate` on one left-padded batch of all prompts, greedy, EOS ignored."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    dtype = getattr(torch, job["dtype"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    pad = 0

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=pad,
            )
        return out[:, width:].tolist()

    version = f"transformers {transformers.__version__}"
    result = _timed(job, generate, load_s, torch.get_num_threads(), version)
    if job.get("reference"):
        for name, w in job["workloads"].items():
            alone = [generate([p], w["max_tokens"])[0] for p in w["prompts"]]
            result["workloads"][name]["reference_tokens"] = alone
    return result


def _timed(job: dict, generate, load_s: float, threads: int, version: str) -> dict[str, Any]:
    results = {}
    for name, w in job["workloads"].items():
        generate(_warmup_prompts(w), 4)
        t0 = time.perf_counter()
        tokens = generate(w["prompts"], w["max_tokens"])
        seconds = time.perf_counter() - t0
        out_tokens = sum(len(t) for t in tokens)
        in_tokens = sum(len(p) for p in w["prompts"])
        results[name] = {
            "generate_s": seconds,
            "output_tokens": out_tokens,
            "output_tok_s": out_tokens / seconds,
            "total_tok_s": (in_tokens + out_tokens) / seconds,
            "tokens": tokens,
        }
    return {"version": version, "load_s": load_s, "torch_threads": threads, "workloads": results}


ENGINES = {"afd": run_afd, "vllm": run_vllm, "transformers": run_transformers}


def main(argv: list[str]) -> int:
    """Run one engine on JOB.json's workloads and write OUT.json."""
    if len(argv) not in (3, 4) or argv[0] not in ENGINES or argv[3:] not in ([], ["--reference"]):
        usage = f"usage: peer_offline.py {{{'|'.join(ENGINES)}}} JOB.json OUT.json [--reference]"
        print(usage, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        job = json.load(f)
    job["reference"] = argv[3:] == ["--reference"]
    result = ENGINES[argv[0]](job)
    with open(argv[2], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
