"""The engine's own step, not the model runner's: decode inter-token time and a lone prompt's
time to first token through `LLM` (scheduler, pacer, instance thread, router), side by side with
transformers, and what another thread's OpenMP pool costs the instance's steps.

    python benchmarks/bench_engine_step.py [--model bench|default|PATH] [--rounds 3]
        [--context 512] [--decode 64] [--prefill-len 2048]

`bench_decode.py` times `ModelRunner.execute` on the main thread; a served request runs on an
instance's thread, scheduled and paced. Per round, alternating:
- decode: one request of --context prompt tokens generating --decode tokens; ours = (last token
  time - first token time) / (tokens - 1), transformers = median forward + argmax step with its
  KV cache; both greedy, and the tokens are compared;
- prefill: one --prefill-len prompt alone, ours = arrival to first token (alone, its chunks take
  the whole token budget), transformers = one forward over the prompt + argmax;
- pool: our decode inter-token time while another thread of the process holds an OpenMP pool
  (it ran one matmul and waits) over the same without it.

Each round builds a fresh engine, measures it, and shuts it down before transformers runs; every
torch call of this script runs on a thread that exits (like the engine's own set-up, see
infinite_llm/instance/scratch_thread.py). So each side runs with no other OpenMP pool alive in the
process; the last figure shows what one costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_decode import hf_model  # noqa: E402
from bench_models import ensure_bench_model  # noqa: E402

from infinite_llm.engine import LLM  # noqa: E402
from infinite_llm.instance.scratch_thread import run_on_scratch_thread  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402


def ours_decode(llm: LLM, prompt: list[int], n: int) -> tuple[float, list[int]]:
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
    return (out.finished_time - out.first_token_time) / (n - 1), out.output_token_ids


def hf_decode(hf: torch.nn.Module, prompt: list[int], n: int) -> tuple[float, list[int]]:
    @torch.inference_mode()
    def run() -> tuple[float, list[int]]:
        out = hf(input_ids=torch.tensor([prompt]), use_cache=True)
        tokens, steps = [int(out.logits[0, -1].argmax())], []
        for _ in range(n - 1):
            t0 = time.perf_counter()
            out = hf(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            steps.append(time.perf_counter() - t0)
        return statistics.median(steps), tokens

    return run_on_scratch_thread(run)


def ours_prefill(llm: LLM, prompt: list[int]) -> float:
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))[0]
    return out.first_token_time - out.arrival_time


def hf_prefill(hf: torch.nn.Module, prompt: list[int]) -> float:
    @torch.inference_mode()
    def run() -> float:
        t0 = time.perf_counter()
        hf(input_ids=torch.tensor([prompt]), use_cache=True).logits[:, -1].argmax(dim=-1).tolist()
        return time.perf_counter() - t0

    return run_on_scratch_thread(run)


class ForeignPool:
    """A thread that ran one matmul (so it holds an OpenMP pool) and waits until closed."""

    def __init__(self) -> None:
        self._release, ready = threading.Event(), threading.Event()

        def body() -> None:
            a = torch.randn(512, 512)
            (a @ a).sum()
            ready.set()
            self._release.wait()

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()
        ready.wait()

    def close(self) -> None:
        self._release.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench", help="bench (200 MB, built locally), default, or a folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64, help="tokens generated per decode run (>= 2)")
    parser.add_argument("--prefill-len", type=int, default=2048)
    args = parser.parse_args()
    if args.decode < 2 or args.rounds < 1:
        parser.error("--decode must be >= 2 and --rounds >= 1")
    model = str(run_on_scratch_thread(ensure_bench_model)) if args.model == "bench" else args.model
    hf = run_on_scratch_thread(lambda: hf_model(model, "cpu"))
    gen = torch.Generator().manual_seed(0)
    decode_prompt = torch.randint(3, 256, (args.context,), generator=gen).tolist()
    prefill_prompts = [torch.randint(3, 256, (args.prefill_len,), generator=gen).tolist() for _ in range(args.rounds)]
    times: dict[str, list[float]] = {k: [] for k in ("ours_decode", "hf_decode", "ours_prefill", "hf_prefill",
                                                     "pool_off", "pool_on")}
    tokens: dict[str, list[int]] = {}

    def ours(i: int) -> None:
        # A fresh engine per round, shut down before transformers runs: its instance thread's pool
        # would otherwise slow transformers' thread just as a foreign pool slows ours.
        llm = LLM(model)
        try:
            ours_decode(llm, decode_prompt, 4)  # warm-up
            step, tokens["ours"] = ours_decode(llm, decode_prompt, args.decode)
            times["ours_decode"].append(step)
            times["ours_prefill"].append(ours_prefill(llm, prefill_prompts[i]))
            times["pool_off"].append(ours_decode(llm, decode_prompt, args.decode)[0])
            pool = ForeignPool()
            try:
                times["pool_on"].append(ours_decode(llm, decode_prompt, args.decode)[0])
            finally:
                pool.close()
        finally:
            llm.shutdown()

    def theirs(i: int) -> None:
        hf_decode(hf, decode_prompt, 4)  # warm-up
        step, tokens["hf"] = hf_decode(hf, decode_prompt, args.decode)
        times["hf_decode"].append(step)
        times["hf_prefill"].append(hf_prefill(hf, prefill_prompts[i]))

    identical = True
    for i in range(args.rounds):
        for side in (ours, theirs) if i % 2 == 0 else (theirs, ours):
            side(i)
        identical &= tokens["ours"] == tokens["hf"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}, {torch.get_num_threads()} threads, {args.rounds} alternating rounds (medians)")
    print(f"decode, batch 1, context {args.context}: ours {med['ours_decode'] * 1e3:.2f} ms per token through the "
          f"engine, transformers {med['hf_decode'] * 1e3:.2f} ms per step | ours/transformers = "
          f"{med['ours_decode'] / med['hf_decode']:.2f} | greedy tokens identical: {identical}")
    print(f"prefill {args.prefill_len} tokens alone: ours {med['ours_prefill'] * 1e3:.0f} ms to the first token "
          f"(whole-budget chunks), transformers "
          f"{med['hf_prefill'] * 1e3:.0f} ms | ours/transformers throughput = "
          f"{med['hf_prefill'] / med['ours_prefill']:.2f}")
    print(f"another thread holding an OpenMP pool: our decode {med['pool_on'] * 1e3:.2f} vs "
          f"{med['pool_off'] * 1e3:.2f} ms per token without | with/without = "
          f"{med['pool_on'] / med['pool_off']:.2f}")


if __name__ == "__main__":
    main()
