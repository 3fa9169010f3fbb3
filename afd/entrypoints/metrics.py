"""Prometheus text exposition (format 0.0.4) without prometheus_client: counters, gauges and
histograms, and the server's `afd:` metric set (twins of vLLM's `vllm:` names)."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping

LabelKey = tuple[tuple[str, str], ...]

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?$")
_LABEL_PAIR_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')

# vLLM's latency buckets, trimmed: small CPU test models live in the low end, real ones higher up
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _format_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


def _label_key(labels: Mapping[str, object]) -> LabelKey:
    for name in labels:
        if not _LABEL_RE.match(name):
            raise ValueError(f"invalid label name {name!r}")
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _label_text(key: LabelKey) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in key) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str):
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name, self.help = name, help_text
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """Monotonic total per label set; `set_total` mirrors a cumulative value kept elsewhere."""

    kind = "counter"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = _label_key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, value: float, **labels: object) -> None:
        with self._lock:
            self._values[_label_key(labels)] = float(value)

    def get(self, **labels: object) -> float:
        return self._values.get(_label_key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_label_text(k)} {_format_value(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        self.set_total(value, **labels)


class Histogram(_Metric):
    """Cumulative buckets, `_sum` and `_count` per label set."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        # per label set: [count per bucket (non-cumulative)..., +Inf overflow, sum]
        self._values: dict[LabelKey, list[float]] = {}

    def observe(self, value: float, **labels: object) -> None:
        key = _label_key(labels)
        with self._lock:
            row = self._values.setdefault(key, [0.0] * (len(self.buckets) + 2))
            slot = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
            row[slot] += 1
            row[-1] += value

    def count(self, **labels: object) -> int:
        row = self._values.get(_label_key(labels))
        return 0 if row is None else int(sum(row[:-1]))

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        if not items:
            items = [((), [0.0] * (len(self.buckets) + 2))]
        lines = []
        for key, row in items:
            running = 0.0
            for bound, n in zip((*self.buckets, math.inf), row[:-1], strict=True):
                running += n
                le = _label_key({**dict(key), "le": _format_value(bound)})
                lines.append(f"{self.name}_bucket{_label_text(le)} {_format_value(running)}")
            lines.append(f"{self.name}_sum{_label_text(key)} {_format_value(row[-1])}")
            lines.append(f"{self.name}_count{_label_text(key)} {_format_value(running)}")
        return lines


class MetricsRegistry:
    """Named metrics in registration order; `render` gives the Prometheus text."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> _Metric:
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric):
                raise ValueError(f"{metric.name} is already a {existing.kind}")
            return existing
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str) -> Counter:
        return self._add(Counter(name, help_text))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str) -> Gauge:
        return self._add(Gauge(name, help_text))  # type: ignore[return-value]

    def histogram(
        self, name: str, help_text: str, buckets: Iterable[float] = LATENCY_BUCKETS
    ) -> Histogram:
        return self._add(Histogram(name, help_text, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines += metric.header() + metric.samples()
        return "\n".join(lines) + "\n"


def parse_prometheus_text(text: str) -> dict[tuple[str, LabelKey], float]:
    """Samples of a Prometheus text page as {(name, sorted labels): value}; ValueError on a bad
    line. For tests and `afd bench serve` scraping."""
    samples: dict[tuple[str, LabelKey], float] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            raise ValueError(f"line {n} is not a Prometheus sample: {line!r}")
        labels: list[tuple[str, str]] = []
        body = m.group(3) or ""
        pos = 0
        while pos < len(body):
            pair = _LABEL_PAIR_RE.match(body, pos)
            if pair is None or pair.end() == pos:
                raise ValueError(f"line {n} has malformed labels: {line!r}")
            labels.append((pair.group(1), _unescape(pair.group(2))))
            pos = pair.end()
        samples[(m.group(1), tuple(sorted(labels)))] = float(m.group(4))
    return samples


# engine.stats() keys that vLLM also exports as gauges
ENGINE_GAUGES = {
    "num_requests_running": "Requests in the running batch.",
    "num_requests_waiting": "Requests waiting to be scheduled.",
    "kv_cache_usage_perc": "Fraction of KV-cache blocks in use (1 = full).",
}
_STAGE_RE = re.compile(r"^afd_stage_(.+)_seconds$")


class ServerMetrics:
    """The HTTP server's metrics: latency histograms and token counters it measures itself from
    the output stream, plus gauges and per-stage AFD timings copied from engine.stats()."""

    def __init__(self) -> None:
        r = self.registry = MetricsRegistry()
        self.ttft = r.histogram(
            "afd:time_to_first_token_seconds", "Request arrival to first output token."
        )
        self.itl = r.histogram(
            "afd:inter_token_latency_seconds", "Time between consecutive output tokens."
        )
        self.e2e = r.histogram(
            "afd:e2e_request_latency_seconds", "Request arrival to its last output token."
        )
        self.prompt_tokens = r.counter(
            "afd:prompt_tokens_total", "Prompt tokens of requests that started generating."
        )
        self.generation_tokens = r.counter(
            "afd:generation_tokens_total", "Output tokens streamed from the engine."
        )
        self.request_success = r.counter(
            "afd:request_success_total", "Finished requests, by finished_reason."
        )
        self.request_aborted = r.counter(
            "afd:request_aborted_total", "Requests aborted because the client went away."
        )
        self.request_errors = r.counter(
            "afd:request_errors_total", "Requests answered with an error, by HTTP status."
        )
        self.engine_gauges = {
            key: r.gauge(f"afd:{key}", help_text) for key, help_text in ENGINE_GAUGES.items()
        }
        self.stage_seconds = r.counter(
            "afd:stage_seconds_total",
            "Cumulative seconds spent in each AFD pipeline stage (attention, expert, comm ...).",
        )
        self.worker_restarts = r.counter(
            "afd:worker_restarts_total", "Workers replaced after they died or hung, by role."
        )
        self.recovery_seconds = r.histogram(
            "afd:recovery_seconds",
            "Failure noticed to cluster re-formed (replacement started and joined).",
        )
        self.requests_recomputed = r.counter(
            "afd:requests_recomputed_total",
            "Requests whose KV died with a worker and were recomputed from their tokens.",
        )
        self._recoveries_seen = 0
        self._extra: dict[str, Gauge] = {}

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

    def observe_finished(self, seconds: float, finish_reasons: Iterable[str | None]) -> None:
        self.e2e.observe(seconds)
        for reason in finish_reasons:
            self.request_success.inc(finished_reason=reason or "unknown")

    def update_from_stats(self, stats: Mapping[str, float]) -> None:
        for key, value in stats.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            stage = _STAGE_RE.match(key)
            if stage is not None:
                self.stage_seconds.set_total(value, stage=stage.group(1))
            elif key in self.engine_gauges:
                self.engine_gauges[key].set(value)
            else:
                name = "afd:" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
                if name not in self._extra:
                    self._extra[name] = self.registry.gauge(name, f"engine stat {key}")
                self._extra[name].set(value)

    def update_failures(self, failures: Mapping) -> None:
        """From engine.failure_stats(): restarts per role, recovery durations (cumulative
        list; new ones are observed), requests recomputed."""
        for role, n in failures.get("worker_restarts", {}).items():
            self.worker_restarts.set_total(n, role=role)
        seconds = list(failures.get("recovery_seconds", []))
        for value in seconds[self._recoveries_seen :]:
            self.recovery_seconds.observe(float(value))
        self._recoveries_seen = max(self._recoveries_seen, len(seconds))
        self.requests_recomputed.set_total(float(failures.get("requests_recomputed", 0)))

    def render(self, stats: Mapping[str, float] | None = None) -> str:
        if stats:
            self.update_from_stats(stats)
        return self.registry.render()
