"""The engine: request state around a step of schedule -> execute -> process (the scheduler
builds a StepPlan, the step runner runs it on the executor, the outputs apply its result)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from afd.builtin import resolve_model, resolve_tokenizer
from afd.config import EngineConfig, ModelConfig
from afd.engine.engine_scheduler import EngineScheduler
from afd.engine.executor import LocalExecutor
from afd.engine.step_outputs import StepOutputs
from afd.engine.step_runner import StepRunner
from afd.outputs import CompletionOutput, LogprobsEntry, RequestMetrics, RequestOutput
from afd.quantization import resolve_quantization
from afd.sampling.params import SamplingParams
from afd.sampling.structured import grammar_backend
from afd.scheduler.cluster.executor import AFDExecutor
from afd.scheduler.core.scheduler import Scheduler, SchedulerConfig
from afd.scheduler.core.sequence import Sequence
from afd.scheduler.core.step import Executor
from afd.spec import check_speculation
from afd.threads import set_torch_threads, thread_plan
from afd.tokenizer import IncrementalDetokenizer, Tokenizer, load_chat_template

logger = logging.getLogger("afd.engine")


@dataclass
class RequestState:
    """A request's prompt and its n sequences with their streaming text state."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    stream: bool = True  # False: step() reports the request only once it has finished
    prompt_logprobs: list[LogprobsEntry | None] | None = None
    error: str | None = None  # why it failed (finish_reason "abort")

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        if self.finished and self.finished_time is None:
            self.finished_time = time.monotonic()
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=s.index,
                    text=d.text,
                    token_ids=list(s.output_token_ids),
                    logprobs=list(s.output_logprobs) if self.params.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
                for s, d in zip(self.seqs, self.detokenizers, strict=True)
            ],
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            error=self.error,
            metrics=RequestMetrics(
                self.arrival_time,
                self.first_scheduled_time,
                self.first_token_time,
                self.finished_time,
            ),
        )


def derived_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th request without one when the engine has `seed` (vLLM's
    --seed): every request differs, and the same run of requests repeats."""
    key = f"{seed}:request:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


class LLMEngine:
    """Owns request state; each step schedules, executes and processes the result (with
    detokenize=False it leaves text and stop strings to an API process's OutputProcessor)."""

    def __init__(self, config: EngineConfig, detokenize: bool = True):
        self.config = config
        self.detokenize = detokenize
        source = config.source
        self.model_path: Path = resolve_model(source.model, source.revision, source.download_dir)
        # a different tokenizer (--tokenizer): the engine and every sampler (grammar masks) use it
        self.tokenizer_path: Path = resolve_tokenizer(
            source.tokenizer, source.download_dir, self.model_path
        )
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        resolve_quantization(source.quantization, self.model_config.quant, config.cluster.device)
        check_speculation(config.limits.speculative_config, self.model_config)
        self.tokenizer = Tokenizer.from_pretrained(self.tokenizer_path)
        if source.chat_template is not None:
            self.tokenizer.set_chat_template(load_chat_template(source.chat_template))
        self.eos_token_ids: set[int] = set(self.tokenizer.eos_token_ids) | set(
            self.model_config.eos_token_ids
        )
        max_len = self.model_config.max_position_embeddings
        self.max_model_len = min(config.limits.max_model_len or max_len, max_len)
        self.executor = build_executor(
            config,
            self.model_path,
            self.model_config,
            sorted(self.eos_token_ids),
            self.tokenizer_path,
        )
        self.max_model_len = self._fit_kv(config.limits.max_model_len)
        sched_config = SchedulerConfig(
            max_num_seqs=config.limits.max_num_seqs,
            max_num_batched_tokens=config.limits.max_num_batched_tokens,
            num_blocks=self.executor.num_kv_blocks,
            block_size=config.cache.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            max_model_len=self.max_model_len,
            speculative=config.limits.speculative_config,
        )
        self.scheduler = EngineScheduler(
            sched_config,
            self.executor.num_replicas,
            self.executor.num_prefill_replicas,
            config.limits.num_scheduler_steps,
        )
        self.runner = StepRunner(self.executor, self.scheduler)
        self.outputs = StepOutputs(
            self.scheduler, self.executor, self.tokenizer, self.eos_token_ids, detokenize
        )
        self._ids = itertools.count()
        self._seeds = itertools.count()  # requests given a seed derived from config.seed

    def _fit_kv(self, asked: int | None) -> int:
        """max_model_len within one replica's KV cache, so every admitted request can finish:
        a --max-model-len above it is an error naming both (as vLLM), the model's default is
        capped with a warning (small CPU caches are normal here)."""
        capacity = self.kv_capacity = self.executor.num_kv_blocks * self.config.cache.block_size
        if self.max_model_len <= capacity:
            return self.max_model_len
        if asked is not None:
            self.executor.shutdown()
            raise ValueError(
                f"--max-model-len {self.max_model_len} is larger than one replica's KV cache "
                f"capacity of {capacity} tokens; lower --max-model-len or raise the KV cache "
                "(--num-kv-blocks / --kv-cache-memory-mb)"
            )
        logger.warning(
            "max_model_len capped at %d tokens, one replica's KV cache capacity "
            "(the model allows %d)",
            capacity,
            self.max_model_len,
        )
        return capacity

    @property
    def requests(self) -> dict[str, RequestState]:
        return self.outputs.requests

    @property
    def schedulers(self) -> list[Scheduler]:
        """One per attention replica."""
        return self.scheduler.schedulers

    @property
    def prefill_schedulers(self) -> list[Scheduler]:
        """One per prefill replica (P/D), else none."""
        return self.scheduler.prefill_schedulers

    @property
    def requests_recomputed(self) -> int:
        """Requests whose KV died with a worker and was recomputed."""
        return self.scheduler.requests_recomputed

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = True,
        whole: bool = False,
    ) -> str:
        """Tokenize (if needed) and queue a request; raises ValueError on invalid input. With
        stream=False, step() returns its output only when it finishes (cheaper: the text of a
        request without stop strings is decoded once at the end). With whole=True, a request
        whose prompt + max_tokens does not fit one replica's KV cache is refused rather than
        cut at the cache's end (the offline API; the server refuses it at max_model_len)."""
        params = params or SamplingParams()
        if params.seed is None and self.config.source.seed is not None:
            params = dataclasses.replace(
                params, seed=derived_seed(self.config.source.seed, next(self._seeds))
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        self.validate_prompt(token_ids)
        self.validate_params(params)
        if whole:
            self.check_kv_fit(len(token_ids), params)
        seqs = [Sequence(request_id, i, token_ids, params) for i in range(params.n)]
        state = RequestState(
            request_id,
            text,
            token_ids,
            params,
            seqs,
            [IncrementalDetokenizer(self.tokenizer, token_ids, params) for _ in seqs],
            stream=stream,
        )
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(token_ids)
        self.scheduler.add(request_id, seqs)
        self.outputs.add(state)
        return request_id

    def validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocabulary size {vocab}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but this model allows at most "
                f"{self.max_model_len - 1} prompt tokens (max_model_len={self.max_model_len})"
            )

    def check_kv_fit(self, n_prompt: int, params: SamplingParams) -> None:
        """ValueError naming the capacity if prompt + max_tokens cannot fit one replica's KV."""
        wanted = n_prompt + (params.max_tokens or 0)
        if wanted > self.kv_capacity:
            raise ValueError(
                f"the prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {wanted} "
                f"tokens do not fit one replica's KV cache capacity of {self.kv_capacity} "
                "tokens; lower max_tokens or raise the KV cache (num_kv_blocks / "
                "kv_cache_memory_mb)"
            )

    def validate_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against the vocabulary, and that a
        structured-output spec compiles (compiled once per process, then cached), and n within
        max_num_seqs (each of the n sequences is scheduled like a request)."""
        if params.n > self.config.limits.max_num_seqs:
            raise ValueError(
                f"n must be at most {self.config.limits.max_num_seqs} (max_num_seqs), got "
                f"{params.n}"
            )
        vocab = self.model_config.vocab_size
        if params.max_token_id() >= vocab:
            raise ValueError(
                f"token id {params.max_token_id()} (in stop_token_ids or logit_bias) is out of "
                f"range for vocabulary size {vocab}"
            )
        if params.structured_outputs is not None:
            backend = grammar_backend(
                str(self.tokenizer_path), vocab, tuple(sorted(self.eos_token_ids))
            )
            backend.compile(*params.structured_outputs.spec)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown ids are ignored."""
        self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step on every replica; return outputs of requests that changed."""
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        self.outputs.scheduled(plan)
        result = self.runner.execute(plan)
        return self.outputs.process(plan, result)

    def maintain(self) -> None:
        """While idle: let the executor notice and heal a failure now (see StepRunner)."""
        self.runner.maintain()

    def failure_stats(self) -> dict:
        """Worker replacements per role, recovery durations (s), requests recomputed, nodes
        lost."""
        rec = self.executor.recovery
        return {
            "worker_restarts": dict(rec.restarts),
            "nodes_lost": dict(rec.nodes_lost),
            "recovery_seconds": list(rec.seconds),
            "requests_recomputed": self.requests_recomputed,
        }

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics: running/waiting requests and KV usage (mean over replicas)."""
        return {**self.scheduler.stats(), **self.executor.stage_times()}

    def shutdown(self) -> None:
        self.executor.shutdown()


def build_executor(
    config,
    model_path: Path,
    model_config: ModelConfig,
    eos_token_ids=(),
    tokenizer_dir: Path | None = None,
) -> Executor:
    """Single process when no attention workers are asked for, else the disaggregated one.
    `eos_token_ids` are where min_tokens and structured outputs need the end of a sequence;
    `tokenizer_dir` is the tokenizer grammar masks are built from (default: the model's)."""
    args = (config, model_path, model_config, eos_token_ids, tokenizer_dir)
    threads = thread_plan(config.cluster)
    if threads.given or threads.workers:  # a colocated engine keeps its process's threads
        set_torch_threads(threads.engine)  # (the core process sets all cores: core.main)
    if config.cluster.num_attention_workers <= 0 and config.cluster.num_expert_workers <= 0:
        return LocalExecutor(*args)
    return AFDExecutor(*args)
