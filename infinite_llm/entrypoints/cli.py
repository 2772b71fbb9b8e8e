"""`infinite-llm serve | generate | bench | simulate | profile`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from infinite_llm.engine_args import add_engine_args, engine_config_from_args


# One line on stderr (stdout may be JSON): the built-in model exists to run without a download,
# and a new user would otherwise take its output for a bug.
RANDOM_WEIGHTS_NOTE = (
    "note: the built-in 'default' model has random weights, so its output is noise; for real text pass "
    "--model /path/to/checkpoint, a local Hugging Face Llama/Mistral/Qwen2 folder (config.json, "
    "*.safetensors, tokenizer.json)"
)


def cmd_generate(args: argparse.Namespace) -> int:
    from infinite_llm.engine import LLM
    from infinite_llm.sampling import SamplingParams

    config = engine_config_from_args(args)
    if config.model == "default":
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    llm = LLM(model=config.model, config=config)
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.sampling_seed,
        max_tokens=args.max_tokens, stop=args.stop or [], ignore_eos=args.ignore_eos,
    )
    prompts = args.prompt or ["Hello, my name is"]
    try:
        outputs = llm.generate(prompts, params)
    finally:
        llm.shutdown()
    for out in outputs:
        if args.json:
            print(json.dumps({
                "prompt_token_ids": out.prompt_token_ids, "output_token_ids": out.output_token_ids,
                "text": out.text, "finish_reason": out.finish_reason,
            }))
        else:
            print(f"--- prompt: {len(out.prompt_token_ids)} tokens, output: {len(out.output_token_ids)} tokens "
                  f"(finish: {out.finish_reason})")
            print(out.text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from infinite_llm.entrypoints.api_server import run_server

    run_server(engine_config_from_args(args), host=args.host, port=args.port,
               shutdown_timeout_s=args.shutdown_timeout, max_request_bytes=args.max_request_bytes)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        from infinite_llm.bench.serve_bench import main_from_args

        main_from_args(args)
        return 0
    from infinite_llm.bench.offline import main_from_args as offline_main

    offline_main(args)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from infinite_llm.sim.cli import main_from_args

    main_from_args(args)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from infinite_llm.bench.profile import main_from_args

    main_from_args(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinite-llm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate offline from prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server",
        description="Serve the model over an OpenAI-compatible HTTP API. One request's context "
                    "(prompt + output tokens) is limited to what the placement policy lets one request hold "
                    "in the KV cache of the live instances (--kv-blocks-per-instance, --num-instances, "
                    "--placement), and to the model's positions; GET /v1/models reports that limit as "
                    "max_model_len. As at OpenAI, a chat request without max_tokens (or "
                    "max_completion_tokens) generates until EOS, a stop string or that limit; "
                    "/v1/completions defaults to max_tokens=16.")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, refuse new requests (503) and let running ones finish for "
                            "up to this long, then abort the rest (a stream's last event is an error saying "
                            "why, a non-streamed request gets 503) and exit 0; a second signal exits at once, "
                            "with status 128 + the signal number (default: %(default)s)")
    serve.add_argument("--max-request-bytes", type=int, default=4 << 20, metavar="BYTES",
                       help="largest request body accepted; bigger ones get 413 before they are parsed "
                            "(default: %(default)s = 4 MiB)")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks: offline policy comparison, or `bench serve`")
    bench_sub = bench.add_subparsers(dest="bench_command")
    bench_serve = bench_sub.add_parser("serve", help="load generator against a running server")
    from infinite_llm.bench.serve_bench import add_cli_args as add_serve_bench_args

    add_serve_bench_args(bench_serve)
    from infinite_llm.bench.offline import add_cli_args as add_offline_args

    add_engine_args(bench)
    add_offline_args(bench)
    bench.set_defaults(func=cmd_bench)

    sim = sub.add_parser("simulate", help="discrete-event cluster simulation at the paper's scale")
    from infinite_llm.sim.cli import add_cli_args as add_sim_args

    add_sim_args(sim)
    sim.set_defaults(func=cmd_simulate)

    prof = sub.add_parser("profile", help="profile the model on this hardware and fit the perf model")
    add_engine_args(prof)
    from infinite_llm.bench.profile import add_cli_args as add_profile_args

    add_profile_args(prof)
    prof.set_defaults(func=cmd_profile)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
