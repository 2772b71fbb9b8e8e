"""Host time per generated token of detokenization: full decode every step vs incremental.

    python benchmarks/bench_detokenize.py [--lengths 100 10000] [--repeats 5]

"full decode" is the engine's original `_Detokenizer` (copied here as the baseline): it decodes
the whole output after every token, so its cost per token grows with the output (O(n^2) per
request). "incremental" is `infinite_llm.detokenizer.IncrementalDetokenizer`, which decodes a
few recent tokens per step. Both get one token per step, with one stop string that never
matches (so the stop-string scan runs too), on the built-in tokenizer; their texts must agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from infinite_llm.detokenizer import IncrementalDetokenizer  # noqa: E402
from infinite_llm.model.loader import resolve_model_path  # noqa: E402
from infinite_llm.sampling import SamplingParams  # noqa: E402
from infinite_llm.tokenizer import load_tokenizer  # noqa: E402

_TEXT = ("Once upon a time there was a little girl who lived near the forest. Grüße, café, 東京 🎉. "
         "What is the capital of France? The capital of France is Paris.\n")


class FullDecodeDetokenizer:
    """The engine's original `_Detokenizer`, verbatim apart from the name: the baseline."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""

    def update(self, output_ids: list[int]) -> Optional[str]:
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        while text.endswith("\ufffd"):
            text = text[:-1]
        scan_from = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0))
        self.text = text
        for stop in self.params.stop:
            at = text.find(stop, scan_from)
            if at != -1:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.text = text[:end]
                return stop
        return None


def run_full(tokenizer, ids: list[int], params: SamplingParams) -> str:
    detok, output = FullDecodeDetokenizer(tokenizer, params), []
    for token in ids:
        output.append(token)  # the engine passes the request's growing id list, no copy
        detok.update(output)
    return detok.text


def run_incremental(tokenizer, ids: list[int], params: SamplingParams) -> str:
    detok = IncrementalDetokenizer(tokenizer, params)
    for token in ids:
        detok.update([token])
    detok.flush()
    return detok.text


def per_token_us(run: Callable[[], str], num_tokens: int, repeats: int) -> tuple[float, str]:
    best, text = float("inf"), ""
    for _ in range(repeats):
        started = time.perf_counter()
        text = run()
        best = min(best, time.perf_counter() - started)
    return best / num_tokens * 1e6, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 10_000], help="output lengths, tokens")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs (the machine may be busy)")
    args = parser.parse_args()

    tokenizer = load_tokenizer(resolve_model_path("default"))
    longest = max(args.lengths)
    ids = tokenizer.encode(_TEXT * (longest // 10 + 1), add_special_tokens=False)[:longest]
    params = SamplingParams(stop=["\nUser:"])
    results: dict[str, list[float]] = {"full decode": [], "incremental": []}
    for n in args.lengths:
        full_us, full_text = per_token_us(lambda: run_full(tokenizer, ids[:n], params), n, args.repeats)
        inc_us, inc_text = per_token_us(lambda: run_incremental(tokenizer, ids[:n], params), n, args.repeats)
        if inc_text != full_text:
            raise SystemExit(f"the detokenizers disagree at length {n}")
        results["full decode"].append(full_us)
        results["incremental"].append(inc_us)

    header = "".join(f"{f'{n:,} tokens':>16}" for n in args.lengths)
    print(f"host time per token (us), best of {args.repeats}")
    print(f"{'':<14}{header}{'last/first':>14}")
    for name, values in results.items():
        row = "".join(f"{v:>16.2f}" for v in values)
        print(f"{name:<14}{row}{values[-1] / values[0]:>13.1f}x")


if __name__ == "__main__":
    main()
