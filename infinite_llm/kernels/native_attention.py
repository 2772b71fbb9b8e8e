"""The CPU decode kernel and ScaleReduce (`native/paged_attention.c`), built with the host's C
compiler on first use.

Decode attention is memory-bound, and the torch path reads every cached K/V twice more than it
must (a gather copies the blocks into a contiguous buffer, which the fused kernel then reads);
this kernel reads the blocks where they lie. torch has no paged-attention operator on CPU, and
a torch C++ extension would take minutes to compile against torch's headers, so this is plain
C (no torch headers, built in about a second) called through ctypes on tensors' data pointers.

The shared object is cached per source, flags, compiler and CPU (it is built for the host's
instruction set) under the infinite_llm cache folder. Without a C compiler, or with
INFINITE_LLM_NATIVE_ATTENTION=0, `library()` is None and MicroAttention keeps the torch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("native") / "paged_attention.c"
# No -ffast-math: the kernel relies on IEEE infinities (-inf scores and log-sum-exps).
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_ENV = "INFINITE_LLM_NATIVE_ATTENTION"
_P, _I = ctypes.c_void_p, ctypes.c_int64
_enabled = os.environ.get(_ENV, "1") != "0"


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel, or None (disabled, or it could not be built here)."""
    return _load() if _enabled else None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the block with the torch path (tests compare the two)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def supports(lib: ctypes.CDLL, num_q_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes these head shapes (head dim a multiple of 8, up to 256)."""
    return bool(lib.paged_attention_supports(num_q_heads, num_kv_heads, head_dim))


def paged_attention(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    index: tuple[torch.Tensor, ...], scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Attention of the rows of q listed by `index` into out/lse (those rows only).

    index = (row_start [S], row_count [S], q_positions [T], tables, starts, lens [S, B]), int64
    and contiguous; q float32 [T, Hq, D] with contiguous heads; caches float32 contiguous."""
    tables = index[3]
    t, hq, d = q.shape
    if q.dtype != torch.float32 or k_cache.dtype != torch.float32 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("the native kernel needs float32 q and contiguous float32 caches")
    if q.stride()[1:] != (d, 1):  # rows may be strided (a view of the fused qkv), heads not
        q = q.contiguous()
    rc = lib.paged_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        *(x.data_ptr() for x in index), tables.shape[0], tables.shape[1], hq, k_cache.shape[2], d,
        k_cache.shape[1], scale, out.data_ptr(), lse.data_ptr(), torch.get_num_threads(),
    )
    if rc == -2:
        raise MemoryError("the native attention kernel ran out of memory")
    if rc != 0:
        raise ValueError(f"the native kernel does not take these sizes (q {tuple(q.shape)}, k {tuple(k_cache.shape)})")


def scale_reduce(lib: ctypes.CDLL, outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ScaleReduce of float32 partials outs [T, H, D] / lses [T, H] (validated by the caller)."""
    outs = [o.contiguous() for o in outs]
    lses = [x.contiguous() for x in lses]
    out, lse = torch.empty_like(outs[0]), torch.empty_like(lses[0])
    pointers = ctypes.c_int64 * len(outs)
    lib.scale_reduce(pointers(*(o.data_ptr() for o in outs)), pointers(*(x.data_ptr() for x in lses)), len(outs),
                     lse.numel(), out.shape[-1], out.data_ptr(), lse.data_ptr())
    return out, lse


@functools.cache
def _load() -> Optional[ctypes.CDLL]:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("native attention kernel unavailable (%s); using the torch path", exc)
        return None
    lib.paged_attention_supports.restype = ctypes.c_int
    lib.paged_attention_supports.argtypes = [_I, _I, _I]
    lib.paged_attention.restype = ctypes.c_int
    lib.paged_attention.argtypes = [_P, _I, _P, _P] + [_P] * 6 + [_I] * 6 + [ctypes.c_float, _P, _P, ctypes.c_int]
    lib.scale_reduce.restype = None
    lib.scale_reduce.argtypes = [_P, _P, _I, _I, _I, _P, _P]
    return lib


def _build() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (_SOURCE.read_text(), " ".join(_FLAGS), version, _cpu_signature()))
    ).hexdigest()[:16]
    target = _cache_dir() / f"paged_attention-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never see half a file.
    fd, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", staging, str(_SOURCE), "-lm"], capture_output=True, text=True,
                       check=True, timeout=300)
        os.replace(staging, target)
    except subprocess.CalledProcessError as exc:
        raise OSError(f"{compiler} failed: {exc.stderr.strip()[-2000:]}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
    return target


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    # The same root as the default model's cache (model.default_model), without importing it:
    # kernels sit below the model package.
    env = os.environ.get("INFINITE_LLM_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "infinite_llm") / "kernels"
