"""An `afd launch` process for the benchmarks that drive one (chaos, fuzz): started in a session
of its own (so one signal reaches all its workers), its output lines kept, stopped with no
orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Launched:
    """A started `afd launch`; `base`: its HTTP address (None for a node without the API)."""

    proc: subprocess.Popen
    base: str | None = None
    lines: list[str] = field(default_factory=list)

    def health(self) -> int | None:
        """GET /health's status code; None when nothing answers."""
        import httpx

        try:
            return httpx.get(f"{self.base}/health", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def wait_healthy(self, timeout_s: float, *others: Launched) -> float:
        """Seconds until GET /health is 200; RuntimeError with the log tail when this process
        or one of `others` exited first, or past `timeout_s`."""
        t0 = time.monotonic()
        while self.health() != 200:
            if any(p.proc.poll() is not None for p in (self, *others)):
                raise RuntimeError("the server exited:\n" + self.tail(others))
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"the server was not healthy in {timeout_s:g} s:\n"
                                   + self.tail(others))  # fmt: skip
            time.sleep(0.2)
        return time.monotonic() - t0

    def tail(self, others: tuple[Launched, ...] = ()) -> str:
        return "".join(line for p in (self, *others) for line in p.lines[-20:])

    def kill(self) -> None:
        """SIGKILL of the whole process group (the launcher and every worker)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Ctrl-C (the launcher drains and stops its workers), SIGKILL of the group past
        `timeout_s`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()


def start_server(argv: list[str], port: int | None = None) -> Launched:
    """Start `argv` (an `afd launch` command) in a new session; `port`: its HTTP port."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    launched = Launched(proc, None if port is None else f"http://127.0.0.1:{port}")
    threading.Thread(target=lambda: launched.lines.extend(proc.stdout), daemon=True).start()
    return launched


def launch_argv(config, port: int, launch_args: list[str]) -> list[str]:
    """`afd launch` with every engine setting of `config` (flags made from it), on `port`."""
    import sys

    from afd.entrypoints.flags import engine_argv

    argv = [sys.executable, "-m", "afd", "launch", *engine_argv(config), "--port", str(port)]
    return argv + list(launch_args)
