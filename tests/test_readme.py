"""Every fenced ```bash and ```python block of README.md and docs/*.md, run as a user would run
it: one test per block, in document order, all blocks sharing one work directory.

Mechanical rules (the same for every command): `python3` is this suite's interpreter; each
`afd serve` / `afd launch` listens on a free port (`127.0.0.1:8000` in the client commands that
follow is that port; other `127.0.0.1:PORT` addresses get free ports too); `curl` fails on an HTTP
error; a command ending in `&` runs in the background until the server after it stops. A server
is started, waited on until /health answers 200, used by the client commands after it (in its
block and the blocks after it), then stopped with SIGINT and must exit 0. Everything else a
command needs changed is one row of ADAPT, with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
COMMAND_TIMEOUT_S = 240.0  # under pytest-timeout's 300 s, so the command's output is shown
HEALTH_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 40.0
HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Adapt:
    """How commands containing `match` (whitespace-normalised) run here, and why. `sub` pairs are
    replaced in order ({work}: the shared work directory); `gpu`: skipped without CUDA; `needs`:
    a fix not merged yet, so the block must fail (strict xfail) until it is."""

    match: str
    why: str
    sub: tuple[tuple[str, str], ...] = ()
    gpu: bool = False
    needs: str = ""


# The one table: every command that does not run here as written.
ADAPT: tuple[Adapt, ...] = (
    Adapt(
        "bash scripts/setup.sh",
        "installs into the interpreter running this suite (CI ran it "
        "just before); checked for syntax only",
        sub=(("bash scripts/", "bash -n scripts/"),),
    ),
    Adapt(
        "python3 -m pytest -q",
        "is this suite: running it inside itself would recurse, and this run has collected "
        "every test already (11 s again); collecting one file checks the command",
        sub=(("pytest -q", "pytest -q --collect-only -p no:cacheprovider tests/test_config.py"),),
    ),
    Adapt(
        "serve Qwen/Qwen3-30B-A3B",
        "needs a GPU; the 30B checkpoint is not in the test cache "
        "(a tiny model of the same family stands in) and one GPU holds all workers",
        gpu=True,
        sub=(("Qwen/Qwen3-30B-A3B --revision main", "tiny-qwen3-moe --gpus-per-node 1"),),
    ),
    Adapt("launch --device cuda", "needs a GPU", gpu=True),
    Adapt(
        "--kill-every 5",
        "a 30 s chaos run; 16 requests in about 12 s still see kills",
        sub=(
            ("--num-prompts 60", "--num-prompts 16"),
            ("--request-rate 2", "--request-rate 4"),
            ("--random-output-len 64", "--random-output-len 32"),
            ("--kill-every 5", "--kill-every 4"),
        ),
    ),
    Adapt(
        "/tmp/tiny-qwen3-moe-fp8",
        "a fixed /tmp path is shared by every user of the machine",
        sub=(("/tmp/tiny-qwen3-moe-fp8", "{work}/tiny-qwen3-moe-fp8"),),
    ),
    Adapt(
        "--dispatch-dtype auto --batch-size 64 --steps 4",
        "minutes of decode steps; one measured step shows the command works",
        sub=(("--steps 4 --warmup 1", "--steps 1 --warmup 0"),),
    ),
    Adapt(
        "--dispatch-dtype fp8 --batch-size 64 --steps 4",
        "as the line above",
        sub=(("--steps 4 --warmup 1", "--steps 1 --warmup 0"),),
    ),
    Adapt(
        "--max-micro-batches 3 --num-scheduler-steps 1,4 --steps 40",
        "minutes of decode steps at batch 512; one step of each variant at batch 64 shows the "
        "command works",
        sub=(("--steps 40", "--steps 1 --warmup 0 --batch-size 64"),),
    ),
    Adapt(
        "bench kernels --threads 2 --rounds 3",
        "the full sweep three times at 2 threads: 20 s idle, minutes under load; the --quick "
        "sweep is the same kernels and backends with every flag of the command",
        sub=(("--rounds 3", "--rounds 3 --quick"),),
    ),
    Adapt(
        "bench spec --topologies colocated,1A1F --rounds 3",
        "minutes of timed rounds; one short round per side shows the command works",
        sub=(("--rounds 3", "--rounds 1 --output-len 8"),),
    ),
    Adapt(
        "afd profile",
        "minutes of measuring; --quick is the same parts on fewer points",
        sub=(("afd profile", "afd profile --quick"),),
    ),
    Adapt(
        "--batch-size 128 --context-len 343 --max-micro-batches 4",
        "over 100 s even with one step per variant: most of it prefilling 128 x 343 tokens",
        sub=(
            (
                "--batch-size 128 --context-len 343 --max-micro-batches 4",
                "--batch-size 16 --context-len 64 --max-micro-batches 2",
            ),
            ("--num-scheduler-steps 1,4", "--num-scheduler-steps 1,4 --steps 1 --warmup 0"),
        ),
    ),
    Adapt(
        "--hardware H800 --weight-dtype fp8 --kv-dtype fp8",
        "the search grows steeply with --max-workers: 6 take 4 s, 8 take 11 s, 16 take 57 s, "
        "32 over 4 min (fewer than 6 fit no configuration)",
        sub=(("--max-workers 32", "--max-workers 6"),),
    ),
    Adapt(
        "--model bench-heldout-mla --profile",
        "minutes of decode steps (8 measured, 4 warm-up, per variant); one step of each variant "
        "shows the command works",
        sub=(("--steps 8 --warmup 4", "--steps 1 --warmup 0"),),
    ),
    Adapt(
        "--model bench-balanced-moe --profile",
        "minutes of decode steps at batch 512",
        sub=(
            ("--batch-size 512", "--batch-size 64"),
            ("--steps 8 --warmup 4", "--steps 1 --warmup 0"),
        ),
    ),
    Adapt(
        "--model MODEL --profile benchmarks/results/cpu-2core-amd-epyc/profile-MODEL.json "
        "--batch-size B",
        "MODEL and B are placeholders; minutes of prefill and decode steps",
        sub=(
            ("MODEL", "bench-attention-heavy"),
            ("--batch-size B --context-len 343", "--batch-size 16 --context-len 64"),
            ("--max-micro-batches 4", "--max-micro-batches 2"),
            ("--steps 8 --warmup 4", "--steps 1 --warmup 0"),
        ),
    ),
    Adapt(
        "plan --model MODEL",
        "MODEL is a placeholder; the plan is written to the work "
        "directory, not over the committed one",
        sub=(
            ("MODEL", "bench-attention-heavy"),
            ("--output benchmarks/", "--output {work}/"),
            ("--frontier benchmarks/", "--frontier {work}/"),
        ),
    ),
)


@dataclass
class Command:
    text: str  # as bash runs it (newlines inside quotes kept)
    adapt: Adapt | None

    @property
    def is_server(self) -> bool:
        return bool(re.search(r"-m afd (serve|launch)\b", self.text)) and not self.background

    @property
    def background(self) -> bool:
        return self.text.rstrip().endswith("&")

    @property
    def is_client(self) -> bool:
        return not self.is_server and "127.0.0.1:8000" in self.text


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    text: str
    commands: list[Command] = field(default_factory=list)
    server: Command | None = None  # for a block that opens with client commands: whose

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def adapts(self) -> list[Adapt]:
        if self.lang == "python":
            return [a for a in ADAPT if a.match in self.text]
        return [c.adapt for c in self.commands if c.adapt]


def adapt_for(text: str) -> Adapt | None:
    flat = " ".join(text.split())
    return next((a for a in ADAPT if a.match in flat), None)


def split_commands(text: str) -> list[Command]:
    """Logical commands: backslash continuations joined, a quote left open goes on to the next
    line (as bash reads it), `a && b` is two commands, comment lines dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        line = line.lstrip() if current.endswith(" ") else line
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        try:
            shlex.split(current)
        except ValueError:  # an open quote: the command goes on
            current += "\n"
            continue
        out += [Command(p, adapt_for(p)) for p in current.split(" && ") if p.strip()]
        current = ""
    assert not current, f"unterminated command: {current!r}"
    return out


def read_blocks() -> list[Block]:
    blocks = []
    for doc in DOCS:
        lang, start, body = None, 0, []
        for i, line in enumerate(doc.read_text().splitlines(), 1):
            if lang is None and line.startswith("```"):
                lang, start, body = line[3:].strip(), i, []
            elif lang is not None and line.startswith("```"):
                if lang in ("bash", "python"):
                    blocks.append(Block(doc, start, lang, "\n".join(body) + "\n"))
                lang = None
            elif lang is not None:
                body.append(line)
    last_server: dict[Path, Command] = {}
    for b in blocks:
        if b.lang == "bash":
            b.commands = split_commands(b.text)
        b.server = last_server.get(b.doc)
        for c in b.commands:
            if c.is_server and not (c.adapt and c.adapt.gpu and not HAS_CUDA):
                last_server[b.doc] = c
    return blocks


BLOCKS = read_blocks()


def substitute(text: str, adapt: Adapt | None, work: Path) -> str:
    for old, new in adapt.sub if adapt else ():
        assert old in text, f"ADAPT row {adapt.match!r}: {old!r} is not in {text!r}"
        text = text.replace(old, new.format(work=work))
    return text


class Runner:
    """Runs commands in one work directory; keeps at most one server (and the background
    processes started before it) up between blocks."""

    def __init__(self, work: Path):
        self.work = work
        self.server: Command | None = None
        self.port = 0
        self.procs: list[subprocess.Popen] = []
        self.background: list[subprocess.Popen] = []
        self.ports: dict[str, str] = {}  # a block's own addresses: the same port in each command
        self.done: set[str] = set()  # commands already run here: identical ones are not rerun
        bin_dir = work / ".bin"
        bin_dir.mkdir()
        (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / "python3").chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def prepare(self, command: Command) -> str:
        text = substitute(command.text, command.adapt, self.work)
        text = re.sub(r"\bcurl -s\b", "curl -sS --fail-with-body", text)

        def port_for(m: re.Match) -> str:
            if m.group(1) == "8000" and not command.is_server:
                return f"127.0.0.1:{self.port}"
            return f"127.0.0.1:{self.ports.setdefault(m.group(1), str(free_port()))}"

        text = re.sub(r"127\.0\.0\.1:(\d+)", port_for, text)
        if command.is_server:
            self.port = free_port()
            if "--port" in text:
                text = re.sub(r"--port \d+", f"--port {self.port}", text)
            else:
                text = f"{text.rstrip()} --port {self.port}"
        return text

    def run(self, command: Command) -> None:
        if command.is_client:
            assert self.server is not None, "a client command with no server before it"
        else:
            self.stop()
        if command.is_server:
            self.start(command)
            return
        text = self.prepare(command)
        if command.background:
            self.background.append(self.popen(text.rstrip().rstrip("&")))
            return
        if text in self.done and not command.is_client:
            print(f"already ran: {text}")
            return
        print(f"$ {text}")
        t0 = time.monotonic()
        proc = subprocess.Popen(["bash", "-c", text], cwd=self.work, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"`{text}` ran past {COMMAND_TIMEOUT_S:.0f} s\n{tail(out)}", pytrace=False)
        finally:
            if proc.poll() is None:  # this test was interrupted: leave no process behind
                os.killpg(proc.pid, signal.SIGKILL)
        print(f"({time.monotonic() - t0:.1f} s)\n{tail(out, 2000)}")
        if proc.returncode != 0:
            pytest.fail(f"`{text}` exited {proc.returncode}\n{tail(out)}", pytrace=False)
        self.done.add(text)

    def popen(self, text: str) -> subprocess.Popen:
        log = open(self.work / f".server-{len(self.procs)}.log", "w+")  # noqa: SIM115
        proc = subprocess.Popen(["bash", "-c", text], cwd=self.work, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        proc.log = log
        self.procs.append(proc)
        return proc

    def start(self, command: Command) -> None:
        text = self.prepare(command)
        print(f"$ {text}  (server)")
        proc = self.popen(text)
        self.server, self.main = command, proc
        base = f"http://127.0.0.1:{self.port}"
        wait_healthy(base, proc, HEALTH_TIMEOUT_S, lambda: f"`{text}`\n{log_of(proc)}")

    def stop(self) -> None:
        """SIGINT the server; it (and what ran in the background before it) must exit 0."""
        if self.server is None:
            return
        main, self.server = self.main, None
        errors = [f"server exited {rc}\n{log_of(main)}" for rc in [interrupt(main)] if rc != 0]
        for bg in self.background:
            rc = wait_or_kill(bg)
            if rc != 0:
                errors.append(f"background command exited {rc}\n{log_of(bg)}")
        self.background = []
        assert not errors, "\n".join(errors)

    def close(self) -> None:
        """Whatever happened: no process of ours outlives the module."""
        self.server = None
        for proc in self.procs:
            if proc.poll() is None:
                interrupt(proc)
            proc.log.close()


def interrupt(proc: subprocess.Popen) -> int:
    """Ctrl-C as a terminal sends it: to the command's whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    return wait_or_kill(proc)


def wait_or_kill(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -signal.SIGKILL


def log_of(proc: subprocess.Popen) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return tail(proc.log.read())


def tail(text: str | bytes | None, n: int = 6000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    # the docs' relative paths: the committed results (a copy: commands may write beside them)
    shutil.copytree(ROOT / "benchmarks" / "results", work / "benchmarks" / "results")
    (work / "scripts").symlink_to(ROOT / "scripts")
    (work / "tests").symlink_to(ROOT / "tests")
    r = Runner(work)
    try:
        yield r
    finally:
        r.close()


def marks(block: Block) -> list:
    out = [pytest.mark.slow]
    adapts = block.adapts
    gpu = [a for a in adapts if a.gpu]
    if gpu and not HAS_CUDA:
        out.append(pytest.mark.skip(reason=f"needs CUDA: {gpu[0].why}"))
    needs = [a for a in adapts if a.needs]
    if needs:
        out.append(pytest.mark.xfail(strict=True, reason=needs[0].needs))
    return out


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=marks(b)) for b in BLOCKS])
def test_block_runs(block: Block, runner: Runner):
    if block.lang == "python":
        adapt = next(iter(block.adapts), None)
        script = runner.work / f"{block.id.replace('/', '_').replace(':', '_')}.py"
        script.write_text(substitute(block.text, adapt, runner.work))
        runner.run(Command(f"python3 {shlex.quote(str(script))}", None))
        return
    runner.ports = {}
    if block.commands[0].is_client and runner.server is not block.server:
        assert block.server is not None, f"{block.id}: client commands with no server before"
        runner.stop()
        runner.start(block.server)
    for command in block.commands:
        runner.run(command)
    if not serves_next(block, runner.server):
        runner.stop()  # here, so that a server failing to stop fails its own block


def serves_next(block: Block, server: Command | None) -> bool:
    """Whether the next block that runs opens with client commands of `server`."""
    for b in BLOCKS[BLOCKS.index(block) + 1 :]:
        if any(a.gpu for a in b.adapts) and not HAS_CUDA:
            continue
        return (
            server is not None
            and b.server is server
            and b.commands[:1] != []
            and (b.commands[0].is_client)
        )
    return False


def test_every_table_row_is_used():
    """A row that no longer matches a command is stale (the command changed or went away)."""
    used = {id(a) for b in BLOCKS for a in b.adapts}
    stale = [a.match for a in ADAPT if id(a) not in used]
    assert not stale, f"ADAPT rows matching no command: {stale}"
