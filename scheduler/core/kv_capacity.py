"""How many KV blocks a cache gets: the count asked for, or what the memory budget leaves after
the weights. Every executor sizes its caches with it."""

from __future__ import annotations

import os

from afd.config import ModelConfig


def num_kv_blocks_for(config, model_config: ModelConfig, dtype, model_path=None) -> int:
    """KV blocks per cache: num_kv_blocks when given, else what gpu_memory_utilization leaves
    after the weights (see kv_memory_from_utilization), else kv_cache_memory_mb worth."""
    from afd.models import kv_cache_bytes_per_block

    cache = config.cache
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = kv_cache_bytes_per_block(model_config, cache.block_size, dtype)
    if cache.gpu_memory_utilization is not None and model_path is not None:
        kv_bytes = kv_memory_from_utilization(config, model_path, dtype)
        blocks = kv_bytes // per_block
        if blocks < 1:
            raise ValueError(
                f"--gpu-memory-utilization {cache.gpu_memory_utilization} leaves no memory for "
                f"the KV cache after the weights; raise it (or give --num-kv-blocks)"
            )
        return int(blocks)
    return max(1, cache.kv_cache_memory_mb * 2**20 // per_block)


def available_memory_bytes(device: str) -> int:
    """What a fraction of memory is taken of: one GPU's total memory, or on CPU the RAM that
    is available now (MemAvailable), shared by every worker of the node."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_memory_from_utilization(config, model_path, dtype) -> int:
    """Bytes of one KV cache under gpu_memory_utilization: the fraction of memory, less the
    weights that share it, over the caches that share it. On a GPU each worker has its own:
    an attention worker holds the non-expert weights, a prefill worker (and the single
    process) the whole model. On CPU every worker of the node shares the RAM: attention and
    prefill workers each hold the non-expert weights, the expert workers one copy of the
    experts between them, and each prefill worker another."""
    from afd.loader import checkpoint_numel

    util, device = config.cache.gpu_memory_utilization, config.cluster.device
    experts, rest = checkpoint_numel(model_path)
    size = dtype.itemsize if hasattr(dtype, "itemsize") else 4
    budget = util * available_memory_bytes(device)
    a, p = config.cluster.num_attention_workers, config.cluster.num_prefill_workers
    if a <= 0:  # the single process: the whole model and one cache
        return max(0, int(budget - (experts + rest) * size))
    if device == "cuda":
        weights = (experts + rest) if p else rest
        return max(0, int(budget - weights * size))
    weights = ((a + p) * rest + (1 + p) * experts) * size
    return max(0, int((budget - weights) / (a + p)))
