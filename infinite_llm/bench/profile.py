"""Profile the real model on this hardware and fit the step-time `PerfModel`.

`infinite-llm profile [engine args] [--batch-sizes 1,4,16] [--context-lens 64,512,2048,8192]
[--prefill-chunks 32,128] [--repeats 7] [--torch-threads 1] [--output results/perf_model.json]`

The scheduler's rebalancer needs to know how a step's time splits into a part that grows with
the batch (non-attention layers: weights are read once per step, FLOPs grow with tokens) and a
part that grows with the KV tokens the attention reads. We measure it directly: synthetic
batches of `SeqWork` are handed to one instance's own `ModelRunner` (the code path an
`InstanceEngine` step runs), one grid point at a time, with every block on that instance (the
perf model describes one instance's step). Each grid point is a batch of
`batch_size` sequences, each computing `chunk` new tokens on top of a context of
`context_len` tokens: decode steps over several context lengths and first-chunk prefill steps
(see `make_grid`), so the number of sequences, new tokens and KV tokens read vary
independently and the linear fit can tell them apart. The KV content is whatever the pool
holds (zeros): attention cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from infinite_llm.bench.cli_common import ensure_parent_dir, positive_int_list
from infinite_llm.config import EngineConfig
from infinite_llm.control.perf_model import PerfModel, ProfileSample
from infinite_llm.control.plan import BlockRef, SampleResult, SeqWork
from infinite_llm.sampling import SamplingParams

if TYPE_CHECKING:
    from infinite_llm.instance.runner import ModelRunner

DEFAULT_OUTPUT = "results/perf_model.json"
DEFAULT_BATCH_SIZES = (1, 4, 16)
DEFAULT_CONTEXT_LENS = (64, 512, 2048, 8192)
DEFAULT_PREFILL_CHUNKS = (32, 128)


@dataclass(frozen=True)
class GridPoint:
    """One profiled step shape: `batch_size` sequences, each adding `chunk` tokens to a context
    that ends at `context_len` tokens (so `chunk <= context_len`)."""

    batch_size: int
    chunk: int
    context_len: int

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk < 1 or self.context_len < 1:
            raise ValueError(f"grid point values must be >= 1, got {self}")
        if self.chunk > self.context_len:
            raise ValueError(f"chunk ({self.chunk}) cannot exceed context_len ({self.context_len})")

    @property
    def num_tokens(self) -> int:
        return self.batch_size * self.chunk

    @property
    def kv_tokens(self) -> int:
        # Every sequence's attention reads its whole context, the new chunk included.
        return self.batch_size * self.context_len


@dataclass
class FitQuality:
    """How well the fitted model predicts the measured step times."""

    r_squared: float
    mean_abs_rel_error: float
    max_abs_rel_error: float


def set_cpu_threads(num_threads: int, device: str) -> None:
    """Pin torch's intra-op threads for a CPU run (0: keep torch's default).

    Why: the local backend runs the instances as threads of one process, and each of them uses
    torch's intra-op thread pool; on a small CPU box those multiply, and with any other load on
    the machine OpenMP's barriers then stretch identical steps 10-50x (measured on the 2-core
    dev box: a 4-sequence decode step took 12 ms with 1 thread and 640 ms with 2). Timings taken
    that way say nothing about the policies, so the benchmarks default to 1 thread per op.
    """
    if num_threads < 0:
        raise ValueError(f"--torch-threads must be >= 0, got {num_threads}")
    if num_threads and device.startswith("cpu"):
        import torch

        torch.set_num_threads(num_threads)


def make_grid(
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    context_lens: Sequence[int] = DEFAULT_CONTEXT_LENS,
    prefill_chunks: Sequence[int] = DEFAULT_PREFILL_CHUNKS,
    max_tokens_per_step: Optional[int] = None,
) -> list[GridPoint]:
    """Decode steps (one new token per sequence) for every batch size and context length, plus
    first-chunk prefill steps (a fresh prompt of `chunk` tokens per sequence) for every batch size
    and chunk; shapes over the engine's per-step token budget are left out.

    Why these two families: the perf model's attention term is linear in KV tokens read, which
    is exact for decode (one query per sequence). A prefill chunk of c tokens over a long context
    costs c times more per KV token, a term the model does not have; a first chunk keeps that
    part small while it pins down the per-token (non-attention) slope.
    """
    for name, values in (("batch_sizes", batch_sizes), ("context_lens", context_lens),
                         ("prefill_chunks", prefill_chunks)):
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be positive integers, got {list(values)}")
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty")
    shapes = [(b, 1, ctx) for b in batch_sizes for ctx in context_lens]
    shapes += [(b, c, c) for b in batch_sizes for c in prefill_chunks]
    grid = []
    for b, c, ctx in shapes:
        if max_tokens_per_step is not None and b * c > max_tokens_per_step:
            continue
        point = GridPoint(b, c, ctx)
        if point not in grid:
            grid.append(point)
    if len(grid) < 4:
        raise ValueError(
            f"the profile grid has {len(grid)} usable points; at least 4 are needed to fit the "
            "four coefficients of the perf model (add batch sizes, context lengths or prefill chunks)"
        )
    return grid


def build_batch(point: GridPoint, block_size: int, instance: int = 0) -> list[SeqWork]:
    """One step's batch for a grid point, all blocks on `instance`, distinct blocks per sequence
    (so attention really streams `kv_tokens` tokens of KV, not one cached block many times)."""
    blocks_per_seq = math.ceil(point.context_len / block_size)
    start = point.context_len - point.chunk
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    batch = []
    for s in range(point.batch_size):
        first = s * blocks_per_seq
        batch.append(
            SeqWork(
                request_id=f"profile-{s}",
                # Token ids do not change the cost; a fixed small id is valid in every vocab.
                token_ids=[1] * point.chunk,
                start_pos=start,
                block_table=[BlockRef(instance, first + b) for b in range(blocks_per_seq)],
                sample=True,  # real steps sample every decode and last prefill chunk
                sampling=greedy,
            )
        )
    return batch


def blocks_needed(grid: Sequence[GridPoint], block_size: int) -> int:
    return max(p.batch_size * math.ceil(p.context_len / block_size) for p in grid)


def time_step(execute: Callable[[list[SeqWork]], object], batch: list[SeqWork], warmup: int, repeats: int) -> float:
    """Median wall time of `repeats` executions after `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        execute(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        execute(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fit_quality(model: PerfModel, samples: Sequence[ProfileSample]) -> FitQuality:
    measured = [s.step_time_s for s in samples]
    predicted = [model.predict(s) for s in samples]
    mean = statistics.fmean(measured)
    ss_tot = sum((m - mean) ** 2 for m in measured)
    ss_res = sum((m - p) ** 2 for m, p in zip(measured, predicted))
    rel = [abs(p - m) / m for m, p in zip(measured, predicted) if m > 0]
    return FitQuality(
        r_squared=1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        mean_abs_rel_error=statistics.fmean(rel) if rel else 0.0,
        max_abs_rel_error=max(rel) if rel else 0.0,
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def fit_profile(samples: Sequence[ProfileSample], engine_config: EngineConfig) -> PerfModel:
    """Fit the perf model and record what was profiled (saved with the model)."""
    model = PerfModel.fit(samples, source="profile")
    model.metadata.update({
        "model": engine_config.model,
        "device": engine_config.cluster.device,
        "backend": engine_config.cluster.backend,
        "dtype": engine_config.cache.dtype,
        "block_size": engine_config.cache.block_size,
        "torch_threads": torch_threads(),
    })
    return model


def profile_config(engine_config: EngineConfig, grid: Sequence[GridPoint]) -> EngineConfig:
    """The engine settings used for profiling: the user's model, dtype, device and backend, one
    instance, and a KV pool just big enough for the largest grid point."""
    config = copy.deepcopy(engine_config)
    config.model_config = None
    config.cluster.num_instances = 1
    config.cluster.placement = "static"
    config.cluster.perf_model_path = None  # the model being profiled must not need a profile
    config.cache.num_blocks_per_instance = blocks_needed(grid, config.cache.block_size)
    return config


def _no_remote_send(dst: int, message: object) -> None:
    # Every block of a profiled batch is on the runner's own instance: nothing is ever shipped.
    raise RuntimeError(f"the profiler's runner has no peers (tried to send {type(message).__name__} to {dst})")


class LocalRunner:
    """One instance's model runner and KV pool, outside any engine: what an `InstanceEngine`
    step executes, with no scheduler, peers or threads around it (for profiling and kernels
    benchmarks). Every block a batch names must be on instance 0."""

    def __init__(self, engine_config: EngineConfig, num_blocks: int) -> None:
        import torch

        from infinite_llm.instance.attention import PartialMailbox
        from infinite_llm.instance.kv_cache import PagedKVCache
        from infinite_llm.instance.runner import ModelRunner
        from infinite_llm.model.loader import load_model

        device = engine_config.cluster.device
        dtype = engine_config.cache.dtype if engine_config.cache.dtype != "auto" else None
        self.model_config, self.model = load_model(engine_config.model, device=device, dtype=dtype)
        cache_config = copy.deepcopy(engine_config.cache)
        cache_config.num_blocks_per_instance = num_blocks
        self.block_size = cache_config.block_size
        param_dtype = next(self.model.parameters()).dtype
        self.cache = PagedKVCache(self.model_config, cache_config, param_dtype, torch.device(device))
        self.runner: ModelRunner = ModelRunner(0, self.model, self.model_config, self.cache, torch.device(device),
                                               _no_remote_send, PartialMailbox(), seed=engine_config.seed)
        self._step = 0
        self._cuda = device.startswith("cuda")

    def execute(self, batch: list[SeqWork]) -> list[SampleResult]:
        """One step (synchronised on CUDA, so a wall-clock timing covers the kernels)."""
        self._step += 1
        results = self.runner.execute(batch, self._step)
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        return results


def collect_samples(
    engine_config: EngineConfig,
    grid: Sequence[GridPoint],
    warmup: int = 2,
    repeats: int = 7,
    progress: bool = False,
) -> list[ProfileSample]:
    """Time every grid point on one instance's model runner."""
    config = profile_config(engine_config, grid)
    local = LocalRunner(config, config.cache.num_blocks_per_instance)
    points = list(grid)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(points), desc="profile", unit="shape")
    samples = []
    for point in points:
        batch = build_batch(point, local.block_size)
        seconds = time_step(local.execute, batch, warmup, repeats)
        samples.append(ProfileSample(point.batch_size, point.num_tokens, point.kv_tokens, seconds))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return samples


def profile_engine(
    engine_config: EngineConfig,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    context_lens: Sequence[int] = DEFAULT_CONTEXT_LENS,
    prefill_chunks: Sequence[int] = DEFAULT_PREFILL_CHUNKS,
    warmup: int = 2,
    repeats: int = 7,
    output_path: Optional[str | Path] = None,
    progress: bool = False,
) -> PerfModel:
    """Profile the engine's model on this hardware and return the fitted PerfModel (also saved
    to `output_path` when given, in the format `--perf-model` loads)."""
    grid = make_grid(batch_sizes, context_lens, prefill_chunks, engine_config.scheduler.max_num_batched_tokens)
    samples = collect_samples(engine_config, grid, warmup=warmup, repeats=repeats, progress=progress)
    model = fit_profile(samples, engine_config)
    if output_path is not None:
        model.save(ensure_parent_dir(output_path))
    return model


# ---------------------------------------------------------------------------- CLI
def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profile")
    g.add_argument("--batch-sizes", type=positive_int_list, default=list(DEFAULT_BATCH_SIZES),
                   help="sequences per step to profile (comma-separated)")
    g.add_argument("--context-lens", type=positive_int_list, default=list(DEFAULT_CONTEXT_LENS),
                   help="context lengths (KV tokens read per sequence) of the decode steps")
    g.add_argument("--prefill-chunks", type=positive_int_list, default=list(DEFAULT_PREFILL_CHUNKS),
                   help="prompt lengths per sequence of the first-chunk prefill steps")
    g.add_argument("--warmup", type=int, default=2, help="untimed executions per shape")
    g.add_argument("--repeats", type=int, default=7, help="timed executions per shape (median kept)")
    g.add_argument("--output", default=DEFAULT_OUTPUT, help="where to write the fitted perf model JSON")
    g.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads on CPU (0: torch's default); use the same value "
                        "as the runs the model is for")


def main_from_args(args: argparse.Namespace) -> None:
    from infinite_llm.engine_args import engine_config_from_args

    if args.warmup < 0 or args.repeats < 1:
        raise ValueError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    config = engine_config_from_args(args)
    set_cpu_threads(args.torch_threads, config.cluster.device)
    grid = make_grid(args.batch_sizes, args.context_lens, args.prefill_chunks, config.scheduler.max_num_batched_tokens)
    started = time.perf_counter()
    samples = collect_samples(config, grid, warmup=args.warmup, repeats=args.repeats, progress=True)
    model = fit_profile(samples, config)
    path = ensure_parent_dir(args.output)
    model.save(path)
    quality = fit_quality(model, samples)

    print(f"profiled {len(samples)} step shapes in {time.perf_counter() - started:.1f} s "
          f"(model {config.model}, device {config.cluster.device}, dtype {config.cache.dtype}, "
          f"torch threads {torch_threads()})")
    print(f"{'batch':>6} {'tokens':>7} {'kv_tokens':>10} {'measured_ms':>12} {'predicted_ms':>13} {'error':>7}")
    for s in samples:
        predicted = model.predict(s)
        err = (predicted - s.step_time_s) / s.step_time_s if s.step_time_s > 0 else 0.0
        print(f"{s.batch_size:>6} {s.num_tokens:>7} {s.kv_tokens:>10} {s.step_time_s * 1e3:>12.3f} "
              f"{predicted * 1e3:>13.3f} {err:>+7.1%}")
    print("fit: step_time = t_fixed + t_per_token*tokens + t_per_seq*batch + t_per_kv_token*kv_tokens")
    print(json.dumps({
        "t_fixed": model.t_fixed, "t_per_token": model.t_per_token,
        "t_per_seq": model.t_per_seq, "t_per_kv_token": model.t_per_kv_token,
    }))
    print(f"fit quality: R^2 = {quality.r_squared:.4f}, mean |relative error| = "
          f"{quality.mean_abs_rel_error:.1%}, max = {quality.max_abs_rel_error:.1%}, "
          f"relative RMSE = {model.fit_relative_rmse:.1%}")
    print(f"wrote {path} (use it with --perf-model {path})")


__all__ = [
    "GridPoint",
    "FitQuality",
    "make_grid",
    "set_cpu_threads",
    "build_batch",
    "LocalRunner",
    "time_step",
    "collect_samples",
    "fit_quality",
    "fit_profile",
    "profile_engine",
    "add_cli_args",
    "main_from_args",
]
