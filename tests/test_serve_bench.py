"""`bench serve` against a live server (real engine), plus its statistics on synthetic results."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from infinite_llm.bench import serve_bench
from infinite_llm.bench.serve_bench import RequestResult, parse_goodput, summarize
from infinite_llm.bench.workloads import make_trace
from tests.test_api_server import LiveServer, small_config


@pytest.fixture(scope="module")
def server():
    live = LiveServer(small_config(num_instances=1, max_num_seqs=8))
    yield live
    live.close()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_bench.add_cli_args(parser)
    return parser.parse_args(list(argv))


def test_bench_against_live_server_writes_sane_json(server, tmp_path, capsys):
    result_file = tmp_path / "result.json"
    argv = ["--base-url", server.base_url, "--num-requests", "6", "--request-rate", "50", "--seed", "3",
            "--short-range", "8", "40", "--output-range", "3", "6", "--goodput", "ttft:60000", "tpot:60000",
            "--result-file", str(result_file), "--disable-tqdm", "--timeout", "60"]
    summary = serve_bench.main_from_args(_args(*argv))
    assert "Serving Benchmark Result" in capsys.readouterr().out
    on_disk = json.loads(result_file.read_text())
    assert on_disk == json.loads(json.dumps(summary))

    trace = make_trace(serve_bench.config_from_args(_args(*argv)).workload_spec())
    assert summary["completed"] == 6 and summary["failed"] == 0, summary["errors"]
    # Exact lengths: token-id prompts and ignore_eos with max_tokens.
    assert summary["total_input_tokens"] == sum(r.prompt_len for r in trace)
    assert summary["total_output_tokens"] == sum(r.output_len for r in trace)
    assert summary["output_len_mismatches"] == 0
    assert summary["request_throughput"] == pytest.approx(6 / summary["duration_s"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        values = [summary[f"{k}_{name}_ms"] for k in ("median", "p90", "p99")]
        assert all(v is not None and v > 0 for v in values), name
        assert values == sorted(values), name
    assert summary["mean_ttft_ms"] < summary["mean_e2el_ms"]
    # Generous SLOs: every request counts toward goodput.
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    assert summary["config"]["model"] == "default"
    assert server.wait_idle()


def test_bench_reports_failures_and_strict_slo(server):
    # Prompts longer than the instance's KV (768 tokens) are refused with 400: failures, not a crash.
    summary = serve_bench.main_from_args(_args(
        "--base-url", server.base_url, "--num-requests", "2", "--short-range", "900", "1000",
        "--output-range", "2", "2", "--disable-tqdm", "--goodput", "ttft:0.001",
    ))
    assert summary["completed"] == 0 and summary["failed"] == 2
    assert any("HTTP 400" in e for e in summary["errors"])
    assert summary["goodput"] == 0
    assert summary["mean_ttft_ms"] is None  # no sample: null, never NaN


def test_bench_cannot_reach_server_says_so():
    with pytest.raises(RuntimeError, match="cannot list the models"):
        serve_bench.main_from_args(_args("--base-url", "http://127.0.0.1:9", "--num-requests", "1",
                                         "--disable-tqdm"))


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "TPOT:50", "e2el:2000.5"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["latency:5"], ["ttft:abc"], ["tpot:0"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_summarize_statistics_and_goodput():
    def ok(ttft: float, e2e: float, tokens: int) -> RequestResult:
        return RequestResult("r", prompt_len=10, expected_output_len=tokens, success=True, output_tokens=tokens,
                             ttft_s=ttft, itl_s=[(e2e - ttft) / (tokens - 1)] * (tokens - 1), e2e_s=e2e)

    results = [ok(0.1, 1.1, 11), ok(0.2, 2.2, 11), ok(0.3, 0.3 + 3.0, 11),
               RequestResult("bad", 10, 5, error="HTTP 429: queue full")]
    summary = summarize(results, duration_s=2.0, slo_ms={"ttft": 250, "tpot": 250})
    assert summary["completed"] == 3 and summary["failed"] == 1 and summary["errors"] == ["HTTP 429: queue full"]
    assert summary["request_throughput"] == pytest.approx(1.5)
    assert summary["output_throughput"] == pytest.approx(33 / 2.0)
    assert summary["mean_ttft_ms"] == pytest.approx(200.0)
    assert summary["median_ttft_ms"] == pytest.approx(200.0)
    assert summary["p90_ttft_ms"] == pytest.approx(280.0)  # linear interpolation, as numpy
    assert summary["mean_tpot_ms"] == pytest.approx(200.0)  # 100, 200 and 300 ms per token
    # The first two meet both SLOs; the third misses both (TTFT 300 ms, TPOT 300 ms).
    assert summary["goodput"] == pytest.approx(2 / 2.0)
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in summary.values())
