"""DistAttention kernels: decode MicroAttention vs the memory-bandwidth floor, and ScaleReduce cost.

    python benchmarks/bench_dist_attention.py [--device cpu|cuda] [--quick]

Measured side by side in one run, medians of several repetitions:

1. Decode MicroAttention at 4K / 32K / 128K tokens of context (a few sequences, one query
   each, blocks scattered over the pool at random ids): KV bytes read per second, and that rate
   as a fraction of the bytes per second a large tensor copy reads on the same device. Decode
   attention is memory-bound, so a ratio near 1 means the kernel streams the KV cache at copy
   speed (the copy also writes what it reads, so a kernel that only reads can exceed 1).
   Next to it, torch's `scaled_dot_product_attention` on the same K/V stored contiguously
   ([S, Hkv, L, D], GQA) and the ratio MA/SDPA: the price of paging. On CPU MicroAttention is
   timed as the engine runs it per layer, with its plan (the index work, done once per step)
   built beforehand; the plan's cost is printed too. There decode MA is the native kernel reading
   the blocks in place (kernels/native_attention.py) when it could be built; the last column
   times the torch path (gather the blocks, then torch's fused kernel) in the same rounds.
2. The same decode split over 4 "instances" (the blocks dealt round-robin): the time of
   ScaleReduce merging the 4 partials, as a percentage of the 4 MicroAttention calls (the paper
   reports under 1%). The merged result is checked against one MicroAttention over all blocks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.kernels import native_attention  # noqa: E402
from infinite_llm.kernels.dist_attention import (  # noqa: E402
    BlockIndex, micro_attention, plan_micro_attention, run_micro_attention_plan, scale_reduce,
)

HQ, HKV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # one layer of a Llama-2/3-style GQA model


def timed(fn: Callable[[], object], device: str, repeats: int, inner: int = 1) -> float:
    """Median seconds of one `fn()` call over `repeats` timings of `inner` back-to-back calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def copy_read_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    """Bytes per second *read* by a large tensor copy (it writes as many)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return nbytes / timed(lambda: dst.copy_(src), device, repeats)


def decode_inputs(num_seqs: int, context: int, dtype: torch.dtype, device: str, gen: torch.Generator):
    """A pool holding `num_seqs` contexts at shuffled block ids, and one decode query per sequence."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    # Generated on the device: a 128K-token pool is gigabytes.
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, HKV, HEAD_DIM, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, HKV, HEAD_DIM, device=device).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, blocks_per_seq)
    starts = torch.arange(blocks_per_seq).repeat(num_seqs, 1) * BLOCK_SIZE
    lens = torch.full((num_seqs, blocks_per_seq), BLOCK_SIZE)
    lens[:, -1] = context - (blocks_per_seq - 1) * BLOCK_SIZE
    q = torch.randn(num_seqs, HQ, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
    cu = torch.arange(num_seqs + 1)
    q_pos = torch.full((num_seqs,), context - 1)
    return q, k_cache, v_cache, BlockIndex(cu, q_pos, tables, starts, lens).to(device)


def ma_vs_sdpa(q, k_cache, v_cache, index: BlockIndex, device: str, repeats: int,
               inner: int) -> tuple[float, float, float, float]:
    """Median seconds of (MicroAttention, its plan, SDPA on contiguous K/V, MicroAttention's torch
    path), alternating calls; on CUDA the last is the first."""
    args = (q, k_cache, v_cache, index)
    if device == "cuda":
        ma = gather = lambda: micro_attention(*args)  # noqa: E731 - the Triton kernel reads the tables itself
        t_plan = 0.0
    else:
        plan = plan_micro_attention(*args)
        with native_attention.disabled():
            gather_plan = plan_micro_attention(*args)
        ma = lambda: run_micro_attention_plan(plan, q, k_cache, v_cache)  # noqa: E731
        gather = lambda: run_micro_attention_plan(gather_plan, q, k_cache, v_cache)  # noqa: E731
        t_plan = timed(lambda: plan_micro_attention(*args), device, repeats)
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    # The same keys, in sequence order, contiguous per (sequence, KV head); the context is the
    # valid length of each row (all rows are equally long here).
    length = int(index.block_lens[0].sum())
    k = k_cache[index.block_tables].reshape(s, -1, hkv, d)[:, :length].transpose(1, 2).contiguous()
    v = v_cache[index.block_tables].reshape(s, -1, hkv, d)[:, :length].transpose(1, 2).contiguous()
    q4 = q[:, :, None, :]
    # SDPA with GQA, and SDPA with the query heads of each KV head as rows (no K/V repeat; what
    # SDPA runs without GQA): the faster of the two is the baseline.
    sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0]  # noqa: E731
    rows = lambda: F.scaled_dot_product_attention(q.view(s, hkv, hq // hkv, d), k, v).reshape(s, hq, d)  # noqa: E731
    times: dict[str, list[float]] = {"ma": [], "sdpa": [], "rows": [], "gather": []}
    for _ in range(repeats):  # alternate, so that load changes hit all alike
        for name, fn in (("ma", ma), ("sdpa", sdpa), ("rows", rows), ("gather", gather)):
            times[name].append(timed(fn, device, 1, inner))
    for out, _ in (ma(), gather()):
        for ref in (sdpa(), rows()):
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 1e-4, f"MicroAttention differs from SDPA: relative error {err:.1e}"
    best = min(statistics.median(times["sdpa"]), statistics.median(times["rows"]))
    return statistics.median(times["ma"]), t_plan, best, statistics.median(times["gather"])


def split_round_robin(index: BlockIndex, parts: int) -> list[BlockIndex]:
    """Deal every sequence's blocks round-robin over `parts` instances (same pool, for timing)."""
    return [replace(index, block_tables=index.block_tables[:, i::parts].contiguous(),
                    block_starts=index.block_starts[:, i::parts].contiguous(),
                    block_lens=index.block_lens[:, i::parts].contiguous())
            for i in range(parts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sequences (CPU in < 2 min)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="KV/query dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--partials", type=int, default=4)
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    repeats = 5 if args.quick else 11
    inner = 20 if device == "cuda" else 1
    if device == "cuda":
        cases = [(4096, 16), (32768, 8), (131072, 4)]
    elif args.quick:
        cases = [(4096, 4), (32768, 2), (131072, 1)]
    else:
        cases = [(4096, 8), (32768, 4), (131072, 2)]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    copy_bytes = (2 << 30) if device == "cuda" else (512 << 20)
    bandwidth = copy_read_bandwidth(device, copy_bytes, repeats)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; "
          f"Hq={HQ} Hkv={HKV} D={HEAD_DIM} block={BLOCK_SIZE}")
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s read (+ as much written)\n")
    header = (f"{'context':>8} {'seqs':>4} {'MA ms':>9} {'plan ms':>8} {'KV GB/s':>8} {'vs copy':>8} "
              f"{'SDPA ms':>9} {'MA/SDPA':>8} {'4xMA ms':>9} {'SR ms':>8} {'SR/MA':>7} {'merge err':>9} "
              f"{'gather MA/SDPA':>14}")
    print(header)
    print("-" * len(header))
    for context, num_seqs in cases:
        q, k_cache, v_cache, index = decode_inputs(num_seqs, context, dtype, device, gen)
        kv_bytes = 2 * num_seqs * context * HKV * HEAD_DIM * k_cache.element_size()
        full = lambda: micro_attention(q, k_cache, v_cache, index)  # noqa: E731
        t_full, t_plan, t_sdpa, t_gather = ma_vs_sdpa(q, k_cache, v_cache, index, device, repeats, inner)

        partial_calls = [
            (lambda part=part: micro_attention(q, k_cache, v_cache, part))
            for part in split_round_robin(index, args.partials)
        ]
        t_partials = timed(lambda: [call() for call in partial_calls], device, repeats, inner)
        partials = [call() for call in partial_calls]
        outs = [p[0] for p in partials]
        lses = [p[1] for p in partials]
        t_reduce = timed(lambda: scale_reduce(outs, lses), device, repeats, inner)

        merged, _ = scale_reduce(outs, lses)
        ref, _ = full()
        err = ((merged - ref).norm() / ref.norm()).item()
        print(f"{context:>8} {num_seqs:>4} {t_full * 1e3:>9.3f} {t_plan * 1e3:>8.3f} {kv_bytes / t_full / 1e9:>8.1f} "
              f"{kv_bytes / t_full / bandwidth:>8.2f} {t_sdpa * 1e3:>9.3f} {t_full / t_sdpa:>8.2f} "
              f"{t_partials * 1e3:>9.3f} {t_reduce * 1e3:>8.4f} "
              f"{100 * t_reduce / t_partials:>6.2f}% {err:>9.1e} {t_gather / t_sdpa:>14.2f}")
        del q, k_cache, v_cache, partials, outs, lses, merged, ref
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
