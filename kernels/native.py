"""Native CPU kernels: kernels/csrc/*.c built with gcc on first use, cached, loaded with ctypes.

The library is built once per source, compiler and CPU (`$AFD_CACHE_DIR/kernels/<hash>.so`,
written atomically so that processes starting together do not race) and only when a kernel is
first called: importing afd compiles nothing. No compiler, a failed build, an unsupported input
(dtype, layout) or AFD_NATIVE_KERNELS=0 -> None, and the caller runs its torch path; each
reason is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("afd.kernels.native")

_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "moe.c", _CSRC / "attention.c")  # one library
HEADERS = (_CSRC / "vexp.h",)
COMPILER = os.environ.get("AFD_CC", "gcc")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# The top-k a token may have (moe.c sorts a token's slots in a fixed-size array).
MAX_TOP_K = 64

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library or None once tried; "build_s": build seconds
_logged: set[str] = set()
_enabled = True  # set_enabled (the engine's --no-native-kernels)


def set_enabled(on: bool) -> None:
    """Turn the native kernels on or off for this process (AFD_NATIVE_KERNELS=0 still wins)."""
    global _enabled
    _enabled = on


@contextlib.contextmanager
def disabled():
    """The native kernels off inside the block (for this process; not thread-safe)."""
    before = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


def enabled() -> bool:
    """False after set_enabled(False) or with AFD_NATIVE_KERNELS=0 (read at each call, so a test
    or bench can flip it)."""
    return _enabled and os.environ.get("AFD_NATIVE_KERNELS", "1") != "0"


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("native CPU kernels: %s; the torch path runs instead", reason)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _library_path(compiler: str) -> Path:
    """Cache path keyed by the source, the compiler's version, its flags and the CPU's flags."""
    from afd.cache import cache_dir

    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    key = hashlib.sha256()
    for part in (
        *(src.read_bytes() for src in (*SOURCES, *HEADERS)),
        version.encode(),
        " ".join(CFLAGS).encode(),
    ):
        key.update(part)
    key.update(_cpu_flags().encode())
    return cache_dir() / "kernels" / f"afd-{key.hexdigest()[:20]}.so"


def build() -> Path:
    """Compile the library into the cache unless it is there; returns its path (raises
    RuntimeError with the compiler's message when that fails)."""
    compiler = shutil.which(COMPILER)
    if compiler is None:
        raise RuntimeError(f"no C compiler {COMPILER!r} on PATH")
    path = _library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [compiler, *CFLAGS, "-o", tmp, *map(str, SOURCES), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{COMPILER} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent build of the same source writes the same
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _state["build_s"] = time.perf_counter() - start
    logger.info("native CPU kernels built in %.1f s: %s", _state["build_s"], path)
    return path


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.afd_moe_pack.argtypes = [ptr, ptr, i64, i64, i64]
    lib.afd_moe_pack.restype = None
    lib.afd_fused_moe_f32.argtypes = [ptr] * 6 + [i64] * 5 + [ctypes.c_int]
    lib.afd_fused_moe_f32.restype = ctypes.c_int
    lib.afd_moe_panel.argtypes = []
    lib.afd_moe_panel.restype = ctypes.c_int
    lib.panel = lib.afd_moe_panel()  # output columns per packed panel (vector width x 2 or 4)
    lib.afd_paged_decode_f32.argtypes = [ptr] * 6 + [i64] + [ptr] * 2 + [i64] * 6
    lib.afd_paged_decode_f32.argtypes += [ctypes.c_float, ctypes.c_int]
    lib.afd_paged_decode_f32.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, built on the first call; None (reason logged once) when disabled or
    when it cannot be built or loaded."""
    if not enabled():
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"] = _declare(ctypes.CDLL(str(build())))
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _state["lib"] = None
                    _log_once(f"could not build or load the native kernels ({e})")
    return _state["lib"]


def _library_unless(reason: str | None) -> ctypes.CDLL | None:
    """The library for a kernel call, or None where `reason` says the inputs do not apply
    (logged once) or the library is unavailable."""
    if reason is not None:
        _log_once(reason)
        return None
    return library()


def available() -> bool:
    """True when the library is enabled and builds (building it now if needed)."""
    return library() is not None


def _pack(lib: ctypes.CDLL, w: torch.Tensor) -> torch.Tensor:
    """w [B, N, Kd] -> [B, ceil(N / PW), Kd, PW] panels, the layout moe.c's GEMMs read."""
    b, n, kd = w.shape
    out = torch.empty(b, -(-n // lib.panel), kd, lib.panel, dtype=torch.float32)
    lib.afd_moe_pack(w.data_ptr(), out.data_ptr(), b, n, kd)
    return out


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return 0


def _packed(lib: ctypes.CDLL, w13: torch.Tensor, w2: torch.Tensor) -> tuple:
    """w13 and w2 packed, kept on w13 itself (freed with it) until either is written to."""
    key = (w13.data_ptr(), _version(w13), w2.data_ptr(), _version(w2))
    cached = getattr(w13, "_afd_native_pack", None)
    if cached is None or cached[0] != key:
        e, two_inter, hidden = w13.shape
        cached = (key, _pack(lib, w13.view(2 * e, two_inter // 2, hidden)), _pack(lib, w2))
        w13._afd_native_pack = cached
    return cached[1], cached[2]


def _unsupported(x, w13, w2, topk_weights, topk_ids) -> str | None:
    tensors = (x, w13, w2, topk_weights, topk_ids)
    if any(t.device.type != "cpu" for t in tensors):
        return "non-CPU tensors"
    if any(t.dtype != torch.float32 for t in (x, w13, w2)):
        return f"{x.dtype} activations or weights (fp32 only)"
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        return "activations or weights of unexpected rank"
    if not all(t.is_contiguous() for t in (x, w13, w2)):
        return "non-contiguous activations or weights"
    if topk_ids.is_floating_point() or topk_ids.dim() != 2 or topk_ids.shape[1] > MAX_TOP_K:
        return f"top-k ids of dtype {topk_ids.dtype} and shape {tuple(topk_ids.shape)}"
    return None


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]; ids < 0 or >= E are skipped
) -> torch.Tensor | None:
    """torch_ops.fused_moe in native code for fp32 CPU tensors; None where it does not apply
    (the reason logged once)."""
    lib = _library_unless(_unsupported(x, w13, w2, topk_weights, topk_ids))
    if lib is None:
        return None
    w13p, w2p = _packed(lib, w13, w2)
    tokens, top_k = topk_ids.shape
    experts, two_inter, hidden = w13.shape
    weights = topk_weights.to(torch.float32).contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    out = torch.empty_like(x)
    rc = lib.afd_fused_moe_f32(
        x.data_ptr(), w13p.data_ptr(), w2p.data_ptr(), weights.data_ptr(), ids.data_ptr(),
        out.data_ptr(), tokens, hidden, two_inter // 2, experts, top_k, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        _log_once("out of memory for the MoE buffers")
        return None
    return out


def _decode_unsupported(q, k_cache, v_cache, block_tables, seq_lens) -> str | None:
    if any(t.device.type != "cpu" for t in (q, k_cache, v_cache)):
        return "non-CPU tensors"
    if any(t.dtype != torch.float32 for t in (q, k_cache, v_cache)):
        return f"{q.dtype} queries or {k_cache.dtype} caches (fp32 only)"
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4 or not q.is_contiguous():
        return "decode queries or caches of unexpected rank or layout"
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.shape[1] % k_cache.shape[2]:
        return "caches with strided heads or query heads not a multiple of the KV heads"
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        return "block tables or lengths not int32"
    return None


def paged_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D] (any strides but the last)
    v_cache: torch.Tensor,  # [N, bs, Hkv, Dv]
    block_tables: torch.Tensor,  # [B, M] int32
    seq_lens: torch.Tensor,  # [B] int32, each >= 1
    scale: float,
) -> torch.Tensor | None:
    """torch_ops.paged_decode_attention in native code (the pages read in place) for fp32 CPU
    tensors; None where it does not apply (the reason logged once)."""
    lib = _library_unless(_decode_unsupported(q, k_cache, v_cache, block_tables, seq_lens))
    if lib is None:
        return None
    n, hq, d = q.shape
    tables, lens = block_tables.contiguous(), seq_lens.contiguous()
    kstr = torch.tensor(k_cache.stride()[:3], dtype=torch.int64)
    vstr = torch.tensor(v_cache.stride()[:3], dtype=torch.int64)
    out = q.new_empty(n, hq, v_cache.shape[-1])
    rc = lib.afd_paged_decode_f32(
        q.data_ptr(), k_cache.data_ptr(), kstr.data_ptr(), v_cache.data_ptr(), vstr.data_ptr(),
        tables.data_ptr(), tables.shape[1], lens.data_ptr(), out.data_ptr(), n, hq,
        k_cache.shape[2], d, v_cache.shape[-1], k_cache.shape[1], scale, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        _log_once("out of memory for the attention buffers")
        return None
    return out


def fused_moe_or_raise(*args: torch.Tensor) -> torch.Tensor:
    """fused_moe that raises where it would fall back (what `afd bench kernels` times)."""
    out = fused_moe(*args)
    if out is None:
        raise RuntimeError("the native fused_moe does not apply to these inputs")
    return out
