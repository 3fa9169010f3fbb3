"""The disaggregated executor: spawns attention, expert and prefill workers, forms their data
plane (one torch.distributed world per generation), sends them step plans, gathers sampled
tokens, and heals the cluster with its `ClusterRecovery` when a worker fails. Runs in the
engine's process."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import msgspec
import zmq

from afd.comm import auth, wire
from afd.comm.control import ipc_dir, shm_dir
from afd.comm.dispatch import resolve_transport_name
from afd.comm.messages import (
    AttnResult,
    AttnStep,
    DriverMessage,
    ExpertResult,
    ExpertStep,
    FromWorker,
    KvTransfer,
    PlanEntry,
    PrefillResult,
    PrefillStep,
    SampleSpec,
    Shutdown,
    WorkerSpec,
)
from afd.comm.messages import StepResult as WorkerResult
from afd.comm.net import free_port, listen_socket
from afd.config import ModelConfig, parse_node_roles
from afd.scheduler.cluster.recovery import (
    REFORM_TIMEOUT_S,
    ClusterRecovery,
    NodeLostError,
    _Failure,
    node_supervisor,
)
from afd.scheduler.cluster.recovery import log as recovery_log
from afd.scheduler.cluster.supervisor import Supervisor, WorkerDiedError
from afd.scheduler.core.kv_capacity import num_kv_blocks_for
from afd.scheduler.core.scheduler import ScheduledBatch
from afd.scheduler.core.step import (
    ClusterUnavailable,
    RecoveryStats,
    Sampled,
    StepInterrupted,
    StepPlan,
    StepResult,
)
from afd.threads import thread_plan

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
    structured outputs); the sequence's draft (speculation) goes with a sampling entry."""
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
        draft=list(seq.draft) if sample else [],
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
        threads=thread_plan(cluster).worker,
        dist_timeout_s=REFORM_TIMEOUT_S,
        eos_token_ids=sorted(eos_token_ids),
    )
    return wire.decode_spec(wire.encode(spec))  # checked here as every worker will check it


def transport_label(config) -> str:
    """The A<->F transport a cluster of `config` uses, as the start-up line names it: `shm
    (auto)` when --comm-backend auto chose it."""
    cluster = config.cluster
    one_node = cluster.nnodes == 1
    name = resolve_transport_name(
        cluster.comm_backend,
        cluster.device,
        "-" if one_node else None,  # shm needs every worker on one host
        one_node and shares_gpus(config),
    )
    return f"{name} (auto)" if cluster.comm_backend == "auto" else name


def print_plan(config) -> None:
    """The start-up lines: what runs where, then that loading begins."""
    cluster, model = config.cluster, config.source.model
    threads = thread_plan(cluster).describe()
    if cluster.num_attention_workers:
        a, f, p = (
            cluster.num_attention_workers,
            cluster.num_expert_workers,
            cluster.num_prefill_workers,
        )
        print(
            f"afd: plan: {a} attention worker(s) (ranks 0..{a - 1}), {f} expert worker(s) "
            f"(ranks {a}..{a + f - 1}), {p} prefill worker(s)"
            + (f" (ranks {a + f}..{a + f + p - 1})" if p else "")
            + f"; m={cluster.num_micro_batches}, transport={transport_label(config)}, "
            f"device={cluster.device}, {threads}, model={model}",
            flush=True,
        )
    else:
        print(f"afd: plan: single process, device={cluster.device}, {threads}, model={model}",
              flush=True)  # fmt: skip
    print("afd: loading model and starting workers ...", flush=True)


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


class DriverChannel:
    """The driver's control sockets: one inbox every worker pushes to, one plan socket per rank
    (ROUTER). A plan goes only to the connection whose signed hello claimed worker `rank`'s
    port, so another connection to a plan port gets nothing."""

    def __init__(self, layout: ClusterLayout):
        self.layout = layout
        self.zctx = zmq.Context()
        self.inbox = self.zctx.socket(zmq.PULL)
        self.inbox.bind(layout.driver_addr())
        self.outboxes: dict[int, zmq.Socket] = {}
        self.peers: dict[int, bytes] = {}  # rank -> the ZMQ routing id of its signed hello
        self.sealer = auth.Sealer()
        self.opener = auth.Opener(auth.DRIVER_TAG)
        self._hellos: dict[int, auth.Opener] = {}

    def _frame(self, rank: int, msg: DriverMessage) -> bytes:
        return self.sealer.seal(auth.plan_tag(rank), wire.encode(msg))

    def bind_outboxes(self) -> None:
        for rank in range(self.layout.world_size):
            sock = self.zctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone peer is an error, not a drop
            sock.bind(self.layout.inbox_addr(rank))
            self.outboxes[rank] = sock
            self._hellos[rank] = auth.Opener(auth.hello_tag(rank))

    def _take_hellos(self, rank: int, wait_ms: int) -> None:
        """Adopt the newest well-signed hello on rank's plan port (a replacement's), waiting up
        to wait_ms while there is none; drop the rest (logged by the opener)."""
        sock, deadline = self.outboxes[rank], time.monotonic() + wait_ms / 1000
        while True:
            left = 0 if rank in self.peers else max(0, round((deadline - time.monotonic()) * 1e3))
            if not sock.poll(left):
                return
            parts = sock.recv_multipart()
            if len(parts) == 2 and self._hellos[rank].open(parts[1]) is not None:
                self.peers[rank] = parts[0]

    def _deliver(self, rank: int, frame: bytes, wait_ms: int) -> bool:
        """Send `frame` to worker rank's connection; False if it has none that takes it."""
        for _ in range(2):  # after a failed send, a replacement's hello may be on its way
            self._take_hellos(rank, wait_ms)
            peer = self.peers.get(rank)
            if peer is None:
                return False
            try:
                self.outboxes[rank].send_multipart([peer, frame], 0 if wait_ms else zmq.NOBLOCK)
                return True
            except zmq.ZMQError:  # gone (EHOSTUNREACH) or not reading (EAGAIN)
                del self.peers[rank]
        return False

    def send(self, rank: int, msg: DriverMessage) -> None:
        """A plan or instruction; a worker that cannot take it is a failure."""
        if not self._deliver(rank, self._frame(rank, msg), SEND_TIMEOUT_MS):
            role = self.layout.role(rank)
            raise _Failure(f"{role} worker {rank} does not take messages")

    def send_nowait(self, rank: int, msg: DriverMessage) -> None:
        self._deliver(rank, self._frame(rank, msg), 0)  # gone: its replacement starts fresh

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.inbox.poll(timeout_ms))

    def recv(self) -> bytes | None:
        """The next worker record's bytes; None for one dropped (forged, replayed, unsigned)."""
        return self.opener.open(self.inbox.recv())

    def announce_shutdown(self) -> None:
        for rank in self.outboxes:
            self.send_nowait(rank, Shutdown())

    def close(self) -> None:
        for sock in self.outboxes.values():
            sock.close(linger=0)
        self.inbox.close(linger=0)
        # destroy, not term: a socket whose bind failed is in no attribute, and term would wait
        # for it forever (a start that cannot bind must fail, not hang)
        self.zctx.destroy(linger=0)


@dataclass
class StepStats:
    """What the last step measured (for benchmarks): stage seconds, trace events (with
    `trace` on), expert load, data-plane bytes, micro-batches and decode steps."""

    times: dict[str, float] = field(default_factory=dict)
    events: list = field(default_factory=list)
    load: list[list[int]] = field(default_factory=list)
    wire: dict[str, int] = field(default_factory=dict)
    num_micro_batches: int = 1
    num_steps: int = 1

    def add(self, msg: WorkerResult) -> None:
        for k, v in msg.times.items():
            self.times[k] = self.times.get(k, 0.0) + v
        self.events += [[*e, msg.rank] for e in msg.events]


@dataclass
class _Gathered:
    """What the workers answered to one step."""

    steps: list[Sampled]  # sampled tokens per decode step
    stats: StepStats
    errors: dict[int, str] = field(default_factory=dict)  # seq_id -> why its sampling failed
    prompt_logprobs: list = field(default_factory=list)  # PromptLogprobs of this step


class AFDExecutor:
    """A attention workers (data-parallel replicas, one KV cache each), F expert workers and P
    prefill workers; on one node or several (this process is node 0).

    Failures: a worker that dies is replaced by its node's supervisor (same rank and role, within
    the restart policy); one that hangs is killed by it first. This driver then re-forms the
    data plane as a new generation (`ClusterRecovery`): every living worker abandons its step
    (`abort`), the replacement loads only what its role owns and says `ready`, and every rank
    joins the new generation (`reform` -> `joined`). Living workers keep their KV caches and
    expert shards. The step is then replayed (StepInterrupted tells the engine which replicas
    lost their KV)."""

    def __init__(
        self,
        config,
        model_path: Path,
        model_config: ModelConfig,
        eos_token_ids=(),
        tokenizer_dir: Path | None = None,
    ):
        layout = layout_for(config, model_config)
        a, f, p = layout.num_attention, layout.num_expert, layout.num_prefill
        self.config, self.layout = config, layout
        self.num_replicas, self.num_prefill_replicas = a, p
        self.num_micro_batches = config.cluster.num_micro_batches
        spec = worker_spec(config, model_path, model_config, layout, tokenizer_dir, eos_token_ids)
        self.num_kv_blocks = spec.num_kv_blocks
        self.trace = False  # workers record stage events (benchmarks)
        self.last = StepStats()
        self.recovery = RecoveryStats()
        self.fatal: str | None = None  # why the cluster cannot serve any more
        self._shut = False
        self._store_sock = self.store = None
        self._stage_totals: dict[str, float] = {}
        self._wire_totals: dict[str, int] = {}
        self._released: dict[int, list[int]] = {}
        # per attention replica: sequences whose sampler state it holds (history was sent)
        self._has_history: dict[int, set[int]] = {}
        self._prefill_busy: set[int] = set()
        self._prefill_done: dict[int, PrefillResult] = {}  # results not yet returned
        self._attempt_prefill: set[int] = set()  # prefill plans sent by the running execute()
        self._step = 0
        self.attention_ranks = list(range(a))
        self.expert_ranks = list(range(a, a + f))
        self.prefill_ranks = list(range(a + f, a + f + p))
        auth.install_secret(config.cluster.cluster_secret_file)  # before any worker starts
        self.channel = DriverChannel(layout)
        self.supervisor = node_supervisor(config)
        node_timeout_s = config.failure.node_timeout_s if layout.nnodes > 1 else None
        self.recoverer = ClusterRecovery(
            self.supervisor,
            self.channel,
            layout,
            self.recovery,
            config.cluster.progress,
            node_timeout_s,
        )
        try:
            self._start(spec)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, spec: WorkerSpec) -> None:
        import torch.distributed as dist

        layout = self.layout
        # the rendezvous of every generation; here, so it outlives any worker. Its socket is
        # bound here, to node 0's address only (TCPStore alone listens on every one)
        self._store_sock = listen_socket(layout.host, layout.port)
        self.store = dist.TCPStore(
            layout.host, layout.port, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=REFORM_TIMEOUT_S),
            master_listen_fd=self._store_sock.fileno(),
        )  # fmt: skip
        self._store_sock.detach()  # the store owns the descriptor now
        self.channel.bind_outboxes()
        spawn_node_workers(self.supervisor, spec, layout, node=0)
        self.recoverer.start()

    @property
    def param_bytes(self) -> dict[tuple[str, int], int]:
        """(role, rank) -> bytes of the weights the worker loaded."""
        return self.recoverer.param_bytes

    @property
    def pids(self) -> dict[int, int]:
        """rank -> pid of its current process (any node)."""
        return self.recoverer.pids

    def _take_prefill_result(self, msg: FromWorker) -> bool:
        if not isinstance(msg, PrefillResult) or not self.recoverer.current(msg):
            return False
        if msg.gen != self.recoverer.generation or msg.rank not in self.prefill_ranks:
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

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step: sampled tokens per decode step, and the prefill replicas whose plan (of
        this or an earlier step) finished; a busy prefill worker is not waited for. Raises
        StepInterrupted after healing a failure (run the step again), WorkerDiedError when the
        cluster cannot be healed."""
        if self.fatal is not None:
            raise WorkerDiedError(self.fatal)
        waiting = self.recoverer.health()
        if waiting is not None:
            raise ClusterUnavailable(waiting)
        try:
            self._drain()
            return self._execute(plan)
        except _Failure as f:
            raise self._guarded(self._interrupted, f) from None
        except NodeLostError as e:
            raise self._lose_node(e) from None
        except Exception as e:
            self._die(e)

    def _execute(self, plan: StepPlan) -> StepResult:
        self._step += 1
        self._attempt_prefill = set()
        batches = plan.batches
        active = [r for r, b in enumerate(batches) if not b.is_empty]
        m = max(
            1, min(self.num_micro_batches, max((len(batches[r].seqs) for r in active), default=1))
        )
        num_steps = plan.num_steps
        if any(batches[r].num_steps != num_steps for r in active):
            raise ValueError("every replica must run the same number of decode steps")
        imports, exports = self._transfers(plan)
        planned = self._send_decode(plan, active, imports, m)
        prefilling = self._send_prefill(plan, exports)
        self._prefill_busy |= set(prefilling)
        got = _Gathered([{} for _ in range(num_steps)], StepStats(num_micro_batches=m,
                                                                  num_steps=num_steps))  # fmt: skip
        waiting = {self.attention_ranks[r] for r in planned}
        waiting |= set(self.expert_ranks) if active else set()
        exports_only = {p for p in prefilling if plan.prefill[p].is_empty}
        self._gather(got, waiting, exports_only, bool(active))
        self._drain()  # prefill results that are already here
        done = sorted(self._prefill_done)
        for p in done:
            result = self._prefill_done.pop(p)
            got.steps[0].update((s.seq_id, (s.token, s.logprobs)) for s in result.sampled)
            got.errors.update((e.seq_id, e.message) for e in result.errors)
            got.prompt_logprobs += result.prompt_logprobs
        self._attempt_prefill = set()
        for k, v in got.stats.times.items():
            self._stage_totals[k] = self._stage_totals.get(k, 0.0) + v
        for k, v in got.stats.wire.items():
            self._wire_totals[k] = self._wire_totals.get(k, 0) + v
        self.last = got.stats
        prompt_lps: dict[int, list] = {}
        for lp in got.prompt_logprobs:
            prompt_lps.setdefault(lp.seq_id, []).append([lp.position, lp.entries])
        return StepResult(got.steps, done, got.errors, prompt_lps)

    def _transfers(self, plan: StepPlan) -> tuple[dict[int, list], dict[int, list]]:
        """The KV copies of the plan: imports per attention replica, exports per prefill one."""
        imports: dict[int, list[KvTransfer]] = {}
        exports: dict[int, list[KvTransfer]] = {}
        for t in plan.transfers:
            src_blocks, dst_blocks = t.blocks
            prefill_rank, attn_rank = self.prefill_ranks[t.prefill], self.attention_ranks[t.replica]
            seq_id = t.seq.seq_id
            imports.setdefault(t.replica, []).append(KvTransfer(seq_id, prefill_rank, dst_blocks))
            exports.setdefault(t.prefill, []).append(KvTransfer(seq_id, attn_rank, src_blocks))
        return imports, exports

    def _attention_entry(self, replica: int, seq, n: int, sample: bool) -> PlanEntry:
        known = self._has_history.setdefault(replica, set())
        entry = plan_entry(seq, n, sample, with_history=seq.seq_id not in known)
        if sample and seq.sampling_params.needs_history:
            known.add(seq.seq_id)
        return entry

    def _send_decode(self, plan: StepPlan, active: list[int], imports, m: int) -> list[int]:
        """Plans to the attention workers with work or KV to import, and to every expert worker
        when some replica computes; returns the replicas planned."""
        planned = sorted(set(active) | set(imports))
        for r in planned:
            mbs = []
            if r in active:
                b = plan.batches[r]
                mbs = [
                    [
                        self._attention_entry(r, b.seqs[i], b.num_new_tokens[i], b.sample[i])
                        for i in g
                    ]
                    for g in split_micro_batches(b, m)
                ]
            step = AttnStep(step=self._step, micro_batches=mbs, release=self._released.pop(r, []),
                            imports=imports.get(r, []), num_steps=plan.num_steps,
                            trace=self.trace)  # fmt: skip
            self.channel.send(self.attention_ranks[r], step)
        if active:
            expert_plan = ExpertStep(step=self._step, sources=active, num_micro_batches=m,
                                     num_steps=plan.num_steps, trace=self.trace)  # fmt: skip
            for rank in self.expert_ranks:
                self.channel.send(rank, expert_plan)
        return planned

    def _send_prefill(self, plan: StepPlan, exports) -> list[int]:
        """Plans to the prefill workers with prompts to compute or KV to export."""
        prefilling = [p for p, b in enumerate(plan.prefill) if not b.is_empty or p in exports]
        for p in prefilling:
            b = plan.prefill[p]
            # prefill workers keep no sampler state: the history goes with every sampled entry
            entries = [
                plan_entry(seq, n, smp, with_history=True)
                for seq, n, smp in zip(b.seqs, b.num_new_tokens, b.sample, strict=True)
            ]
            step = PrefillStep(step=self._step, entries=entries, exports=exports.get(p, []),
                               trace=self.trace)  # fmt: skip
            self.channel.send(self.prefill_ranks[p], step)
            self._attempt_prefill.add(p)
        return prefilling

    def _gather(self, got: _Gathered, waiting: set[int], exports_only: set[int], active: bool):
        """Wait for the decode side and for export-only prefill plans; long prefills only when
        nothing else is running (otherwise their results are collected when they arrive)."""
        rec, since = self.recoverer, time.monotonic()
        deadline = since + STEP_TIMEOUT_S
        while waiting or exports_only or (not active and not self._prefill_done
                                           and self._prefill_busy):  # fmt: skip
            msg = rec.next(deadline, f"step {self._step}")
            rec.check_failures()
            rec.check_nodes(waiting, since)
            if msg is None:
                continue
            failure = rec.failure_in(msg)
            if failure is not None:
                raise failure
            if self._take_prefill_result(msg):
                exports_only.discard(self.prefill_ranks.index(msg.rank))
                got.stats.add(msg)
                continue
            if (
                not isinstance(msg, AttnResult | ExpertResult)
                or not rec.current(msg)
                or msg.gen != rec.generation
                or msg.step != self._step
            ):
                continue  # stale: from an abandoned step or generation
            waiting.discard(msg.rank)
            got.stats.add(msg)
            if isinstance(msg, AttnResult):
                got.prompt_logprobs += msg.prompt_logprobs
                wire_bytes = got.stats.wire
                wire_bytes["dispatch"] = wire_bytes.get("dispatch", 0) + msg.wire.dispatch
                wire_bytes["combine"] = wire_bytes.get("combine", 0) + msg.wire.combine
                # past the plan's steps: tokens of sequences that accepted drafts
                got.steps += [{} for _ in range(len(msg.sampled) - len(got.steps))]
                for sampled, step in zip(got.steps, msg.sampled, strict=False):
                    sampled.update((s.seq_id, (s.token, s.logprobs)) for s in step)
                got.errors.update((e.seq_id, e.message) for e in msg.errors)
            else:
                got.stats.load.append(msg.load)

    # ---- failures ------------------------------------------------------------------------
    def _interrupted(self, failure: _Failure) -> StepInterrupted:
        """Recover, forget the interrupted attempt, and say what the engine must fix up."""
        reason = str(failure)
        for p in self._attempt_prefill:  # the engine sends these again with the replay
            self._prefill_busy.discard(p)
            self._prefill_done.pop(p, None)
        self._attempt_prefill = set()
        replaced = self.recoverer.recover(reason)
        lost_attention = {r for r in replaced if r in self.attention_ranks}
        lost_prefill = {self.prefill_ranks.index(r) for r in replaced if r in self.prefill_ranks}
        for p in lost_prefill:  # its batch and KV are gone: the engine requeues them
            self._prefill_busy.discard(p)
            self._prefill_done.pop(p, None)
        # living prefill workers abandoned the batch of an earlier step: the engine sends it
        # again with the replay (as a plan of this step, so that it can also bisect it)
        dropped_prefill, self._prefill_busy = self._prefill_busy, set()
        for r in lost_attention:
            self._released.pop(r, None)
        # the replay sends every sampler history again: a replacement has none, and a living
        # worker may have abandoned the step before it kept one
        self._has_history.clear()
        raised = failure.rank
        failed_prefill = (
            {self.prefill_ranks.index(raised)}
            if raised in self.prefill_ranks and raised not in replaced
            else set()
        )
        lost_expert = {r for r in replaced if r in self.expert_ranks}
        return StepInterrupted(
            reason, lost_attention, lost_prefill, dropped_prefill, failed_prefill, lost_expert
        )

    def poll_failures(self) -> StepInterrupted | None:
        """Between steps: notice a failure and recover now (so /health and the next request
        see a healed cluster); returns what the engine must fix up, if anything happened."""
        if self.fatal is not None:
            raise WorkerDiedError(self.fatal)
        try:
            return self._poll()
        except ClusterUnavailable:
            return None  # lost while idle: nothing ran; the engine sees it in health()

    def _poll(self) -> StepInterrupted | None:
        try:
            if self.recoverer.lost is not None:
                return self._rejoin()
            self._drain()
        except _Failure as f:
            return self._guarded(self._interrupted, f)
        except NodeLostError as e:
            raise self._lose_node(e) from None
        except Exception as e:
            self._die(e)
        return None

    def _rejoin(self) -> StepInterrupted | None:
        """While a node is lost: once all its ranks are back, re-form with them (as after a
        replacement: the engine resets the replicas that were there)."""
        lost = self.recoverer.lost
        if not self.recoverer.rejoined():
            return None
        return self._guarded(self._interrupted, _Failure(f"{lost.name} rejoined"))

    def _lose_node(self, e: NodeLostError) -> ClusterUnavailable:
        """A node is lost: abandon what ran (every request in flight fails), keep the living
        workers and wait for the node to rejoin."""
        self._prefill_busy, self._prefill_done, self._attempt_prefill = set(), {}, set()
        self._has_history.clear()  # a rejoined worker, or a replay after the wait, has none
        try:
            self.recoverer.lose(e)
        except NodeLostError as again:  # another node went silent meanwhile: that one too
            return self._lose_node(again)
        except Exception as err:
            self._die(err)
        return ClusterUnavailable(self.recoverer.health())

    def _drain(self) -> None:
        """Read what the workers sent while no step ran: failures raise _Failure; finished
        prefill results are kept; anything else is stale."""
        self.recoverer.check_failures()
        while self.channel.poll(0):
            msg = self.recoverer.receive()
            if msg is None:
                continue
            failure = self.recoverer.failure_in(msg)
            if failure is not None:
                raise failure
            self._take_prefill_result(msg)

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except NodeLostError as e:
            raise self._lose_node(e) from None
        except Exception as e:
            self._die(e)

    def _die(self, e: BaseException):
        self.fatal = f"{e}"
        recovery_log(f"error: the cluster cannot serve any more: {e}")
        self.shutdown()
        raise e if isinstance(e, WorkerDiedError) else WorkerDiedError(str(e)) from e

    def check_alive(self) -> None:
        """Raise WorkerDiedError if the cluster cannot serve (a worker gone for good)."""
        if self.fatal is not None:
            raise WorkerDiedError(self.fatal)
        self.supervisor.check()

    def health(self) -> tuple[bool, str]:
        """(can serve, why not / what is recovering); safe from any thread."""
        if self.fatal is not None:
            return False, self.fatal
        if self.supervisor.fatal is not None:
            return False, self.supervisor.fatal.describe()
        waiting = self.recoverer.health()
        if waiting is not None:
            return False, waiting
        if self.recoverer.recovering is not None:
            return True, f"recovering: {self.recoverer.recovering}"
        return True, "ok"

    def stage_times(self) -> dict[str, float]:
        """Cumulative stage seconds, and the data plane's bytes (A->F dispatch, F->A combine)."""
        out = {f"afd_stage_{k}_seconds": v for k, v in self._stage_totals.items()}
        out.update({f"{k}_bytes_total": float(v) for k, v in self._wire_totals.items()})
        return out

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        self.supervisor.restarting = False  # what exits now is told to
        self.channel.announce_shutdown()
        self.supervisor.shutdown()
        self.channel.close()
        self.store = None
        if self._store_sock is not None:
            self._store_sock.close()  # a no-op once the store took it
        for folder in (self.layout.ipc, self.layout.shm):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
