"""Decode step time of our engine vs HF transformers, and vs the memory-bandwidth floor, at batch
1 and 32, and prefill throughput on a 2K-token prompt, measured side by side in one run.

    python benchmarks/bench_decode.py [--model bench|default|PATH] [--context 512] [--steps 24] [--quick]

Both sides run the same float32 weights on the same prompts of --context tokens, prefilled
first, then decode greedily. Steps alternate one by one (ours, transformers, ours, ...), so a
change in machine load hits both sides alike; a step is timed whole on both sides (ours: one
instance's `ModelRunner.execute`, scheduling-free, including sampling; transformers: one
forward with its KV cache plus the argmax), nothing is subtracted from either.

Prefill: one --prefill-len prompt, ours in chunks of --prefill-chunk tokens (the engine's default
token budget) vs one transformers forward over the whole prompt, alternating for 11 rounds
(3 with --quick): the two differ by a few percent, about what one round varies by.

The floor of a step is the bytes it must read (every weight matrix once, the batch's rows of
the embedding table, and every cached K/V of the batch once) over the measured copy bandwidth.
The default model here is `bench` (about 200 MB of weights, see bench_models.py): the built-in
default model's 12.7 MB fit in the CPU cache, so a floor computed from memory bandwidth would
mean nothing for it.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_models import ensure_bench_model  # noqa: E402

from infinite_llm.bench.profile import LocalRunner  # noqa: E402
from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, ModelConfig  # noqa: E402
from infinite_llm.control.plan import BlockRef, SeqWork  # noqa: E402
from infinite_llm.model.loader import load_model_config, resolve_model_path  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402

BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


def copy_bandwidth(device: str, nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write both counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


class Ours:
    """One instance's model runner with the batch's blocks laid out one sequence after another."""

    def __init__(self, model: str, prompts: list[list[int]], steps: int, device: str) -> None:
        per_seq = -(-(len(prompts[0]) + steps + 2) // BLOCK_SIZE)
        config = EngineConfig(model=model, cache=CacheConfig(block_size=BLOCK_SIZE), cluster=ClusterConfig(device=device))
        self.local = LocalRunner(config, num_blocks=per_seq * len(prompts))
        self.batch = [
            SeqWork(f"r{s}", list(p), 0, [BlockRef(0, s * per_seq + b) for b in range(per_seq)], sample=True,
                    sampling=GREEDY)
            for s, p in enumerate(prompts)
        ]
        self.tokens: list[list[int]] = [[] for _ in prompts]

    def step(self) -> None:
        """The first call prefills the prompts (and samples the first tokens); then one decode step."""
        results = self.local.execute(self.batch)
        for s, result in enumerate(results):
            self.tokens[s].append(result.token_id)
        self.batch = [SeqWork(w.request_id, [self.tokens[s][-1]], w.end_pos, w.block_table, sample=True,
                              sampling=GREEDY, num_generated=len(self.tokens[s])) for s, w in enumerate(self.batch)]


class Transformers:
    """HF's model with its own KV cache, stepped by hand: one forward + argmax per step."""

    def __init__(self, model: str, prompts: list[list[int]], device: str) -> None:
        self.model = hf_model(model, device)
        self.next_input = torch.tensor(prompts, device=device)
        self.cache = None
        self.tokens: list[list[int]] = [[] for _ in prompts]

    @torch.inference_mode()
    def step(self) -> None:
        out = self.model(input_ids=self.next_input, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        next_tokens = out.logits[:, -1].argmax(dim=-1)
        for s, token in enumerate(next_tokens.tolist()):
            self.tokens[s].append(token)
        self.next_input = next_tokens[:, None]


@functools.cache
def hf_model(model: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = str(resolve_model_path(model))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def prefill_compare(model: str, length: int, chunk: int, rounds: int, device: str,
                    gen: torch.Generator) -> tuple[float, float]:
    """Median seconds to prefill one prompt (and sample its first token): ours, transformers."""
    prompt = torch.randint(3, 256, (length,), generator=gen).tolist()
    config = EngineConfig(model=model, cache=CacheConfig(block_size=BLOCK_SIZE), cluster=ClusterConfig(device=device))
    local = LocalRunner(config, num_blocks=-(-length // BLOCK_SIZE))
    table = [BlockRef(0, b) for b in range(local.cache.num_blocks)]
    hf = hf_model(model, device)

    def ours() -> None:
        for start in range(0, length, chunk):
            local.execute([SeqWork("p", prompt[start : start + chunk], start, table, sample=start + chunk >= length,
                                   sampling=GREEDY)])

    @torch.inference_mode()
    def theirs() -> None:
        hf(input_ids=torch.tensor([prompt], device=device), use_cache=True).logits[:, -1].argmax(dim=-1).tolist()

    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for i in range(rounds + 1):
        pair = [("ours", ours), ("hf", theirs)]
        for name, fn in pair if i % 2 == 0 else reversed(pair):
            t0 = time.perf_counter()
            fn()
            if i:  # round 0 warms both up
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["ours"]), statistics.median(times["hf"])


def step_bytes(cfg: ModelConfig, batch: int, context: int) -> float:
    """Bytes a decode step must read: weights (only the batch's embedding rows), cached K/V."""
    embedding = cfg.vocab_size * cfg.hidden_size
    weights = (cfg.num_parameters() - embedding + batch * cfg.hidden_size) * 4
    if cfg.tie_word_embeddings:  # the table is read whole as the LM head
        weights += embedding * 4
    return weights + batch * context * cfg.kv_bytes_per_token(4)


def compare(model: str, batch: int, context: int, steps: int, device: str, gen: torch.Generator) -> dict:
    prompts = torch.randint(3, 256, (batch, context), generator=gen).tolist()
    ours, hf = Ours(model, prompts, steps, device), Transformers(model, prompts, device)
    ours.step()
    hf.step()  # the prefills, untimed
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for i in range(steps):
        pair = [("ours", ours), ("hf", hf)]
        for name, side in pair if i % 2 == 0 else reversed(pair):
            t0 = time.perf_counter()
            side.step()
            times[name].append(time.perf_counter() - t0)
    return {
        "ours": statistics.median(times["ours"][1:]), "hf": statistics.median(times["hf"][1:]),
        "identical": ours.tokens == hf.tokens, "mean_context": context + steps / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench (200 MB, built locally), default, or a folder")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24, help="decode steps per side (alternating)")
    parser.add_argument("--quick", action="store_true", help="8 steps per side")
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = str(ensure_bench_model()) if args.model == "bench" else args.model
    steps = 8 if args.quick else args.steps
    cfg = load_model_config(resolve_model_path(model))
    bandwidth = copy_bandwidth(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"model {args.model}: {cfg.num_parameters() * 4 / 1e6:.0f} MB float32, context {args.context}, "
          f"{steps} alternating steps per side, {torch.get_num_threads()} threads, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    for batch in (int(b) for b in args.batches.split(",")):
        r = compare(model, batch, args.context, steps, args.device, gen)
        floor = step_bytes(cfg, batch, int(r["mean_context"])) / bandwidth
        print(f"batch {batch:>3}: step ours {r['ours'] * 1e3:7.2f} ms, transformers {r['hf'] * 1e3:7.2f} ms, "
              f"floor {floor * 1e3:6.2f} ms | ours/transformers = {r['ours'] / r['hf']:.2f}, "
              f"ours/floor = {r['ours'] / floor:.2f}, transformers/floor = {r['hf'] / floor:.2f} | "
              f"greedy tokens identical: {r['identical']}")
    ours, hf = prefill_compare(model, args.prefill_len, args.prefill_chunk, 3 if args.quick else 11, args.device, gen)
    print(f"prefill {args.prefill_len} tokens (ours in chunks of {args.prefill_chunk}): ours "
          f"{args.prefill_len / ours:8.0f} tok/s, transformers {args.prefill_len / hf:8.0f} tok/s | "
          f"ours/transformers throughput = {hf / ours:.2f}")


if __name__ == "__main__":
    main()
