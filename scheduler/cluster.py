"""The disaggregated executor: spawns attention, expert and prefill workers, forms their data
plane (one torch.distributed world per generation), sends them step plans, gathers sampled
tokens, and heals the cluster when a worker fails (see `AFDExecutor._recover`). Runs in the
scheduler's process."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import msgspec
import zmq

from afd.comm import wire
from afd.comm.control import ipc_dir, shm_dir
from afd.comm.dispatch import resolve_transport_name
from afd.comm.messages import (
    AttnResult,
    AttnStep,
    DriverMessage,
    Error,
    ExpertResult,
    ExpertStep,
    FromWorker,
    KvTransfer,
    PlanEntry,
    PrefillResult,
    PrefillStep,
    Ready,
    SampleSpec,
    Shutdown,
    StepResult,
    WorkerSpec,
)
from afd.comm.net import free_port, listen_socket
from afd.config import ModelConfig, parse_node_roles
from afd.scheduler.core.scheduler import ScheduledBatch
from afd.scheduler.recovery import (
    REFORM_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    ClusterRecovery,
    RecoveryStats,
    _Failure,
    node_supervisor,
)
from afd.scheduler.supervisor import Supervisor, WorkerDiedError

STEP_TIMEOUT_S = 600.0
SEND_TIMEOUT_MS = 5000  # a plan to a worker that is gone must not block the driver


def split_micro_batches(batch: ScheduledBatch, m: int) -> list[list[int]]:
    """Indices of batch.seqs per micro-batch: contiguous, balanced by token count."""
    total = sum(batch.num_new_tokens)
    groups: list[list[int]] = [[] for _ in range(m)]
    acc, g = 0, 0
    for i, n in enumerate(batch.num_new_tokens):
        remaining_seqs = len(batch.num_new_tokens) - i
        if groups[g] and (acc >= total * (g + 1) / m or remaining_seqs <= m - 1 - g) and g < m - 1:
            g += 1
        groups[g].append(i)
        acc += n
    return groups


def plan_entry(seq, n: int, sample: bool, with_history: bool = False) -> PlanEntry:
    """The next `n` tokens of a sequence as a plan entry. Its sampler params go with entries
    that sample or compute prompt logprobs; `history` (the tokens before start) only when the
    worker has not seen the sequence yet and its request needs its history (penalties,
    structured outputs)."""
    start = seq.num_computed_tokens
    tokens, table = seq.token_ids[start : start + n], list(seq.block_table)
    p = seq.sampling_params
    targets = seq.prompt_logprob_targets(start, n)
    if not (sample or targets):
        return PlanEntry(seq.seq_id, tokens, start, table, sample)
    needs_history = sample and with_history and start and p.needs_history
    return PlanEntry(
        seq.seq_id, tokens, start, table, sample, SampleSpec.of(p), index=seq.index,
        prompt_len=seq.num_prompt_tokens, prompt_targets=targets,
        history=seq.token_ids[:start] if needs_history else None,
    )  # fmt: skip


@dataclass
class ClusterLayout:
    """Ranks, roles, nodes and addresses of one cluster, computed the same way on every node."""

    num_attention: int
    num_expert: int
    num_prefill: int
    nnodes: int = 1
    node_roles: dict[int, list[str]] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    ipc: str | None = None  # single node: control sockets are IPC files in this folder
    shm: str | None = None  # single node: shared-memory segments of the shm transport

    @property
    def world_size(self) -> int:
        return self.num_attention + self.num_expert + self.num_prefill

    def role(self, rank: int) -> str:
        a, f = self.num_attention, self.num_expert
        return "attention" if rank < a else "expert" if rank < a + f else "prefill"

    def node_of(self, rank: int) -> int:
        """Workers of a role are spread round-robin over the nodes that list that role."""
        if self.nnodes == 1:
            return 0
        role = self.role(rank)
        nodes = [n for n in range(self.nnodes) if role in self.node_roles.get(n, [])]
        if not nodes:
            raise ValueError(f"no node runs {role} workers (see --node-roles)")
        first = {"attention": 0, "expert": self.num_attention,
                 "prefill": self.num_attention + self.num_expert}[role]  # fmt: skip
        return nodes[(rank - first) % len(nodes)]

    def driver_addr(self) -> str:
        if self.ipc:
            return f"ipc://{os.path.join(self.ipc, 'driver')}"
        return f"tcp://{self.host}:{self.port + 1}"

    def inbox_addr(self, rank: int) -> str:
        if self.ipc:
            return f"ipc://{os.path.join(self.ipc, f'{self.role(rank)}-{rank}')}"
        return f"tcp://{self.host}:{self.port + 2 + rank}"


def layout_for(config, model_config: ModelConfig) -> ClusterLayout:
    """Where every worker runs (the config checked its own values: counts, nodes, address)."""
    cluster = config.cluster
    a, f, p = cluster.num_attention_workers, cluster.num_expert_workers, cluster.num_prefill_workers
    if a < 1:
        raise ValueError("a disaggregated cluster needs --num-attention-workers N and "
                         "--num-expert-workers N (N >= 1)")  # fmt: skip
    if f > model_config.n_routed_experts:
        n = model_config.n_routed_experts
        raise ValueError(f"--num-expert-workers {f}, but the model has {n} routed experts: give "
                         f"--num-expert-workers {n} or fewer")  # fmt: skip
    nnodes = cluster.nnodes
    if nnodes == 1:
        _check_comm_backend(config, shares_gpus(config))  # before making folders
        return ClusterLayout(a, f, p, port=free_port(), ipc=ipc_dir(), shm=shm_dir())
    host, _, port = cluster.dist_init_addr.rpartition(":")
    roles = parse_node_roles(cluster.node_roles, nnodes)
    layout = ClusterLayout(a, f, p, nnodes, roles, host, int(port))
    for rank in range(layout.world_size):
        layout.node_of(rank)  # every role must have a node
    _check_comm_backend(config, shares_gpus(config, layout))
    return layout


def _check_comm_backend(config, shared_gpus: bool) -> None:
    cluster = config.cluster
    one_host = "-" if cluster.nnodes == 1 else None
    resolve_transport_name(cluster.comm_backend, cluster.device, one_host, shared_gpus)


def shares_gpus(config, layout: ClusterLayout | None = None) -> bool:
    """Whether some GPU runs several workers (--gpus-per-node below a node's worker count). NCCL
    allows no two ranks on one GPU, so such a cluster's world runs over gloo and its data plane
    stages through host memory."""
    cluster = config.cluster
    if cluster.device != "cuda" or cluster.gpus_per_node is None:
        return False
    if layout is None:  # one node: it runs every worker
        workers = (
            cluster.num_attention_workers + cluster.num_expert_workers + cluster.num_prefill_workers
        )
        return workers > cluster.gpus_per_node
    per_node = [0] * layout.nnodes
    for rank in range(layout.world_size):
        per_node[layout.node_of(rank)] += 1
    return max(per_node) > cluster.gpus_per_node


def worker_spec(
    config,
    model_path,
    model_config: ModelConfig,
    layout: ClusterLayout,
    tokenizer_dir=None,
    eos_token_ids=(),
) -> WorkerSpec:
    """What every worker process is started with (same on every node); `tokenizer_dir`: the
    tokenizer grammar masks are built from (default: the model's)."""
    from afd.engine.executor import num_kv_blocks_for

    cluster = config.cluster
    dtype = config.torch_dtype(model_config)
    a, f = layout.num_attention, layout.num_expert
    shared = shares_gpus(config, layout)
    spec = WorkerSpec(
        model_path=str(model_path),
        tokenizer_dir=str(tokenizer_dir or model_path),
        dtype=str(dtype).removeprefix("torch."),
        device=cluster.device,
        block_size=config.cache.block_size,
        num_kv_blocks=num_kv_blocks_for(config, model_config, dtype, model_path),
        world_size=layout.world_size,
        init_addr=f"{layout.host}:{layout.port}",
        driver_addr=layout.driver_addr(),
        inbox_addrs={r: layout.inbox_addr(r) for r in range(layout.world_size)},
        num_attention_workers=a,
        num_expert_workers=f,
        expert_ranks=list(range(a, a + f)),
        # "auto" resolved here, once, with what the workers cannot see (shared GPUs, one node)
        comm_backend=resolve_transport_name(
            cluster.comm_backend, cluster.device, layout.shm, shared
        ),
        dist_backend="gloo" if shared else "auto",
        gpus_per_node=cluster.gpus_per_node,
        dispatch_dtype=cluster.dispatch_dtype,
        quantization=config.source.quantization,
        shm_dir=layout.shm,
        threads=cluster.worker_threads,
        dist_timeout_s=REFORM_TIMEOUT_S,
        eos_token_ids=sorted(eos_token_ids),
    )
    return wire.decode_spec(wire.encode(spec))  # checked here as every worker will check it


def node_devices(
    layout: ClusterLayout, node: int, device: str, num_gpus: int, gpus_per_node: int | None = None
) -> dict[int, str]:
    """The device of every worker on this node. By default one GPU each in rank order (NCCL
    allows no two ranks on one GPU); with gpus_per_node G the workers take cuda:0..G-1 round-robin,
    several per GPU when there are more workers than G. CPU workers share the CPU."""
    ranks = [r for r in range(layout.world_size) if layout.node_of(r) == node]
    if device != "cuda":
        return dict.fromkeys(ranks, device)
    if gpus_per_node is None:
        if len(ranks) > num_gpus:
            raise ValueError(
                f"{len(ranks)} workers on node {node} need one GPU each, but it has {num_gpus}; "
                "use fewer workers per node, --gpus-per-node to share GPUs, or --device cpu"
            )
        return {r: f"cuda:{i}" for i, r in enumerate(ranks)}
    if not 1 <= gpus_per_node <= num_gpus:
        raise ValueError(f"--gpus-per-node {gpus_per_node}, but node {node} has {num_gpus} GPUs")
    return {r: f"cuda:{i % gpus_per_node}" for i, r in enumerate(ranks)}


def spawn_node_workers(supervisor: Supervisor, spec: WorkerSpec, layout: ClusterLayout, node: int):
    """Start this node's workers, each with its encoded copy of the spec (rank, device set)."""
    import torch

    from afd.attention_nodes.prefill_worker import run_prefill_worker
    from afd.attention_nodes.worker import run_attention_worker
    from afd.expert_nodes.worker import run_expert_worker

    roles = {"attention": run_attention_worker, "expert": run_expert_worker,
             "prefill": run_prefill_worker}  # fmt: skip
    num_gpus = torch.cuda.device_count() if spec.device == "cuda" else 0
    devices = node_devices(layout, node, spec.device, num_gpus, spec.gpus_per_node)
    for rank, device in devices.items():
        role = layout.role(rank)
        own = msgspec.structs.replace(spec, rank=rank, device=device)
        supervisor.spawn(role, rank, roles[role], wire.encode(own))


class AFDExecutor(ClusterRecovery):
    """A attention workers (data-parallel replicas, one KV cache each), F expert workers and P
    prefill workers; on one node or several (this process is node 0).

    Failures: a worker that dies is replaced by its node's supervisor (same rank and role, within
    the restart policy); one that hangs is killed by it first. This driver then re-forms the
    data plane as a new generation: every living worker abandons its step (`abort`), the
    replacement loads only what its role owns and says `ready`, and every rank joins the new
    generation (`reform` -> `joined`). Living workers keep their KV caches and expert shards.
    The step is then replayed (StepInterrupted tells the engine which replicas lost their KV)."""

    def __init__(
        self,
        config,
        model_path: Path,
        model_config: ModelConfig,
        eos_token_ids=(),
        tokenizer_dir: Path | None = None,
    ):
        import torch.distributed as dist

        layout = layout_for(config, model_config)
        a, f, p = layout.num_attention, layout.num_expert, layout.num_prefill
        self.config = config
        self.layout = layout
        self.num_replicas = a
        self.num_prefill_replicas = p
        self.num_micro_batches = config.cluster.num_micro_batches
        spec = worker_spec(config, model_path, model_config, layout, tokenizer_dir, eos_token_ids)
        self.num_kv_blocks = spec.num_kv_blocks
        self.trace = False
        self.last_events: list = []
        self.last_times: dict[str, float] = {}
        self.last_load: list[list[int]] = []
        self.param_bytes: dict[tuple[str, int], int] = {}
        self.sample_errors: dict[int, str] = {}  # seq_id -> why its sampling failed
        self.recovery = RecoveryStats()
        self.recovering: str | None = None  # what is being recovered (for /health)
        self.fatal: str | None = None  # why the cluster cannot serve any more
        self.generation = -1
        self.progress = config.cluster.progress
        self._stage_totals: dict[str, float] = {}
        self._wire_totals: dict[str, int] = {}
        self.last_wire: dict[str, int] = {}
        self._released: dict[int, list[int]] = {}
        # per attention replica: sequences whose sampler state it holds (history was sent)
        self._has_history: dict[int, set[int]] = {}
        self._prompt_logprobs: dict[int, list] = {}
        self._prefill_busy: set[int] = set()
        self._prefill_done: dict[int, PrefillResult] = {}  # results not yet returned
        self._attempt_prefill: set[int] = set()  # prefill plans sent by the running execute()
        self._inc: dict[int, int] = {}  # rank -> incarnation of its current process
        self.pids: dict[int, int] = {}  # rank -> pid of its current process (any node)
        self._replaced: set[int] = set()  # ranks seen with a new incarnation, not yet handled
        self._failures_seen = 0
        self._step = 0
        self.ipc = layout.ipc
        self.zctx = zmq.Context()
        self.inbox = self.zctx.socket(zmq.PULL)
        self.inbox.bind(layout.driver_addr())
        self.outboxes: dict[int, zmq.Socket] = {}
        self.supervisor = node_supervisor(config)
        self.attention_ranks = list(range(a))
        self.expert_ranks = list(range(a, a + f))
        self.prefill_ranks = list(range(a + f, a + f + p))
        self.ranks = list(range(layout.world_size))
        try:
            # the rendezvous of every generation; here, so it outlives any worker. Its socket
            # is bound here, to node 0's address only (TCPStore alone listens on every one)
            self._store_sock = listen_socket(layout.host, layout.port)
            self.store = dist.TCPStore(
                layout.host, layout.port, is_master=True, wait_for_workers=False,
                timeout=timedelta(seconds=REFORM_TIMEOUT_S),
                master_listen_fd=self._store_sock.fileno(),
            )  # fmt: skip
            self._store_sock.detach()  # the store owns the descriptor now
            for rank in self.ranks:
                sock = self.zctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
                sock.bind(layout.inbox_addr(rank))
                self.outboxes[rank] = sock
            spawn_node_workers(self.supervisor, spec, layout, node=0)
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while len(self._inc) < layout.world_size:
                msg = self._next(deadline, "worker start-up")
                if isinstance(msg, Error):
                    raise RuntimeError(f"{msg.role} worker {msg.rank} failed: {msg.message}")
                if isinstance(msg, Ready):
                    self._adopt(msg)
            self.generation = 0
            if not self._form(0, time.monotonic() + STARTUP_TIMEOUT_S):
                raise RuntimeError("a worker failed while the cluster formed")
            self._replaced.clear()
            self.supervisor.enable_restarts()
        except BaseException:
            self.shutdown()
            raise

    # ---- messaging -----------------------------------------------------------------------
    def role(self, rank: int) -> str:
        return self.layout.role(rank)

    def _send(self, rank: int, msg: DriverMessage) -> None:
        """A plan or instruction; a worker that cannot take it is a failure."""
        try:
            self.outboxes[rank].send(wire.encode(msg))
        except zmq.Again:
            raise _Failure(f"{self.role(rank)} worker {rank} does not take messages") from None

    def _send_nowait(self, rank: int, msg: DriverMessage) -> None:
        try:
            self.outboxes[rank].send(wire.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected: gone; its replacement starts fresh

    def _next(self, deadline: float, what: str) -> FromWorker | None:
        """The next worker message, or None after 0.1 s; raises WorkerDiedError when a worker
        is gone for good (restart budget spent) and TimeoutError past the deadline."""
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from the workers in time during {what}")
        if self.inbox.poll(100):
            return self._receive()
        self.supervisor.check()
        return None

    def _adopt(self, msg: Ready) -> None:
        """A (new) process of a rank said ready: its incarnation is the one to listen to."""
        rank = msg.rank
        if self._inc.get(rank) is not None:
            self._replaced.add(rank)
        self._inc[rank] = msg.inc
        self.pids[rank] = msg.pid
        self.param_bytes[(msg.role, rank)] = msg.param_bytes
        if self.progress and self.generation < 0:
            print(f"afd: {msg.role} worker {rank} ready (pid {msg.pid}, "
                  f"{msg.param_bytes / 2**20:.1f} MiB of weights; "
                  f"{len(self._inc)}/{self.layout.world_size})", flush=True)  # fmt: skip

    def _take_prefill_result(self, msg: FromWorker) -> bool:
        if not isinstance(msg, PrefillResult) or not self._current(msg):
            return False
        if msg.gen != self.generation or msg.rank not in self.prefill_ranks:
            return False
        p = self.prefill_ranks.index(msg.rank)
        if p not in self._prefill_busy:
            return False
        self._prefill_busy.discard(p)
        self._prefill_done[p] = msg
        return True

    # ---- executor API --------------------------------------------------------------------
    def release(self, replica: int, seq_ids: list[int]) -> None:
        """Finished sequences whose sampler state the replica may drop (sent with its next plan)."""
        self._released.setdefault(replica, []).extend(seq_ids)
        self._has_history.get(replica, set()).difference_update(seq_ids)

    def take_prompt_logprobs(self) -> dict[int, list]:
        out, self._prompt_logprobs = self._prompt_logprobs, {}
        return out

    def _attention_entry(self, replica: int, seq, n: int, sample: bool) -> PlanEntry:
        known = self._has_history.setdefault(replica, set())
        entry = plan_entry(seq, n, sample, with_history=seq.seq_id not in known)
        if sample and seq.sampling_params.needs_history:
            known.add(seq.seq_id)
        return entry

    def execute(self, batches: list[ScheduledBatch], prefill_batches=None, transfers=()):
        """Run one step. Without a prefill pool: sampled tokens per decode step. With one: (those,
        prefill replicas whose earlier plan finished); a busy prefill worker is not waited for.
        Raises StepInterrupted after healing a failure (run the step again), WorkerDiedError
        when the cluster cannot be healed."""
        if self.fatal is not None:
            raise WorkerDiedError(self.fatal)
        try:
            self._drain()
            sampled, done = self._execute(batches, list(prefill_batches or []), list(transfers))
            return sampled if prefill_batches is None else (sampled, done)
        except _Failure as f:
            raise self._guarded(self._interrupted, f) from None
        except Exception as e:
            self._die(e)

    def _execute(self, batches: list[ScheduledBatch], prefill_batches, transfers) -> tuple:
        self._step += 1
        self.sample_errors = {}
        self._attempt_prefill = set()
        active = [r for r, b in enumerate(batches) if not b.is_empty]
        m = max(
            1, min(self.num_micro_batches, max((len(batches[r].seqs) for r in active), default=1))
        )
        num_steps = max((batches[r].num_steps for r in active), default=1)
        if any(batches[r].num_steps != num_steps for r in active):
            raise ValueError("every replica must run the same number of decode steps")
        imports: dict[int, list[KvTransfer]] = {}
        exports: dict[int, list[KvTransfer]] = {}
        for t in transfers:
            src_blocks, dst_blocks = t.blocks
            prefill_rank, attn_rank = self.prefill_ranks[t.prefill], self.attention_ranks[t.replica]
            seq_id = t.seq.seq_id
            imports.setdefault(t.replica, []).append(KvTransfer(seq_id, prefill_rank, dst_blocks))
            exports.setdefault(t.prefill, []).append(KvTransfer(seq_id, attn_rank, src_blocks))
        planned = sorted(set(active) | set(imports))
        for r in planned:
            mbs = []
            if r in active:
                b = batches[r]
                mbs = [
                    [
                        self._attention_entry(r, b.seqs[i], b.num_new_tokens[i], b.sample[i])
                        for i in g
                    ]
                    for g in split_micro_batches(b, m)
                ]
            plan = AttnStep(
                step=self._step,
                micro_batches=mbs,
                release=self._released.pop(r, []),
                imports=imports.get(r, []),
                num_steps=num_steps,
                trace=self.trace,
            )
            self._send(self.attention_ranks[r], plan)
        if active:
            expert_plan = ExpertStep(step=self._step, sources=active, num_micro_batches=m,
                                     num_steps=num_steps, trace=self.trace)  # fmt: skip
            for rank in self.expert_ranks:
                self._send(rank, expert_plan)
        prefilling = [p for p, b in enumerate(prefill_batches) if not b.is_empty or p in exports]
        for p in prefilling:
            b = prefill_batches[p]
            # prefill workers keep no sampler state: the history goes with every sampled entry
            entries = [
                plan_entry(seq, n, smp, with_history=True)
                for seq, n, smp in zip(b.seqs, b.num_new_tokens, b.sample, strict=True)
            ]
            plan = PrefillStep(step=self._step, entries=entries, exports=exports.get(p, []),
                               trace=self.trace)  # fmt: skip
            self._send(self.prefill_ranks[p], plan)
            self._attempt_prefill.add(p)
        steps: list[dict] = [{} for _ in range(num_steps)]  # sampled tokens per decode step
        prompt_lps: list = []  # [seq_id, first position, entries] of this step
        times: dict[str, float] = {}
        events: list = []
        load: list[list[int]] = []
        wire_bytes: dict[str, int] = {}  # data-plane bytes of the attention workers this step
        self._prefill_busy |= set(prefilling)
        waiting = {self.attention_ranks[r] for r in planned}
        waiting |= set(self.expert_ranks) if active else set()
        exports_only = {p for p in prefilling if prefill_batches[p].is_empty}
        deadline = time.monotonic() + STEP_TIMEOUT_S
        # Wait for the decode side and for export-only prefill plans; long prefills only when
        # nothing else is running (otherwise their results are collected when they arrive).
        while waiting or exports_only or (not active and not self._prefill_done
                                           and self._prefill_busy):  # fmt: skip
            msg = self._next(deadline, f"step {self._step}")
            self._check_failures()
            if msg is None:
                continue
            failure = self._failure_in(msg)
            if failure is not None:
                raise failure
            if self._take_prefill_result(msg):
                exports_only.discard(self.prefill_ranks.index(msg.rank))
                self._add_times(times, events, msg)
                continue
            if (
                not isinstance(msg, AttnResult | ExpertResult)
                or not self._current(msg)
                or msg.gen != self.generation
                or msg.step != self._step
            ):
                continue  # stale: from an abandoned step or generation
            waiting.discard(msg.rank)
            self._add_times(times, events, msg)
            if isinstance(msg, AttnResult):
                prompt_lps += msg.prompt_logprobs
                wire_bytes["dispatch"] = wire_bytes.get("dispatch", 0) + msg.wire.dispatch
                wire_bytes["combine"] = wire_bytes.get("combine", 0) + msg.wire.combine
                for sampled, got in zip(steps, msg.sampled, strict=True):
                    sampled.update((s.seq_id, (s.token, s.logprobs)) for s in got)
                self.sample_errors.update((e.seq_id, e.message) for e in msg.errors)
            else:
                load.append(msg.load)
        self._drain()  # prefill results that are already here
        done = sorted(self._prefill_done)
        for p in done:
            result = self._prefill_done.pop(p)
            steps[0].update((s.seq_id, (s.token, s.logprobs)) for s in result.sampled)
            self.sample_errors.update((e.seq_id, e.message) for e in result.errors)
            prompt_lps += result.prompt_logprobs
        # only now: an attempt that fails is replayed and would report them again
        self._collect_prompt_logprobs(prompt_lps)
        self._attempt_prefill = set()
        for k, v in times.items():
            self._stage_totals[k] = self._stage_totals.get(k, 0.0) + v
        for k, v in wire_bytes.items():
            self._wire_totals[k] = self._wire_totals.get(k, 0) + v
        self.last_wire = wire_bytes
        self.last_times, self.last_events, self.last_load, self.last_m = times, events, load, m
        self.last_num_steps = num_steps
        return steps, done

    @staticmethod
    def _add_times(times: dict, events: list, msg: StepResult) -> None:
        for k, v in msg.times.items():
            times[k] = times.get(k, 0.0) + v
        events += [[*e, msg.rank] for e in msg.events]

    def _collect_prompt_logprobs(self, found: list) -> None:
        for p in found:
            self._prompt_logprobs.setdefault(p.seq_id, []).append([p.position, p.entries])

    def stage_times(self) -> dict[str, float]:
        """Cumulative stage seconds, and the data plane's bytes (A->F dispatch, F->A combine)."""
        out = {f"afd_stage_{k}_seconds": v for k, v in self._stage_totals.items()}
        out.update({f"{k}_bytes_total": float(v) for k, v in self._wire_totals.items()})
        return out

    def shutdown(self) -> None:
        if getattr(self, "_shut", False):
            return
        self._shut = True
        self.supervisor.restarting = False  # what exits now is told to
        for sock in self.outboxes.values():
            try:
                sock.send(wire.encode(Shutdown()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.supervisor.shutdown()
        for sock in self.outboxes.values():
            sock.close(linger=0)
        self.inbox.close(linger=0)
        self.zctx.term()
        self.store = None
        sock = getattr(self, "_store_sock", None)
        if sock is not None:
            sock.close()  # a no-op once the store took it
        for folder in (self.ipc, self.layout.shm):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
