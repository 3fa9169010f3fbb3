"""`afd bench spec`: offline decode throughput with speculative decoding off and on, side by side
in one process (rounds alternate which side goes first, so outside load falls on both), per
topology and workload: `repetitive` (greedy, on the prompts whose greedy output repeats itself
most: the best `--num-prompts` of 8x as many random prompts, scored by how often n-gram lookup
predicts the next output token, untimed) and `random` (random prompts at temperature 1: little
repeats).
Reports output tokens/s of each side, the speed-up, the acceptance on the speculative side, and
whether greedy tokens were the same."""

from __future__ import annotations

import argparse
import json
import random
import time
from statistics import median
from typing import Any

from afd.spec import parse_speculative_json

# topology name -> (attention workers, expert workers); 0, 0 is the single process
TOPOLOGIES = {"colocated": (0, 0), "1A1F": (1, 1), "2A1F": (2, 1)}
DEFAULT_SPEC = (
    '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, '
    '"prompt_lookup_min": 1}'
)
WORKLOADS = {"repetitive": 0.0, "random": 1.0}  # name -> temperature


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-qwen3-moe", help="model dir or built-in name")
    p.add_argument("--topologies", default="colocated,1A1F", help=f"of {', '.join(TOPOLOGIES)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    p.add_argument("--speculative-config", default=DEFAULT_SPEC, help="JSON, as afd serve's")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts per generate call")
    p.add_argument("--input-len", type=int, default=16, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (EOS ignored)")
    p.add_argument("--rounds", type=int, default=3, help="timed generate calls per side")
    p.add_argument("--dtype", default="float32", help="of the weights and the KV cache")
    p.add_argument("--seed", type=int, default=0, help="of the prompts and sampled requests")
    p.add_argument("--name", default="spec-decode", help="result name (NAME.json)")
    p.add_argument("--output", default=None, help="result JSON path (default: benchmarks/results)")


def _names(text: str, known: dict, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"--{what}: unknown {', '.join(bad) or '(none)'} (of {', '.join(known)})")
    return names


def _timed(llm, prompts: list[list[int]], params) -> tuple[float, float, list[list[int]]]:
    """(wall seconds, mean per-request decode tok/s: tokens after the first over the time
    from first to last, tokens)."""
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    rates = [
        (len(o.outputs[0].token_ids) - 1) / (o.metrics.finished_time - o.metrics.first_token_time)
        for o in outs
    ]
    return seconds, sum(rates) / len(rates), [o.outputs[0].token_ids for o in outs]


def repetitive_prompts(llm, candidates: list[list[int]], n: int, spec) -> tuple[list, float]:
    """The n candidates whose greedy outputs n-gram lookup predicts best, and their mean score
    (the fraction of output tokens after the first that lookup predicted)."""
    from afd import SamplingParams
    from afd.spec.ngram import propose_ngram

    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in candidates], params, use_tqdm=False)
    scored = []
    for p, o in zip(candidates, outs, strict=True):
        t = o.outputs[0].token_ids
        hits = [propose_ngram(p + t[:j], 1, spec.prompt_lookup_min, spec.prompt_lookup_max)
                == [t[j]] for j in range(1, len(t))]  # fmt: skip
        scored.append((sum(hits) / len(hits), p))
    scored.sort(key=lambda x: -x[0])
    best = scored[:n]
    return [p for _, p in best], sum(s for s, _ in best) / len(best)


def _spec_stats(llm) -> dict[str, float]:
    return {k: v for k, v in llm.engine.stats().items() if k.startswith("spec_decode")}


def compare(llms: dict, prompts, params, rounds: int) -> dict[str, Any]:
    """Alternating timed rounds of both sides (after one untimed warm-up each)."""
    from afd.spec.drafter import SpecCounts

    times: dict[str, list[float]] = {"off": [], "on": []}
    decode: dict[str, list[float]] = {"off": [], "on": []}
    tokens: dict[str, list] = {}
    for side in ("off", "on"):
        _timed(llms[side], prompts, params)
    before = _spec_stats(llms["on"])
    for r in range(rounds):
        for side in ("off", "on") if r % 2 == 0 else ("on", "off"):
            seconds, rate, tokens[side] = _timed(llms[side], prompts, params)
            times[side].append(seconds)
            decode[side].append(rate)
    after = _spec_stats(llms["on"])
    counts = SpecCounts.from_stats({k: v - before.get(k, 0.0) for k, v in after.items()})
    n_out = sum(len(t) for t in tokens["on"])
    tok_s = {side: n_out / median(ts) for side, ts in times.items()}
    per_request = {side: median(r) for side, r in decode.items()}
    return {
        "seconds": times,
        "output_tokens": n_out,
        "tok_s_off": tok_s["off"],
        "tok_s_on": tok_s["on"],
        "throughput_speedup": tok_s["on"] / tok_s["off"],
        "decode_tok_s_per_request_off": per_request["off"],
        "decode_tok_s_per_request_on": per_request["on"],
        "speedup": per_request["on"] / per_request["off"],
        "same_tokens": tokens["on"] == tokens["off"],
        "spec_decode": counts.summary(),
    }


def run(args: argparse.Namespace) -> int:
    from afd import LLM, SamplingParams
    from afd.results import check_clean, results_dir, write_result

    spec = parse_speculative_json(args.speculative_config)
    topologies = _names(args.topologies, TOPOLOGIES, "topologies")
    workloads = _names(args.workloads, WORKLOADS, "workloads")
    path = args.output or results_dir() / f"{args.name}.json"
    check_clean(path, getattr(args, "allow_dirty", False))
    rng = random.Random(args.seed)
    candidates = [[rng.randrange(16, 500) for _ in range(args.input_len)]
                  for _ in range(8 * args.num_prompts)]  # fmt: skip
    rows = []
    for topo in topologies:
        a, f = TOPOLOGIES[topo]
        kw = {"dtype": args.dtype, "num_attention_workers": a, "num_expert_workers": f}
        llms = {"off": LLM(args.model, **kw), "on": LLM(args.model, speculative_config=spec, **kw)}
        try:
            for wl in workloads:
                params = SamplingParams(temperature=WORKLOADS[wl], seed=args.seed,
                                        max_tokens=args.output_len, ignore_eos=True)  # fmt: skip
                prompts, score = candidates[: args.num_prompts], None
                if wl == "repetitive":
                    prompts, score = repetitive_prompts(llms["off"], candidates,
                                                        args.num_prompts, spec)  # fmt: skip
                row = {"topology": topo, "workload": wl, "lookup_predictability": score,
                       **compare(llms, prompts, params, args.rounds)}  # fmt: skip
                s = row["spec_decode"]
                print(f"{topo:10s} {wl:10s} decode tok/s per request: off "
                      f"{row['decode_tok_s_per_request_off']:7.1f}, on "
                      f"{row['decode_tok_s_per_request_on']:7.1f} (x{row['speedup']:.2f}); "
                      f"batch x{row['throughput_speedup']:.2f}; acceptance "
                      f"{s['acceptance_rate'] or 0:.0%}, length "
                      f"{s['mean_acceptance_length'] or 1:.2f}")  # fmt: skip
                rows.append(row)
        finally:
            for llm in llms.values():
                llm.shutdown()
    payload = {"model": args.model, "speculative_config": json.loads(args.speculative_config),
               "num_prompts": args.num_prompts, "input_len": args.input_len,
               "output_len": args.output_len, "rounds": args.rounds, "runs": rows}  # fmt: skip
    out = write_result(args.name, payload, path=path, argv=getattr(args, "command_argv", None),
                       allow_dirty=getattr(args, "allow_dirty", False))  # fmt: skip
    print(f"results written to {out}")
    return 0
