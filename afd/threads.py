"""Torch intra-op threads per AFD process, chosen from the cores this process may run on, so
that the API server, the engine core and the workers do not fight over a small machine.
Torch-free: the launcher and the start-up line use it before torch is imported."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

MAX_THREADS = 1024  # per process; more is a typo, not a machine
API_THREADS = 1  # an API server tokenizes and serves HTTP: no torch work


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as taskset or a container sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """Intra-op threads of each process: `engine` runs the model in the engine process (all the
    cores when colocated; 1 for a cluster's driver, which only schedules), `worker` each worker
    process; the API server always runs 1 (HTTP and tokenization, no torch work)."""

    cores: int
    engine: int
    worker: int
    workers: int  # worker processes on one node sharing the cores (0: colocated)
    given: bool  # from --num-threads-per-worker, not chosen

    def describe(self) -> str:
        """The start-up line's words for the choice."""
        source = "--num-threads-per-worker" if self.given else f"of {self.cores} cores"
        if not self.workers:
            return f"threads={self.engine} ({source})"
        return (f"threads={self.worker} per worker x {self.workers} ({source}; "
                "driver 1, API 1)")  # fmt: skip


def omp_threads() -> int | None:
    """OMP_NUM_THREADS when set to a positive integer: torch's own default honours it, so a
    choice made here does too (a test suite pins 1 so that every process sums alike)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def thread_plan(cluster: Any, cores: int | None = None) -> ThreadPlan:
    """The threads of each process for a ClusterConfig on `cores` cores (default: this
    process's): an even split among the workers of a node, since in the ping-pong every role
    computes at once; --num-threads-per-worker overrides the model-running processes."""
    cores = available_cores() if cores is None else cores
    given = cluster.num_threads_per_worker
    cores = min(cores, omp_threads() or cores) if given is None else cores
    pools = cluster.num_prefill_workers + cluster.num_attention_workers + cluster.num_expert_workers
    if not cluster.num_attention_workers:
        return ThreadPlan(cores, given or cores, 0, 0, given is not None)
    per_node = -(-pools // max(1, cluster.nnodes))  # the default roles spread nodes evenly
    worker = given or max(1, cores // per_node)
    return ThreadPlan(cores, 1, worker, per_node, given is not None)


def set_torch_threads(n: int) -> None:
    """This process's torch intra-op threads (a no-op when already n)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
