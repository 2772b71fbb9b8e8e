"""`infinite-llm bench serve`: a load generator for a running OpenAI-compatible server.

Requests come from a seeded workload trace (`infinite_llm.bench.workloads`): each trace entry
is sent at its arrival time (Poisson or gamma arrivals at `--request-rate`; inf sends all at
once) to /v1/completions with streaming on, so the client sees every token arrive. Prompts are
random token ids of exactly the traced length (sent as a token-id list, so no tokenizer round
trip changes the length) and `ignore_eos` with `max_tokens` pins the output length.

Reported: request and token throughput, TTFT / TPOT / ITL / E2E latency (mean, median, p90,
p99), goodput under SLOs (`--goodput ttft:500 tpot:50`: requests/s that met every SLO) and
failures. Every request is bounded by `--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import httpx
import numpy as np

from infinite_llm.bench.workloads import TraceRequest, WorkloadSpec, make_trace, paper_workloads

SLO_KEYS = ("ttft", "tpot", "e2el")
PERCENTILES = (50, 90, 99)
_MAX_ERRORS_REPORTED = 10


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: Optional[str] = None  # None: the first model the server lists
    workload: str = "short"
    num_requests: int = 32
    request_rate: float = math.inf
    arrival: str = "poisson"
    burstiness: float = 1.0
    seed: int = 0
    short_range: Optional[tuple[int, int]] = None  # None: the "local" workload defaults
    long_range: Optional[tuple[int, int]] = None
    long_fraction: Optional[float] = None
    output_range: Optional[tuple[int, int]] = None
    vocab_size: Optional[int] = None  # None: ask the server's /v1/models
    min_token_id: int = 3  # keep random prompts clear of the usual special ids (pad/bos/eos)
    temperature: float = 0.0
    max_concurrency: Optional[int] = None
    timeout_s: float = 300.0
    goodput_slo_ms: dict[str, float] = field(default_factory=dict)
    show_progress: bool = True

    def workload_spec(self) -> WorkloadSpec:
        base = paper_workloads("local").get(self.workload)
        if base is None:
            raise ValueError(f"unknown workload {self.workload!r}; choose short, long or mixed")
        overrides: dict[str, Any] = dict(
            num_requests=self.num_requests, request_rate=self.request_rate, arrival=self.arrival,
            burstiness=self.burstiness, seed=self.seed,
        )
        for name in ("short_range", "long_range", "long_fraction", "output_range"):
            value = getattr(self, name)
            if value is not None:
                overrides[name] = tuple(value) if isinstance(value, (list, tuple)) else value
        return dataclasses.replace(base, **overrides)


@dataclass
class RequestResult:
    request_id: str
    prompt_len: int
    expected_output_len: int
    success: bool = False
    output_tokens: int = 0
    ttft_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: Optional[float] = None
    error: Optional[str] = None

    @property
    def tpot_s(self) -> Optional[float]:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ------------------------------------------------------------------------------ one request
async def send_request(
    client: httpx.AsyncClient, url: str, model: str, trace: TraceRequest, prompt: list[int],
    temperature: float,
) -> RequestResult:
    """Stream one completion and time its tokens. Never raises for a server-side failure."""
    result = RequestResult(trace.request_id, trace.prompt_len, trace.output_len)
    payload = {
        "model": model, "prompt": prompt, "max_tokens": trace.output_len, "temperature": temperature,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = start
    content_chunks = 0
    usage_tokens: Optional[int] = None
    done = False
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {_error_message(json.dumps(event))}"
                    return result
                now = time.perf_counter()
                if event.get("usage"):
                    usage_tokens = int(event["usage"]["completion_tokens"])
                if any(choice.get("text") for choice in event.get("choices", [])):
                    content_chunks += 1
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - start
    # Tokens from the usage chunk; a server without usage support: one token per text chunk.
    result.output_tokens = usage_tokens if usage_tokens is not None else content_chunks
    if not done:
        result.error = "the stream ended without [DONE]"
    elif result.ttft_s is None:
        result.error = "no text was generated"
    else:
        result.success = True
    return result


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:300]


# ------------------------------------------------------------------------------ the run
def random_prompt(rng: random.Random, length: int, min_token_id: int, vocab_size: int) -> list[int]:
    return [rng.randrange(min_token_id, vocab_size) for _ in range(length)]


def discover_model(base_url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The first model card of the server's /v1/models (raises a clear error if unreachable)."""
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/v1/models", timeout=timeout_s)
        response.raise_for_status()
        cards = response.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise RuntimeError(f"cannot list the models of the server at {base_url}: {exc}") from exc
    if not cards:
        raise RuntimeError(f"the server at {base_url} lists no model")
    return cards[0]


async def run_benchmark(config: ServeBenchConfig) -> dict[str, Any]:
    spec = config.workload_spec()
    trace = make_trace(spec)
    card: dict[str, Any] = {}
    if config.model is None or config.vocab_size is None:
        card = await asyncio.to_thread(discover_model, config.base_url)
    model = config.model or card["id"]
    vocab_size = config.vocab_size or card.get("vocab_size")
    if not vocab_size:
        raise ValueError("the server does not report its vocab size; pass --vocab-size")
    if not 0 <= config.min_token_id < vocab_size:
        raise ValueError(f"--min-token-id must be in [0, {vocab_size}), got {config.min_token_id}")
    rng = random.Random(config.seed)
    prompts = [random_prompt(rng, r.prompt_len, config.min_token_id, vocab_size) for r in trace]
    url = f"{config.base_url.rstrip('/')}/v1/completions"
    semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    progress = None
    if config.show_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(trace), desc="bench serve", unit="req")

    limits = httpx.Limits(max_connections=config.max_concurrency or max(1, len(trace)), max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(config.timeout_s), limits=limits) as client:

        async def one(request: TraceRequest, prompt: list[int], start: float) -> RequestResult:
            delay = start + request.arrival_time_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                if semaphore is None:
                    return await asyncio.wait_for(
                        send_request(client, url, model, request, prompt, config.temperature), config.timeout_s)
                async with semaphore:
                    return await asyncio.wait_for(
                        send_request(client, url, model, request, prompt, config.temperature), config.timeout_s)
            except asyncio.TimeoutError:
                return RequestResult(request.request_id, request.prompt_len, request.output_len,
                                     error=f"timed out after {config.timeout_s:g} s")
            finally:
                if progress is not None:
                    progress.update(1)

        bench_start = time.perf_counter()
        results = await asyncio.gather(*(one(r, p, bench_start) for r, p in zip(trace, prompts)))
        duration = time.perf_counter() - bench_start
    if progress is not None:
        progress.close()
    summary = summarize(list(results), duration, config.goodput_slo_ms)
    summary["config"] = {
        "base_url": config.base_url, "model": model, "workload": spec.kind, "num_requests": spec.num_requests,
        "request_rate": None if math.isinf(spec.request_rate) else spec.request_rate, "arrival": spec.arrival,
        "burstiness": spec.burstiness, "seed": spec.seed, "short_range": list(spec.short_range),
        "long_range": list(spec.long_range), "long_fraction": spec.long_fraction,
        "output_range": list(spec.output_range), "max_concurrency": config.max_concurrency,
        "timeout_s": config.timeout_s,
    }
    return summary


# ------------------------------------------------------------------------------ statistics
def _latency_stats(name: str, seconds: Sequence[float]) -> dict[str, Optional[float]]:
    """mean/median/p90/p99 in milliseconds (percentiles linearly interpolated, numpy's default);
    None when there is no sample (JSON has no NaN)."""
    keys = [f"mean_{name}_ms"] + [f"median_{name}_ms" if q == 50 else f"p{q}_{name}_ms" for q in PERCENTILES]
    if not seconds:
        return dict.fromkeys(keys)
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return dict(zip(keys, [float(ms.mean()), *(float(v) for v in np.percentile(ms, PERCENTILES))]))


def _meets_slo(result: RequestResult, slo_ms: dict[str, float]) -> bool:
    measured = {"ttft": result.ttft_s, "tpot": result.tpot_s, "e2el": result.e2e_s}
    for key, limit in slo_ms.items():
        value = measured[key]
        # A one-token output has no TPOT: that SLO cannot be violated.
        if value is None:
            if key == "tpot" and result.success:
                continue
            return False
        if value * 1000.0 > limit:
            return False
    return True


def summarize(results: list[RequestResult], duration_s: float, slo_ms: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    errors: list[str] = []
    for r in failed:
        if r.error and r.error not in errors and len(errors) < _MAX_ERRORS_REPORTED:
            errors.append(r.error)
    duration_s = max(duration_s, 1e-9)
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "duration_s": duration_s,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "errors": errors,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "output_len_mismatches": sum(1 for r in ok if r.output_tokens != r.expected_output_len),
        "request_throughput": len(ok) / duration_s,
        "input_throughput": input_tokens / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "goodput_slo_ms": dict(slo_ms) or None,
        "goodput": (sum(1 for r in ok if _meets_slo(r, slo_ms)) / duration_s) if slo_ms else None,
    }
    summary.update(_latency_stats("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]))
    summary.update(_latency_stats("tpot", [t for r in ok if (t := r.tpot_s) is not None]))
    summary.update(_latency_stats("itl", [x for r in ok for x in r.itl_s]))
    summary.update(_latency_stats("e2el", [r.e2e_s for r in ok if r.e2e_s is not None]))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    def num(value: Any, fmt: str = ".2f") -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        "=" * 20 + " Serving Benchmark Result " + "=" * 20,
        f"{'Successful requests:':<40}{summary['completed']}",
        f"{'Failed requests:':<40}{summary['failed']}",
        f"{'Benchmark duration (s):':<40}{num(summary['duration_s'])}",
        f"{'Total input tokens:':<40}{summary['total_input_tokens']}",
        f"{'Total generated tokens:':<40}{summary['total_output_tokens']}",
        f"{'Request throughput (req/s):':<40}{num(summary['request_throughput'])}",
        f"{'Input token throughput (tok/s):':<40}{num(summary['input_throughput'])}",
        f"{'Output token throughput (tok/s):':<40}{num(summary['output_throughput'])}",
    ]
    if summary.get("goodput") is not None:
        lines.append(f"{'Goodput (req/s):':<40}{num(summary['goodput'])}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 22}{title}{'-' * 22}")
        lines.append(f"{f'Mean {name.upper()} (ms):':<40}{num(summary[f'mean_{name}_ms'])}")
        lines.append(f"{f'Median {name.upper()} (ms):':<40}{num(summary[f'median_{name}_ms'])}")
        for q in PERCENTILES:
            if q != 50:
                lines.append(f"{f'P{q} {name.upper()} (ms):':<40}{num(summary[f'p{q}_{name}_ms'])}")
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    lines.append("=" * 66)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI
def parse_goodput(items: Optional[Sequence[str]]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY in {', '.join(SLO_KEYS)}; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
        slo[key] = ms
    return slo


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serving benchmark")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server to load")
    g.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    g.add_argument("--workload", choices=["short", "long", "mixed"], default="short",
                   help="trace shape from infinite_llm.bench.workloads (local scale)")
    g.add_argument("--num-requests", type=int, default=32)
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf sends all at once")
    g.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; < 1 is burstier than Poisson")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--short-range", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="prompt tokens of short requests")
    g.add_argument("--long-range", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="prompt tokens of long requests")
    g.add_argument("--long-fraction", type=float, default=None, help="share of long requests (mixed)")
    g.add_argument("--output-range", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="output tokens per request")
    g.add_argument("--vocab-size", type=int, default=None, help="default: reported by the server's /v1/models")
    g.add_argument("--min-token-id", type=int, default=3)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per request")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys: ttft, tpot, e2el)")
    g.add_argument("--result-file", default=None, help="write the results as JSON here")
    g.add_argument("--disable-tqdm", action="store_true")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    return ServeBenchConfig(
        base_url=args.base_url, model=args.model, workload=args.workload, num_requests=args.num_requests,
        request_rate=args.request_rate, arrival=args.arrival, burstiness=args.burstiness, seed=args.seed,
        short_range=tuple(args.short_range) if args.short_range else None,
        long_range=tuple(args.long_range) if args.long_range else None,
        long_fraction=args.long_fraction,
        output_range=tuple(args.output_range) if args.output_range else None,
        vocab_size=args.vocab_size, min_token_id=args.min_token_id, temperature=args.temperature,
        max_concurrency=args.max_concurrency, timeout_s=args.timeout,
        goodput_slo_ms=parse_goodput(args.goodput), show_progress=not args.disable_tqdm,
    )


def main_from_args(args: argparse.Namespace) -> dict[str, Any]:
    summary = asyncio.run(run_benchmark(config_from_args(args)))
    print(format_summary(summary))
    if args.result_file:
        with open(args.result_file, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="infinite-llm bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
