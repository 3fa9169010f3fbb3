"""`afd bench chaos` reads its recovery counts off the server's own /metrics page."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from afd.benchmarks.chaos import metric_total
from afd.engine.llm_engine import LLMEngine
from afd.entrypoints.metrics import ServerMetrics
from afd.scheduler.cluster.recovery import RecoveryStats


class _Recovered:
    """An engine after recoveries: the engine's own failure_stats() over its counters."""

    def __init__(self, recomputed: int):
        rec = RecoveryStats(restarts={"attention": 2, "prefill": 1}, seconds=[1.5, 2.0, 2.5])
        self.executor = SimpleNamespace(recovery=rec)
        self.requests_recomputed = recomputed

    def stats(self) -> dict:
        return {"num_requests_running": 0.0, "num_requests_waiting": 0.0}

    failure_stats = LLMEngine.failure_stats


def page(recomputed: int) -> str:
    """What the server's /metrics answers for that engine (refresh, then render)."""
    metrics = ServerMetrics("tiny-deepseek-v3")
    metrics.refresh(_Recovered(recomputed))
    return metrics.render().decode()


def test_recomputed_requests_come_from_the_rendered_page():
    text = page(7)
    assert metric_total(text, "afd:requests_recomputed_total") == 7
    assert metric_total(page(0), "afd:requests_recomputed_total") == 0
    # every sample carries model_name: an unlabelled pattern (what chaos once matched) misses it
    assert not re.search(r"^afd:requests_recomputed_total \S+$", text, re.M)
    # labelled series are summed over their labels
    assert metric_total(text, "afd:worker_restarts_total") == 3
    assert metric_total(text, "afd:recovery_seconds_count") == 3


def test_a_missing_metric_is_an_error_not_zero():
    with pytest.raises(ValueError, match="no afd:requests_recomputed_total"):
        metric_total("# nothing here\n", "afd:requests_recomputed_total")
    with pytest.raises(ValueError, match="no afd:requests_recomputed_totl"):
        metric_total(page(7), "afd:requests_recomputed_totl")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kill-node", "2"], "--kill-node: the cluster has nodes 0 and 1"),
        (["--kill-node", "1", "--streams", "0"], "--streams must be between"),
        (["--kill-node", "1", "--node-timeout-s", "0"], "--node-timeout-s must be a positive"),
    ],
)
def test_bad_node_chaos_flags_are_one_line_errors(flags, message, capsys):
    from afd.entrypoints.cli import main

    assert main(["bench", "chaos", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_started_server_keeps_its_lines_and_leaves_no_process(tmp_path):
    """start_server: output lines kept, health None while nothing listens, wait_healthy raises
    with the tail once the process exits, kill() takes the whole process group."""
    import os
    import sys
    import time

    from afd.benchmarks.server import start_server
    from afd.comm.net import free_port

    sleeper = "import time; time.sleep(60)"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); "
    child += "print('up', flush=True); time.sleep(60)"
    server = start_server([sys.executable, "-c", child], free_port())
    deadline = time.monotonic() + 30
    while "up\n" not in server.lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.lines == ["up\n"] and server.health() is None
    server.kill()

    def group_gone() -> bool:
        try:
            os.killpg(server.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    deadline = time.monotonic() + 10
    while not group_gone() and time.monotonic() < deadline:  # the grandchild went with it
        time.sleep(0.05)
    assert group_gone()
    with pytest.raises(RuntimeError, match="the server exited:\nup"):
        server.wait_healthy(5)
