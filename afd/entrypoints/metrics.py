"""The server's Prometheus metrics through prometheus_client: `afd:` twins of vLLM's `vllm:`
names, each labelled with the served model name. The server measures latencies and tokens from
the output stream; the engine's own counters (stage seconds, preemptions, prefix cache, worker
restarts) are read from engine.stats() / failure_stats() at each scrape."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families

from afd.outputs import RequestOutput

if TYPE_CHECKING:
    from afd.entrypoints.protocol import EngineClient

# no `_created` series: every counter would carry a second, rarely wanted sample
prometheus_client.disable_created_metrics()

LabelKey = tuple[tuple[str, str], ...]

# vLLM's latency buckets, trimmed: small CPU test models live in the low end, real ones higher up
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip

# engine.stats() keys that vLLM also exports as gauges
ENGINE_GAUGES = {
    "num_requests_running": "Requests in the running batch.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "kv_cache_usage_perc": "Fraction of KV-cache blocks in use (1 = full).",
}
ENGINE_COUNTERS = {
    "num_preemptions_total": "Sequences preempted (their KV dropped, to be recomputed).",
    "prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits_total": "Prompt tokens found in the prefix cache.",
    "spec_decode_num_drafts_total": "Speculative verifications of a draft (sequence-steps).",
    "spec_decode_num_draft_tokens_total": "Draft tokens proposed.",
    "spec_decode_num_accepted_tokens_total": "Draft tokens accepted.",
}
_STAGE_RE = re.compile(r"^afd_stage_(.+)_seconds$")
_PER_POS_RE = re.compile(r"^spec_decode_num_accepted_tokens_per_pos_(\d+)_total$")
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4


def _metric_name(key: str) -> str:
    return "afd:" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class _EngineCollector:
    """The engine's cumulative numbers as of the last refresh(), as metric families."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.stats: Mapping[str, Any] = {}
        self.failures: Mapping[str, Any] = {}

    def collect(self) -> Iterable:
        m = self.model_name
        stages = CounterMetricFamily(
            "afd:stage_seconds",
            "Cumulative seconds spent in each AFD pipeline stage (attention, expert, comm ...).",
            labels=["model_name", "stage"],
        )
        per_pos = CounterMetricFamily(
            "afd:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft.",
            labels=["model_name", "position"],
        )
        families: list = [stages, per_pos]
        for key, value in self.stats.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            stage = _STAGE_RE.match(key)
            if stage is not None:
                stages.add_metric([m, stage.group(1)], value)
                continue
            pos = _PER_POS_RE.match(key)
            if pos is not None:
                per_pos.add_metric([m, pos.group(1)], value)
                continue
            help_text = ENGINE_GAUGES.get(key) or ENGINE_COUNTERS.get(key) or f"engine stat {key}"
            name = _metric_name(key)
            if key.endswith("_total"):
                family = CounterMetricFamily(name, help_text, labels=["model_name"])
            else:
                family = GaugeMetricFamily(name, help_text, labels=["model_name"])
            family.add_metric([m], value)
            families.append(family)
        restarts = self._per_label(
            "afd:worker_restarts", "Workers replaced after they died or hung, by role.", "role"
        )
        recomputed = CounterMetricFamily(
            "afd:requests_recomputed",
            "Requests whose KV died with a worker and were recomputed from their tokens.",
            labels=["model_name"],
        )
        recomputed.add_metric([m], float(self.failures.get("requests_recomputed", 0)))
        lost = self._per_label(
            "afd:nodes_lost",
            "Nodes declared lost (their workers silent past --node-timeout-s), by node rank.",
            "node",
        )
        families += [restarts, recomputed, lost, self._recoveries()]
        return families

    def _per_label(self, name: str, help_text: str, label: str) -> CounterMetricFamily:
        """A failure counter per `label` value, from failure_stats()[<name without afd:>]."""
        family = CounterMetricFamily(name, help_text, labels=["model_name", label])
        key = name.removeprefix("afd:")
        for value, n in self.failures.get(key, {}).items():
            family.add_metric([self.model_name, str(value)], float(n))
        return family

    def _recoveries(self) -> HistogramMetricFamily:
        seconds = [float(s) for s in self.failures.get("recovery_seconds", [])]
        family = HistogramMetricFamily(
            "afd:recovery_seconds",
            "Failure noticed to cluster re-formed (replacement started and joined).",
            labels=["model_name"],
        )
        buckets = [
            (_le(b), float(sum(1 for s in seconds if s <= b))) for b in (*LATENCY_BUCKETS, math.inf)
        ]
        family.add_metric([self.model_name], buckets, sum(seconds))
        return family


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class ServerMetrics:
    """The HTTP server's metrics, one registry per app: latencies and token counts it measures
    itself (requests, not choices, are counted), plus the engine's numbers at each scrape."""

    content_type = CONTENT_TYPE

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        m = {"model_name": model_name}

        def histogram(name: str, help_text: str):
            return Histogram(
                name, help_text, ["model_name"], registry=r, buckets=LATENCY_BUCKETS
            ).labels(**m)

        def counter(name: str, help_text: str):
            return Counter(name, help_text, ["model_name"], registry=r).labels(**m)

        self.ttft = histogram(
            "afd:time_to_first_token_seconds", "Request arrival to first output token."
        )
        self.itl = histogram(
            "afd:inter_token_latency_seconds", "Time between consecutive output tokens."
        )
        self.e2e = histogram(
            "afd:e2e_request_latency_seconds", "Request arrival to its last output token."
        )
        self.queue_time = histogram(
            "afd:request_queue_time_seconds", "Arrival in the engine to first scheduled."
        )
        self.prefill_time = histogram(
            "afd:request_prefill_time_seconds", "First scheduled to first token (prefill)."
        )
        self.decode_time = histogram(
            "afd:request_decode_time_seconds", "First token to last token (decode)."
        )
        self.prompt_tokens = counter(
            "afd:prompt_tokens", "Prompt tokens of requests that started generating."
        )
        self.generation_tokens = counter(
            "afd:generation_tokens", "Output tokens streamed from the engine."
        )
        self._success = Counter(
            "afd:request_success",
            "Finished requests (each prompt of a batch is one; its n choices are not counted "
            "apart), by the finish reason of its first choice.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.request_aborted = counter(
            "afd:request_aborted", "Requests aborted because the client went away."
        )
        self._errors = Counter(
            "afd:request_errors",
            "Requests answered with an error, by HTTP status.",
            ["model_name", "status"],
            registry=r,
        )
        self._engine = _EngineCollector(model_name)
        r.register(self._engine)

    def observe_first_token(self, seconds: float, prompt_tokens: int, new_tokens: int) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(new_tokens)

    def observe_tokens(self, seconds: float, new_tokens: int) -> None:
        """`new_tokens` arrived together `seconds` after the previous ones: each is charged an
        equal share, so the ITL sum stays the decode time."""
        if new_tokens <= 0:
            return
        for _ in range(new_tokens):
            self.itl.observe(seconds / new_tokens)
        self.generation_tokens.inc(new_tokens)

    def observe_finished(self, seconds: float, out: RequestOutput) -> None:
        """One finished request: its latency, its engine times when known, one success."""
        self.e2e.observe(seconds)
        reason = out.outputs[0].finish_reason if out.outputs else None
        self._success.labels(self.model_name, reason or "unknown").inc()
        t = out.metrics
        if t is not None and t.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, t.first_scheduled_time - t.arrival_time))
            if t.first_token_time is not None:
                self.prefill_time.observe(max(0.0, t.first_token_time - t.first_scheduled_time))
                if t.finished_time is not None:
                    self.decode_time.observe(max(0.0, t.finished_time - t.first_token_time))

    def count_error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def refresh(self, engine: EngineClient) -> None:
        """Take the engine's numbers for the next render(); a failing engine leaves the
        server's own metrics readable."""
        try:
            self._engine.stats = engine.stats()
            self._engine.failures = engine.failure_stats()
        except Exception:  # noqa: BLE001 (a scrape must still show the server's metrics)
            self._engine.stats, self._engine.failures = {}, {}

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def parse_prometheus_text(text: str) -> dict[tuple[str, LabelKey], float]:
    """Samples of a Prometheus text page as {(name, sorted labels): value}; ValueError on a bad
    page. For tests and `afd bench serve` scraping."""
    samples: dict[tuple[str, LabelKey], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples
