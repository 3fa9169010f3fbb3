"""Prefill worker: the full model and its own KV cache; runs prompts (chunked, prefix-cached by
the scheduler), samples the first token, and ships the prompt's KV to an attention worker."""

from __future__ import annotations

import torch
from afd.attention_nodes.kv_transfer import send_kv
from afd.attention_nodes.worker import build_micro_batch, entry_prompt_logprobs, sample_entries
from afd.comm.control import WorkerChannel, init_world

from afd.loader import count_parameter_bytes, load_model
from afd.models import allocate_kv_cache
from afd.sampling.sampler import Sampler
from afd.timing import StageClock


def run_prefill_worker(spec: dict) -> None:
    channel = WorkerChannel(spec, "prefill")
    try:
        torch.set_num_threads(spec.get("threads", 1))
        device = torch.device(spec["device"])
        init_world(spec)
        model = load_model(spec["model_path"], dtype=spec["dtype"], device=device, part="full",
                           quantization=spec["quantization"])  # fmt: skip
        dtype = getattr(torch, spec["dtype"])  # (FP8 layers hold other dtypes)
        caches = allocate_kv_cache(
            model.config, spec["num_kv_blocks"], spec["block_size"], dtype, device
        )
        sampler = Sampler(spec.get("eos_token_ids", ()), spec["model_path"])
        channel.send("ready", role="prefill", param_bytes=count_parameter_bytes(model))
        while True:
            msg = channel.recv()
            if msg["type"] == "shutdown":
                break
            clock = StageClock(msg["trace"], device)
            t0 = clock.now()
            sends = [send_kv(caches, blocks, dst, seq_id) for seq_id, dst, blocks in msg["exports"]]
            sampled, prompt_logprobs = [], []
            if msg["micro_batches"]:
                mb = build_micro_batch(msg["micro_batches"][0], spec["block_size"], device)
                with torch.inference_mode():
                    hidden = model(mb.input_ids, mb.positions, mb.meta, caches)
                    if mb.prompt_entries:
                        prompt_logprobs = entry_prompt_logprobs(model, sampler, mb, hidden)
                    if mb.sample_entries:
                        # no sampler state is kept here: each entry brings its history
                        sampled = sample_entries(
                            model, sampler, {}, mb.sample_entries, hidden[mb.sample_rows], {}
                        )
            for work, _ in sends:
                work.wait()
            clock.record("prefill", "prefill", t0, clock.now())
            channel.send("prefill_result", step=msg["step"], sampled=sampled,
                         prompt_logprobs=prompt_logprobs, times=clock.times,
                         events=clock.events)  # fmt: skip
    except BaseException as e:
        channel.report_error(e)
        raise SystemExit(1) from None
    finally:
        channel.close()
