"""Decode throughput of our engine vs HF transformers `generate`, and decode step time vs the
memory-bandwidth floor, measured side by side in one run.

    python benchmarks/bench_decode.py [--model default|PATH] [--batch 8] [--prompt-len 64] [--new-tokens 64]

Both engines run the same weights in float32 on the same prompts (greedy, fixed output length).
The floor of one decode step is (weight bytes + KV bytes read) / measured copy bandwidth: a decode
step must at least stream every weight and every cached K/V once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.bench.profile import LocalRunner  # noqa: E402
from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig  # noqa: E402
from infinite_llm.control.plan import BlockRef, SeqWork  # noqa: E402
from infinite_llm.model.loader import resolve_model_path  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402


def copy_bandwidth(device: str, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write both counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def run_ours(model: str, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, list[float], list[list[int]]]:
    """Greedy decode of the batch on one instance's ModelRunner (the code an instance step runs,
    without the engine's threads around it): one prefill step, then one step per token."""
    bs = 16
    per_seq = -(-(len(prompts[0]) + new_tokens) // bs)
    config = EngineConfig(model=model, cache=CacheConfig(block_size=bs), cluster=ClusterConfig(device=device))
    local = LocalRunner(config, num_blocks=per_seq * len(prompts))
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    tables = [[BlockRef(0, s * per_seq + b) for b in range(per_seq)] for s in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    batch = [SeqWork(f"r{s}", list(p), 0, tables[s], sample=True, sampling=greedy) for s, p in enumerate(prompts)]
    step_times = []
    t0 = time.perf_counter()
    for step in range(new_tokens):
        s0 = time.perf_counter()
        results = local.execute(batch)
        if step:  # the first step is the prefill (+ first token)
            step_times.append(time.perf_counter() - s0)
        else:
            t0 = time.perf_counter()
        for s, result in enumerate(results):
            outputs[s].append(result.token_id)
        batch = [SeqWork(w.request_id, [outputs[s][-1]], w.end_pos, w.block_table, sample=True, sampling=greedy,
                         num_generated=len(outputs[s])) for s, w in enumerate(batch)]
    elapsed = time.perf_counter() - t0
    decoded = len(prompts) * (new_tokens - 1)
    return decoded / elapsed, step_times, outputs


def run_hf(model: str, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_path(model)), dtype=torch.float32).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)  # prefill + first token only
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        elapsed = time.perf_counter() - start - prefill
    decoded = len(prompts) * (new_tokens - 1)
    return decoded / elapsed, out[:, ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 256, (args.batch, args.prompt_len), generator=gen).tolist()
    ours_tps, step_times, ours_tokens = run_ours(args.model, prompts, args.new_tokens, args.device)
    hf_tps, hf_tokens = run_hf(args.model, prompts, args.new_tokens, args.device)

    from infinite_llm.model.loader import load_model_config

    cfg = load_model_config(resolve_model_path(args.model))
    weight_bytes = cfg.num_parameters() * 4
    mean_ctx = args.prompt_len + args.new_tokens / 2
    kv_bytes = args.batch * mean_ctx * cfg.kv_bytes_per_token(4)
    bandwidth = copy_bandwidth(args.device)
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    median_step = statistics.median(step_times)

    print(f"model={args.model} device={args.device} batch={args.batch} prompt={args.prompt_len} new={args.new_tokens}")
    print(f"greedy tokens identical to transformers: {ours_tokens == hf_tokens}")
    print(f"decode throughput  ours: {ours_tps:10.1f} tok/s   transformers: {hf_tps:10.1f} tok/s   "
          f"ratio ours/transformers = {ours_tps / hf_tps:.2f}")
    print(f"decode step median: {median_step * 1e3:.2f} ms; bandwidth floor "
          f"({(weight_bytes + kv_bytes) / 1e6:.1f} MB at {bandwidth / 1e9:.1f} GB/s copy bandwidth): "
          f"{floor_s * 1e3:.3f} ms; step/floor = {median_step / floor_s:.1f}x")


if __name__ == "__main__":
    main()
