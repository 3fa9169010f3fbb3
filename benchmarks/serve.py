"""`afd bench serve`: load generator for any OpenAI-compatible server, with the metric set of
`vllm bench serve` (TTFT, TPOT, ITL, E2EL; request, output and total token throughput; goodput).

Requests arrive as a Poisson process at `--request-rate` (gamma with `--burstiness`), stream over
SSE, and count output tokens from the final `usage` chunk. Failed requests are counted and shown,
never fatal; every request has a timeout, so a run always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
# a server's spec-decode counters on /metrics: AFD's afd: names or vLLM's vllm: ones
SPEC_POLL_S = 0.25  # a little over the engine core's status interval
_SPEC_RE = re.compile(r"^(?:afd|vllm):(spec_decode_num_\w+?)_total$")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"))
LATENCY_METRICS += (("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))

# Common English words; one word is roughly one token for most BPE vocabularies.
_WORDS = """the of and to in is was for on that with as by at from his it an were are which this
be or has had not first one their its new after who they have her she two been other when there
all during into school time may years more most only over city some world would where later up
such used many can state about national out known university united then made team no part
between year also well north south east west great river music system people water number long
high small large open light power market model data token cache expert layer batch server node
network memory speed value table page block field group level point order house story night
""".split()


@dataclass
class RequestSpec:
    """One request to send: the prompt and how many tokens to ask for."""

    prompt: str
    prompt_words: int
    max_tokens: int


@dataclass
class RequestResult:
    """What one request measured; times in seconds."""

    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0


# ---- arguments ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `afd bench serve` (vLLM's names)."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    parser.add_argument(
        "--endpoint", default="/v1/completions", choices=ENDPOINTS, help="API to load"
    )
    parser.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    parser.add_argument("--random-input-len", type=int, default=128, help="prompt length (words)")
    parser.add_argument("--random-output-len", type=int, default=64, help="max_tokens per request")
    parser.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths drawn uniformly from [len * (1 - r), len * (1 + r)]",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second (Poisson arrivals); inf sends all at once",
    )
    parser.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier, > 1 more uniform",
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="in-flight request cap")
    parser.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="METRIC:MS",
        help="SLOs a request must meet to count as good, e.g. ttft:500 tpot:50 (also e2el)",
    )
    parser.add_argument(
        "--metric-percentiles", default="99", help="comma-separated percentiles, e.g. 50,90,99"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="of every request")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrivals")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar (stderr)")
    parser.add_argument("--name", default="serve", help="result name (NAME.json)")
    parser.add_argument(
        "--result-file",
        default=None,
        help="write the metrics as JSON here (default: benchmarks/results/<machine>/NAME.json)",
    )


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput expects METRIC:MS with METRIC in {', '.join(GOODPUT_METRICS)}, "
                f"got {item!r}"
            )
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput value must be milliseconds, got {item!r}") from None
        if slos[name] < 0:
            raise ValueError(f"--goodput value must not be negative, got {item!r}")
    return slos


def _validate(args: argparse.Namespace) -> None:
    checks = [
        (args.num_prompts >= 1, "--num-prompts must be at least 1"),
        (args.random_input_len >= 1, "--random-input-len must be at least 1"),
        (args.random_output_len >= 1, "--random-output-len must be at least 1"),
        (0 <= args.random_range_ratio < 1, "--random-range-ratio must be in [0, 1)"),
        (args.request_rate > 0, "--request-rate must be positive (or inf)"),
        (args.burstiness > 0, "--burstiness must be positive"),
        (args.max_concurrency is None or args.max_concurrency >= 1, "--max-concurrency >= 1"),
        (args.request_timeout > 0, "--request-timeout must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# ---- workload ----------------------------------------------------------------------------------


def random_requests(
    num: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[RequestSpec]:
    """Prompts of random words and output lengths, reproducible from `seed`."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        lo, hi = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))
        return max(1, rng.randint(lo, hi))

    specs = []
    for _ in range(num):
        n_words, n_out = length(input_len), length(output_len)
        words = [rng.choice(_WORDS) for _ in range(n_words)]
        specs.append(RequestSpec(" ".join(words), n_words, n_out))
    return specs


async def arrivals(
    specs: list[RequestSpec], rate: float, burstiness: float, seed: int
) -> AsyncIterator[RequestSpec]:
    """Yield requests with gamma-distributed gaps of mean 1/rate (exponential if burstiness=1)."""
    rng = random.Random(seed + 1)
    for i, spec in enumerate(specs):
        yield spec
        if math.isinf(rate) or i == len(specs) - 1:
            continue
        await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


# ---- one request -------------------------------------------------------------------------------


def _payload(args: argparse.Namespace, model: str, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "ignore_eos": True,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
        body["max_completion_tokens"] = spec.max_tokens
    else:
        body["prompt"] = spec.prompt
    return body


def _chunk_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        piece = choice.get("text")
        if piece is None:
            piece = (choice.get("delta") or {}).get("content")
        text += piece or ""
    return text


async def send_request(client, url: str, headers: dict, body: dict) -> RequestResult:
    """POST one streaming request and time each content chunk; errors become a failed result."""
    result = RequestResult(start_time=time.perf_counter())
    start = last = result.start_time
    chunks = 0
    got_usage = False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                result.error = f"HTTP {resp.status_code}: {detail}"
                return result
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return result
                now = time.perf_counter()
                if _chunk_text(chunk):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                if chunk.get("usage"):
                    got_usage = True
                    result.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    result.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
        result.latency = time.perf_counter() - start
        if not got_usage:
            # servers without include_usage: one chunk per token is the best estimate
            result.output_tokens = chunks
        if chunks == 0:
            result.error = "the stream ended with no output text"
            return result
        result.success = True
    except Exception as e:  # noqa: BLE001 -- any failure is one failed request, not a crash
        result.error = f"{type(e).__name__}: {e}"[:300]
    return result


# ---- metrics -----------------------------------------------------------------------------------


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(values_s, dtype=np.float64) * 1000.0 if values_s else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def _tpot(r: RequestResult) -> float:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def compute_metrics(
    specs: list[RequestSpec],
    results: list[RequestResult],
    duration: float,
    slos_ms: dict[str, float],
    percentiles: list[float],
) -> dict[str, Any]:
    """vLLM-style summary of one run (times in ms, throughputs per second of `duration`)."""
    done = [(s, r) for s, r in zip(specs, results, strict=True) if r.success]
    ok = [r for _, r in done]
    # prompt tokens from usage; the word count stands in where a server sent none
    input_tokens = sum(r.prompt_tokens or s.prompt_words for s, r in done)
    output_tokens = sum(r.output_tokens for r in ok)
    good = 0
    for r in ok:
        measured = {"ttft": r.ttft * 1000, "tpot": _tpot(r) * 1000, "e2el": r.latency * 1000}
        good += all(measured[k] <= v for k, v in slos_ms.items())
    duration = max(duration, 1e-9)
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slos_ms else None,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    metrics |= _stats("ttft", [r.ttft for r in ok], percentiles)
    metrics |= _stats("tpot", [_tpot(r) for r in ok if r.output_tokens > 1], percentiles)
    metrics |= _stats("itl", [x for r in ok for x in r.itl], percentiles)
    metrics |= _stats("e2el", [r.latency for r in ok], percentiles)
    metrics["input_lens"] = [r.prompt_tokens or s.prompt_words for s, r in done]
    metrics["output_lens"] = [r.output_tokens for r in ok]
    metrics["ttfts"] = [r.ttft for r in ok]
    metrics["errors"] = [r.error for r in results if not r.success]
    return metrics


async def spec_counters(client, base_url: str, headers: dict) -> dict[str, float]:
    """The server's spec-decode counters as engine.stats() keys; {} when it has none (or no
    /metrics)."""
    from afd.entrypoints.metrics import parse_prometheus_text

    try:
        resp = await client.get(f"{base_url}/metrics", headers=headers)
        samples = parse_prometheus_text(resp.text) if resp.status_code == 200 else {}
    except Exception:  # noqa: BLE001 (a server without metrics still gets its load test)
        return {}
    out: dict[str, float] = {}
    for (name, labels), value in samples.items():
        m = _SPEC_RE.match(name)
        if m is not None:
            pos = dict(labels).get("position")
            key = f"{m.group(1)}_{pos}_total" if pos is not None else f"{m.group(1)}_total"
            out[key] = out.get(key, 0.0) + value
    return out


async def settled_spec_counters(client, base_url: str, headers: dict) -> dict[str, float]:
    """The counters once the server has published its last step's (an engine core reports its
    numbers periodically): polled until two reads agree, for at most a couple of seconds."""
    now = await spec_counters(client, base_url, headers)
    for _ in range(8) if now else ():
        await asyncio.sleep(SPEC_POLL_S)
        again = await spec_counters(client, base_url, headers)
        if again == now:
            break
        now = again
    return now


def spec_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """Acceptance over the run (counters after minus before); None without speculation."""
    from afd.spec.drafter import SpecCounts

    counts = SpecCounts.from_stats({k: v - before.get(k, 0.0) for k, v in after.items()})
    return counts.summary() if counts.num_drafts else None


def format_table(m: dict[str, Any], percentiles: list[float]) -> str:
    """The human-readable summary printed at the end of a run."""
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        text = "n/a" if value is None else format(value, fmt)
        lines.append(f"{label:<44}{text:>16}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if m.get("max_concurrency") is not None:
        row("Maximum request concurrency:", m["max_concurrency"])
    row("Benchmark duration (s):", m["duration"], ".2f")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], ".2f")
    if m.get("request_goodput") is not None:
        row("Request goodput (req/s):", m["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", m["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", m["total_token_throughput"], ".2f")
    for key, title in LATENCY_METRICS:
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        row(f"Mean {key.upper()} (ms):", m[f"mean_{key}_ms"], ".2f")
        row(f"Median {key.upper()} (ms):", m[f"median_{key}_ms"], ".2f")
        row(f"Std {key.upper()} (ms):", m[f"std_{key}_ms"], ".2f")
        for p in percentiles:
            row(f"P{p:g} {key.upper()} (ms):", m[f"p{p:g}_{key}_ms"], ".2f")
    spec = m.get("spec_decode")
    if spec:
        lines.append("{s:{c}^60}".format(s=" Speculative Decoding ", c="-"))
        row("Acceptance rate (%):", 100 * spec["acceptance_rate"], ".2f")
        row("Acceptance length:", spec["mean_acceptance_length"], ".2f")
        row("Drafts:", spec["num_drafts"])
        row("Draft tokens:", spec["num_draft_tokens"])
        row("Accepted tokens:", spec["num_accepted_tokens"])
    if m["errors"]:
        lines.append("{s:{c}^60}".format(s=" Errors (first 5) ", c="-"))
        lines.extend(f"  {e}" for e in m["errors"][:5])
    lines.append("=" * 60)
    return "\n".join(lines)


# ---- driver ------------------------------------------------------------------------------------


async def _first_model(client, base_url: str, headers: dict) -> str:
    resp = await client.get(f"{base_url}/v1/models", headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no models; pass --model")
    return data[0]["id"]


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole load test and return the metrics (the JSON written by --result-file)."""
    import httpx

    _validate(args)
    slos = parse_goodput(args.goodput)
    percentiles = [float(p) for p in str(args.metric_percentiles).split(",") if p.strip()]
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    specs = random_requests(
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.random_range_ratio,
        args.seed,
    )
    pool = args.max_concurrency or args.num_prompts
    timeout = httpx.Timeout(args.request_timeout, connect=min(30.0, args.request_timeout))
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    # trust_env=False: a benchmark measures the server, never an HTTP proxy from the environment
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        try:
            model = args.model or await _first_model(client, base_url, headers)
        except httpx.HTTPError as e:
            raise ValueError(f"cannot list models at {base_url}/v1/models: {e}") from None
        url = base_url + args.endpoint
        spec_before = await spec_counters(client, base_url, headers)
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(spec: RequestSpec) -> RequestResult:
            async def one() -> RequestResult:
                try:
                    return await asyncio.wait_for(
                        send_request(client, url, headers, _payload(args, model, spec)),
                        args.request_timeout,
                    )
                except TimeoutError:
                    return RequestResult(error=f"timed out after {args.request_timeout:g} s")

            if gate is None:
                return await one()
            async with gate:
                return await one()

        from tqdm import tqdm

        # progress on stderr, as vLLM's; off with --disable-tqdm (and for non-CLI callers)
        bar = tqdm(
            total=len(specs),
            desc="requests",
            unit="req",
            disable=getattr(args, "disable_tqdm", True),
        )
        start = time.perf_counter()
        tasks = []
        async for spec in arrivals(specs, args.request_rate, args.burstiness, args.seed):
            task = asyncio.create_task(limited(spec))
            task.add_done_callback(lambda _: bar.update(1))
            tasks.append(task)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        spec = spec_summary(spec_before, await settled_spec_counters(client, base_url, headers))

    metrics = compute_metrics(specs, list(results), duration, slos, percentiles)
    if spec is not None:
        metrics["spec_decode"] = spec
    config = {
        "backend": "openai",
        "base_url": base_url,
        "endpoint": args.endpoint,
        "model": model,
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "goodput_slos_ms": slos or None,
        "seed": args.seed,
    }
    return {**config, **metrics}


def run(args: argparse.Namespace) -> int:
    """Entry point of `afd bench serve`; 0 when at least one request succeeded."""
    from afd.results import check_clean, results_dir, write_result

    path = Path(args.result_file) if args.result_file else results_dir() / f"{args.name}.json"
    allow_dirty = getattr(args, "allow_dirty", False)
    check_clean(path, allow_dirty)  # before the run, not after it
    metrics = asyncio.run(benchmark(args))
    percentiles = [float(p) for p in str(args.metric_percentiles).split(",") if p.strip()]
    print(format_table(metrics, percentiles))
    path = write_result(
        args.name,
        metrics,
        path=path,
        argv=getattr(args, "command_argv", None),
        allow_dirty=allow_dirty,
    )
    print(f"results written to {path}")
    return 0 if metrics["completed"] > 0 else 1
