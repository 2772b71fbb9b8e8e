"""Offline policy benchmark (`infinite-llm bench`) and the profiler (`infinite-llm profile`)."""

from __future__ import annotations

import json

import pytest

from infinite_llm.bench.attainable import SoloRun, attainable_bound
from infinite_llm.bench.offline import (
    POLICIES,
    PhaseRuns,
    PolicyResult,
    TimelineSample,
    build_trace,
    common_request_ids,
    compare_policies,
    format_report,
    long_tail_workload,
    policy_ratios,
    prompt_token_ids,
    run_policy,
)
from infinite_llm.bench.profile import (
    GridPoint,
    build_batch,
    fit_quality,
    make_grid,
    profile_engine,
)
from infinite_llm.bench.workloads import TraceRequest, make_trace
from infinite_llm.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
from infinite_llm.control.perf_model import PerfModel, ProfileSample

BLOCK = 16
BLOCKS_PER_INSTANCE = 8  # 128 tokens per instance: the static policy cannot hold LONG_PROMPT
LONG_PROMPT = 150
LONG_OUTPUT = 12


def tiny_config() -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(block_size=BLOCK, num_blocks_per_instance=BLOCKS_PER_INSTANCE),
        # A short heartbeat: the timeline's block usage is the gManager's view, which lags by one.
        cluster=ClusterConfig(num_instances=2, rebalance_interval_s=0.1, heartbeat_interval_s=0.02),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
    )


def tiny_trace() -> list[TraceRequest]:
    return [
        TraceRequest(request_id="short-0", arrival_time_s=0.0, prompt_len=20, output_len=5),
        # Enough decode steps that its blocks are held across several heartbeats.
        TraceRequest(request_id="long-0", arrival_time_s=0.0, prompt_len=LONG_PROMPT, output_len=LONG_OUTPUT),
        TraceRequest(request_id="short-1", arrival_time_s=0.02, prompt_len=33, output_len=3),
        TraceRequest(request_id="short-2", arrival_time_s=0.05, prompt_len=7, output_len=6),
    ]


# ------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    outcome = compare_policies(tiny_config(), tiny_trace(), POLICIES, seed=3, output_dir=out, name="tiny")
    return outcome, out


def test_all_policies_run_and_write_json_and_png(tiny_comparison):
    outcome, out = tiny_comparison
    assert set(outcome["results"]) == set(POLICIES)
    assert set(outcome["phases"]) == {"full", "equal_work"}
    assert outcome["json_path"] == out / "tiny.json"
    payload = json.loads(outcome["json_path"].read_text())
    assert set(payload["results"]) == {"full", "equal_work"}
    assert set(payload["results"]["full"]) == set(POLICIES)
    assert set(payload["ratios"]) == {"full", "common_in_full", "equal_work"}
    assert set(payload["ratios"]["full"]) == {"infinite/static", "infinite/striped"}
    assert payload["results"]["full"]["infinite"][0]["num_completed"] == len(tiny_trace())
    assert len(payload["trace"]) == len(tiny_trace())
    with open(outcome["plot_path"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_static_rejects_the_long_request_that_infinite_serves(tiny_comparison):
    results = tiny_comparison[0]["results"]
    static, infinite, striped = results["static"], results["infinite"], results["striped"]
    assert list(static.rejected) == ["long-0"]
    assert "RequestTooLongError" in static.rejected["long-0"]
    assert static.num_completed == len(tiny_trace()) - 1
    for served in (infinite, striped):
        assert served.num_rejected == 0
        assert served.output_lens["long-0"] == LONG_OUTPUT
    # Serving it took more KV blocks at once than one instance's pool has.
    blocks_for_long = -(-LONG_PROMPT // BLOCK)
    assert blocks_for_long > BLOCKS_PER_INSTANCE
    for served in (infinite, striped):
        assert max(sum(s.blocks_used) for s in served.timeline) >= blocks_for_long
        assert max(served.mem_util_max) <= 1.0


def test_the_attainable_bound_comes_from_the_request_only_infinite_served(tmp_path):
    # The long request arrives last, so its arrival plus its time alone is the later floor.
    trace = [TraceRequest(request_id="short-0", arrival_time_s=0.0, prompt_len=20, output_len=5),
             TraceRequest(request_id="long-0", arrival_time_s=0.02, prompt_len=LONG_PROMPT, output_len=LONG_OUTPUT)]
    outcome = compare_policies(tiny_config(), trace, ["static", "infinite"], seed=3, output_dir=tmp_path,
                               name="bound", equal_work=False)
    bound = outcome["attainable"]
    assert bound.policy == "infinite" and bound.request_id == "long-0"
    assert bound.solo_s > 0 and bound.floor_s >= bound.arrival_s + bound.solo_s
    assert bound.work_cpu_s > min(r.cpu_s for r in outcome["phases"]["full"].runs["static"]) > 0
    assert bound.generated_tokens == outcome["results"]["infinite"].generated_tokens
    assert "no schedule could make infinite/static" in format_report(outcome)
    payload = json.loads(outcome["json_path"].read_text())
    assert payload["attainable"]["request_id"] == "long-0"


def test_attainable_bound_is_the_later_of_the_arrival_and_the_work_floors():
    trace = [TraceRequest("a", 0.0, 10, 2), TraceRequest("b", 1.0, 10, 2), TraceRequest("c", 3.0, 10, 2)]
    solo = {"a": SoloRun(2.5, 1.0), "b": SoloRun(2.5, 2.0)}
    bound = attainable_bound("infinite", ["a", "b", "c"], 60, trace, solo, cores=2)
    assert (bound.request_id, bound.floor_s, bound.generated_tokens_per_s) == ("b", 3.5, 60 / 3.5)
    bound = attainable_bound("infinite", ["a", "c"], 40, trace, {**solo, "b": SoloRun(9.0, 9.0)}, cores=2)
    assert (bound.request_id, bound.floor_s, bound.solo_s) == ("c", 3.0, 0.0)  # b was not served
    assert "the last request arrives at 3.00 s" in bound.explain()
    # c's work (5 CPU-s, static's) plus a's and b's alone (3 CPU-s) on 2 cores: 4 s.
    bound = attainable_bound("infinite", ["a", "b", "c"], 60, trace, solo, base_cpu_s=5.0, cores=2)
    assert (bound.work_cpu_s, bound.work_floor_s, bound.floor_s) == (8.0, 4.0, 4.0)
    assert "8.0 CPU-s on 2 cores" in bound.explain()


def test_equal_work_replays_only_the_requests_every_policy_served(tiny_comparison):
    outcome = tiny_comparison[0]
    assert outcome["common"] == ["short-0", "short-1", "short-2"]
    equal = outcome["phases"]["equal_work"]
    assert [r.request_id for r in equal.trace] == outcome["common"]
    for runs in equal.runs.values():
        assert runs[0].num_completed == 3 and runs[0].num_rejected == 0
    # Every request fits its home: nothing is memory-bound, so nothing may move.
    assert equal.runs["infinite"][0].migrated_blocks == 0


def test_metrics_are_consistent_with_the_trace(tiny_comparison):
    trace = {r.request_id: r for r in tiny_trace()}
    for result in tiny_comparison[0]["results"].values():
        assert result.num_completed + result.num_rejected == len(trace)
        for rid, n in result.output_lens.items():
            assert n == trace[rid].output_len
        assert result.generated_tokens == sum(trace[rid].output_len for rid in result.output_lens)
        assert result.prompt_tokens == sum(trace[rid].prompt_len for rid in result.output_lens)
        # Every admitted request finished, so the per-step token counts add up to the total.
        assert sum(s.generated_tokens for s in result.timeline) == result.generated_tokens
        assert result.elapsed_s > 0 and result.num_steps > 0
        assert set(result.finish_s) == set(result.output_lens)
        assert max(result.finish_s.values()) == pytest.approx(result.elapsed_s)
        assert result.generated_tokens_per_s > 0
        assert result.total_tokens_per_s > result.generated_tokens_per_s
        for mean, peak in zip(result.mem_util_mean, result.mem_util_max):
            assert 0.0 <= mean <= peak <= 1.0
        assert result.num_preemptions >= 0 and result.migrated_blocks >= 0
    results = tiny_comparison[0]["results"]
    assert results["static"].migrated_blocks == 0 and results["striped"].migrated_blocks == 0
    report = format_report(tiny_comparison[0])
    assert "infinite/static" in report and "infinite/striped" in report and "equal work" in report


def test_run_policy_uses_the_config_placement_and_same_prompts():
    config = tiny_config()
    config.cluster.placement = "static"
    trace = [TraceRequest(request_id="a", arrival_time_s=0.0, prompt_len=12, output_len=2)]
    result = run_policy(config, trace, seed=1)
    assert result.policy == "static" and result.output_lens == {"a": 2}
    assert prompt_token_ids(trace[0], 1, 100) == prompt_token_ids(trace[0], 1, 100)
    assert prompt_token_ids(trace[0], 1, 100) != prompt_token_ids(trace[0], 2, 100)
    assert len(prompt_token_ids(trace[0], 1, 100)) == 12


# ------------------------------------------------------------------ validation
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        run_policy(tiny_config(), [], seed=0)
    with pytest.raises(ValueError, match="unknown placement"):
        compare_policies(tiny_config(), tiny_trace(), ["static", "vllm"])
    dup = [tiny_trace()[0], tiny_trace()[0]]
    with pytest.raises(ValueError, match="duplicate"):
        compare_policies(tiny_config(), dup, ["static"])
    with pytest.raises(ValueError, match="workload"):
        build_trace("nonsense", 4, 1.0, 0)
    with pytest.raises(ValueError, match="num-requests"):
        build_trace("short", 0, 1.0, 0)
    with pytest.raises(ValueError, match="capacity"):
        build_trace("longtail", 4, 1.0, 0)
    with pytest.raises(ValueError, match="repeats"):
        compare_policies(tiny_config(), tiny_trace(), ["static"], repeats=0)


def test_build_trace_is_seeded():
    a = build_trace("mixed", 6, 2.0, seed=5)
    b = build_trace("mixed", 6, 2.0, seed=5)
    assert a == b and len(a) == 6
    assert build_trace("longtail", 6, 2.0, 5, capacity_tokens=8192) == build_trace("longtail", 6, 2.0, 5, 8192)


def test_long_tail_workload_is_mostly_short_with_long_requests_of_a_third_to_half_the_cluster():
    capacity = 4 * 128 * 16
    spec = long_tail_workload(capacity, num_requests=2000)
    trace = make_trace(spec)
    long = [r for r in trace if r.prompt_len > spec.short_range[1]]
    assert len(long) / len(trace) == pytest.approx(0.1, abs=0.02)
    assert all(0.3 * capacity - 1 <= r.prompt_len <= 0.6 * capacity for r in long)
    assert all(16 <= r.prompt_len <= 256 for r in trace if r not in long)


def _result(policy: str, generated: int, elapsed: float, repeat: int = 0) -> PolicyResult:
    return PolicyResult(
        policy=policy, num_requests=2, num_completed=2, num_rejected=0, rejected={},
        prompt_tokens=100, generated_tokens=generated, elapsed_s=elapsed, num_steps=1,
        num_preemptions=0, migrated_blocks=0, blocks_per_instance=8,
        mem_util_mean=[0.5], mem_util_max=[0.5], repeat=repeat,
        output_lens={"a": generated // 2, "b": generated - generated // 2},
        finish_s={"a": elapsed / 2, "b": elapsed},
        timeline=[TimelineSample(0.1, 0.1, generated, [4], 1, 0)],
    )


def test_ratios_compare_infinite_with_both_baselines():
    trace = [TraceRequest("a", 0.0, 40, 25), TraceRequest("b", 0.0, 60, 25)]
    runs = {"static": [_result("static", 50, 1.0), _result("static", 50, 2.0, 1)],
            "infinite": [_result("infinite", 50, 0.5), _result("infinite", 50, 1.0, 1)]}
    phases = {"full": PhaseRuns(trace, runs)}
    common = common_request_ids(runs, trace)
    assert common == ["a", "b"]
    ratios = policy_ratios(phases, common)
    full = ratios["full"]["infinite/static"]
    assert full["generated_tokens_per_s"] == pytest.approx(2.0)  # medians: 75 / 37.5
    assert full["total_tokens_per_s"] == pytest.approx(2.0)
    assert full["generated_per_repeat"] == pytest.approx([2.0, 2.0])
    assert ratios["common_in_full"]["infinite/static"]["generated_tokens_per_s"] == pytest.approx(2.0)
    assert "infinite/striped" not in ratios["full"] and "equal_work" not in ratios
    assert phases["full"].median_run("static").elapsed_s == 2.0  # the slower of two: lower median


def test_cli_bench_defaults_are_a_small_multi_instance_cluster():
    from infinite_llm.entrypoints.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["bench", "--workload", "short", "--policies", "static,infinite"])
    assert args.policies == ["static", "infinite"]
    config = engine_config_from_args(args)
    assert config.cluster.num_instances == 4
    assert config.cache.num_blocks_per_instance < 512
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--policies", "static,nope"])


# -------------------------------------------------------------------- profiler
def test_make_grid_and_plans():
    grid = make_grid(batch_sizes=[1, 4], context_lens=[64, 512], prefill_chunks=[8, 16], max_tokens_per_step=32)
    shapes = {(p.batch_size, p.chunk, p.context_len) for p in grid}
    decode = {(1, 1, 64), (1, 1, 512), (4, 1, 64), (4, 1, 512)}
    prefill = {(1, 8, 8), (1, 16, 16), (4, 8, 8)}  # 4 x 16 = 64 tokens > 32 per step: left out
    assert shapes == decode | prefill
    assert GridPoint(4, 1, 512).kv_tokens == 2048 and GridPoint(4, 8, 8).num_tokens == 32
    batch = build_batch(GridPoint(batch_size=3, chunk=5, context_len=40), block_size=16)
    assert len(batch) == 3
    assert all(w.end_pos == 40 and len(w.token_ids) == 5 and w.sample for w in batch)
    refs = [ref for w in batch for ref in w.block_table]
    assert len(refs) == len(set(refs)) == 3 * 3  # distinct blocks, ceil(40/16) per sequence
    with pytest.raises(ValueError, match="at least 4"):
        make_grid([1], [64], [8])
    with pytest.raises(ValueError, match="positive"):
        make_grid([0, 1], [64], [8])
    with pytest.raises(ValueError, match="chunk"):
        GridPoint(1, 9, 8)


def test_fit_quality_of_an_exact_model():
    truth = PerfModel(t_fixed=1e-3, t_per_token=2e-5, t_per_seq=1e-5, t_per_kv_token=3e-7)
    samples = [
        ProfileSample(b, t, kv, truth.step_time(b, t, kv))
        for b, t, kv in [(1, 1, 64), (4, 4, 512), (4, 32, 2048), (16, 16, 8192), (1, 64, 64)]
    ]
    quality = fit_quality(truth, samples)
    assert quality.r_squared == pytest.approx(1.0)
    assert quality.max_abs_rel_error == pytest.approx(0.0, abs=1e-12)


@pytest.fixture
def one_torch_thread():
    """Profile with one intra-op thread, as the CLI does (stable timings on a busy small box);
    restore the process-wide setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_profile_engine_fits_a_usable_model(tmp_path, one_torch_thread):
    path = tmp_path / "perf.json"
    model = profile_engine(
        EngineConfig(), batch_sizes=(1, 8), context_lens=(32, 2048), prefill_chunks=(16,),
        warmup=1, repeats=3, output_path=path,
    )
    coefficients = [model.t_fixed, model.t_per_token, model.t_per_seq, model.t_per_kv_token]
    assert all(c >= 0 for c in coefficients)
    assert model.t_per_kv_token > 0  # 8 x 2048 KV tokens cost measurably more than 8 x 32
    assert model.step_time(8, 8, 8 * 2048) > model.step_time(1, 1, 32)
    loaded = PerfModel.load(path)
    assert loaded.t_per_kv_token == pytest.approx(model.t_per_kv_token)
