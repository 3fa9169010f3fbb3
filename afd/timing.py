"""Stage clocks of the workers: seconds per stage of one plan, and trace events when asked."""

from __future__ import annotations

import time

import torch


class StageClock:
    """Accumulates per-stage seconds and, when tracing, (lane, name, start_ns, end_ns) events.

    On CUDA, `now()` first waits for the device's current stream: kernels run asynchronously,
    so without it a stage would measure the time to enqueue its kernels, and their run time
    would land in whichever later stage waits for the device."""

    def __init__(self, trace: bool, device: torch.device | str | None = None):
        self.trace = trace
        self.times: dict[str, float] = {}
        self.events: list[list] = []
        device = torch.device(device) if device is not None else None
        self._sync = (
            torch.cuda.current_stream(device).synchronize
            if device is not None and device.type == "cuda"
            else None
        )

    def now(self) -> int:
        """Monotonic nanoseconds, after the work queued on the device so far has run."""
        if self._sync is not None:
            self._sync()
        return time.monotonic_ns()

    def record(self, stage: str, lane: str, start: int, end: int, label: str = "") -> None:
        """Add end - start nanoseconds to `stage` (and an event on `lane` when tracing)."""
        self.times[stage] = self.times.get(stage, 0.0) + (end - start) / 1e9
        if self.trace:
            self.events.append([lane, label or stage, start, end])

    def total(self, stage: str, start: int, end: int) -> None:
        """Add end - start nanoseconds to `stage`, never as a trace event (whole-plan spans)."""
        self.times[stage] = self.times.get(stage, 0.0) + (end - start) / 1e9

    def split(
        self, wait: str, work: str, start: int, end: int, wait_ns: int, label: str = ""
    ) -> None:
        """Record [start, end) as `wait_ns` of waiting for a peer (`wait`, lane "wait") and the
        rest as transfer work (`work`, lane "comm"); the wait is drawn first."""
        wait_ns = max(0, min(wait_ns, end - start))
        self.record(wait, "wait", start, start + wait_ns, label)
        self.record(work, "comm", start + wait_ns, end, label)
