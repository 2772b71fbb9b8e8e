"""The cluster simulator: the real control plane driven by a priced (not executed) data plane."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.config import SchedulerConfig
from infinite_llm.control.perf_model import PerfModel
from infinite_llm.control.plan import BlockMove, BlockRef, SeqWork, StepPlan
from infinite_llm.sim import cli as sim_cli
from infinite_llm.sim.cluster import SimClusterSpec, StepCostModel
from infinite_llm.sim.executor import SimulatedExecutor
from infinite_llm.sim.simulator import SimSetup, Simulator, simulate

BLOCK = 16
BLOCKS_PER_INSTANCE = 32  # 512 tokens per instance
INSTANCES = 4
SCHED = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=256)
# The A100 / LLaMA2-7B roofline prices the steps; only the cluster is tiny.
COST = SimClusterSpec(num_instances=INSTANCES).cost_model()


def tiny_setup(placement: str, **overrides) -> SimSetup:
    values = dict(cost=COST, num_instances=INSTANCES, num_blocks_per_instance=BLOCKS_PER_INSTANCE,
                  block_size=BLOCK, placement=placement, scheduler=SCHED, migration_tokens_per_step=64)
    values.update(overrides)
    return SimSetup(**values)


def mixed_trace(num_long: int = 4, long_prompt: int = 300, long_output: int = 180,
                num_short: int = 16, short_prompt: int = 32, short_output: int = 64) -> list[TraceRequest]:
    """Long requests that nearly fill an instance, interleaved with many short ones."""
    trace, k = [], 0
    for i in range(max(num_long, num_short)):
        if i < num_long:
            trace.append(TraceRequest(f"long-{i}", 0.01 * k, long_prompt, long_output))
            k += 1
        if i < num_short:
            trace.append(TraceRequest(f"short-{i}", 0.01 * k, short_prompt, short_output))
            k += 1
    return trace


def without_wall_time(summary: dict) -> dict:
    # Host timings differ between runs; everything simulated must not.
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "control_plane_s")}


# ----------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("placement", ["static", "striped", "infinite"])
def test_same_inputs_give_the_same_result(placement):
    first = simulate(tiny_setup(placement), mixed_trace())
    second = simulate(tiny_setup(placement), mixed_trace())
    assert without_wall_time(first.summary()) == without_wall_time(second.summary())
    assert first.completed_ids == second.completed_ids
    assert first.num_completed + first.num_rejected == first.num_requests


def test_infinite_serves_a_request_longer_than_one_instance_where_static_rejects_it():
    too_long = TraceRequest("too-long", 0.0, 3 * BLOCK * BLOCKS_PER_INSTANCE // 2, 8)  # 768 + 8 > 512
    trace = [too_long, TraceRequest("short", 0.0, 40, 8)]
    static = simulate(tiny_setup("static"), trace)
    infinite = simulate(tiny_setup("infinite"), trace)
    assert static.rejected_ids == ["too-long"] and static.completed_ids == ["short"]
    assert static.rejection_reasons == {"RequestTooLongError": 1}
    assert sorted(infinite.completed_ids) == ["short", "too-long"]
    assert infinite.max_context_served == 776 > static.max_context_capacity == 512
    assert infinite.generated_tokens == 16  # outputs come from the trace (EOS is ignored)


def test_infinite_beats_static_throughput_on_a_mixed_trace():
    trace = mixed_trace()
    static = simulate(tiny_setup("static"), trace)
    infinite = simulate(tiny_setup("infinite"), trace)
    # Same work done by both (every request fits one instance), so tokens/s compare directly.
    assert static.num_completed == infinite.num_completed == len(trace)
    assert static.prompt_tokens + static.generated_tokens == infinite.prompt_tokens + infinite.generated_tokens
    assert infinite.throughput_tokens_per_s >= static.throughput_tokens_per_s
    # Static can only preempt when a long request outgrows its home; infinite borrows instead.
    assert static.num_preemptions > infinite.num_preemptions


@pytest.mark.parametrize("placement", ["static", "striped", "infinite"])
def test_no_block_is_leaked_at_the_end(placement):
    sim = Simulator(tiny_setup(placement))
    result = sim.run(mixed_trace())
    sim.kv.check_invariants()
    assert sim.kv.num_used_blocks() == 0
    assert sim.kv.num_free_blocks() == INSTANCES * BLOCKS_PER_INSTANCE
    assert sim.kv.requests() == []
    assert not sim.scheduler.has_unfinished()
    assert result.num_completed == len(mixed_trace())
    if placement == "infinite":
        assert result.migrated_blocks == sim.executor.totals.migrated_blocks > 0
        assert result.migrated_bytes == result.migrated_blocks * BLOCK * COST.kv_bytes_per_token


def test_idle_gaps_are_skipped_and_count_in_the_makespan():
    trace = [TraceRequest("a", 0.0, 32, 4), TraceRequest("b", 100.0, 32, 4)]
    result = simulate(tiny_setup("infinite"), trace)
    assert result.num_completed == 2
    assert 100.0 < result.makespan_s < 101.0
    assert result.busy_time_s < 1.0


def test_a_simulator_refuses_a_second_run_and_bad_traces():
    sim = Simulator(tiny_setup("static"))
    sim.run([TraceRequest("a", 0.0, 8, 2)])
    with pytest.raises(RuntimeError, match="one trace"):
        sim.run([TraceRequest("b", 0.0, 8, 2)])
    with pytest.raises(ValueError, match="empty"):
        simulate(tiny_setup("static"), [])
    with pytest.raises(ValueError, match="duplicate"):
        simulate(tiny_setup("static"), [TraceRequest("a", 0.0, 8, 2), TraceRequest("a", 1.0, 8, 2)])
    with pytest.raises(ValueError, match="placement"):
        tiny_setup("everywhere")


# ----------------------------------------------------------------------------- executor
def _flat_cost(**overrides) -> StepCostModel:
    values = dict(
        perf=PerfModel(t_fixed=1.0, t_per_token=0.1, t_per_seq=0.0, t_per_kv_token=0.01),
        kv_bytes_per_token=100, query_bytes_per_token=10, partial_bytes_per_token=12, num_layers=2,
        intra_node_bandwidth_Bps=1000.0, inter_node_bandwidth_Bps=100.0,
        intra_node_latency_s=0.5, inter_node_latency_s=1.0, instances_per_node=2,
    )
    values.update(overrides)
    return StepCostModel(**values)


def _work(request_id: str, home: int, table: list[BlockRef], start: int, n: int, sample: bool = True) -> SeqWork:
    return SeqWork(request_id=request_id, home=home, token_ids=[0] * n, start_pos=start,
                   block_table=table, sample=sample)


def test_executor_prices_local_work_as_the_perf_model_says():
    ex = SimulatedExecutor(_flat_cost(), num_instances=2)
    plan = StepPlan(step_id=1, block_size=4, seqs=[
        _work("a", 0, [BlockRef(0, 0), BlockRef(0, 1)], start=5, n=1),  # reads 6 KV tokens
        _work("b", 1, [BlockRef(1, 3)], start=0, n=3, sample=False),  # prefill chunk, 3 tokens
    ])
    results = ex.execute(plan)
    assert [(r.request_id, r.token_id) for r in results] == [("a", 0)]
    t = ex.last_timing
    assert t.non_attention_s == pytest.approx([1.1, 1.3])
    assert t.attention_s == pytest.approx([0.06, 0.03])
    assert t.communication_s == [0.0, 0.0]
    assert t.step_time_s == pytest.approx(1.33)  # lockstep: the slower instance


def test_executor_charges_remote_kv_and_migrations_on_the_right_links():
    ex = SimulatedExecutor(_flat_cost(), num_instances=3)  # instances 0, 1 share a node; 2 does not
    table = [BlockRef(0, 0), BlockRef(1, 0), BlockRef(2, 0)]
    plan = StepPlan(step_id=1, block_size=4, seqs=[_work("a", 0, table, start=9, n=1)],
                    migrations=[BlockMove(BlockRef(0, 5), BlockRef(2, 7))])
    ex.execute(plan)
    t = ex.last_timing
    # Guest attention: instance 1 reads 4 tokens, instance 2 the last block's 2 tokens.
    assert t.attention_s == pytest.approx([0.04, 0.04, 0.02])
    assert t.attention_bytes == 2 * (10 + 12)
    assert t.migration_bytes == 4 * 100
    # Instance 2: query in (10 B) over the network, partial out (12 B), plus 2 messages x 2
    # layers x 1 s of inter-node latency. The migrated block (400 B) is copied in the background.
    assert t.communication_s[2] == pytest.approx(max(12 / 100, 10 / 100) + 4 * 1.0)
    assert t.instance_time_s[2] == pytest.approx(0.02 + 4.12)  # the copy (4.1 s of link) is hidden
    # Instance 1 only talks to instance 0 over NVLink.
    assert t.communication_s[1] == pytest.approx(max(12 / 1000, 10 / 1000) + 4 * 0.5)
    assert ex.totals.migrated_blocks == 1

    # Five blocks need 20 s of the network link: longer than instance 2's compute, so the copy,
    # sharing the link with the query, sets its time.
    plan.migrations = [BlockMove(BlockRef(0, 5 + i), BlockRef(2, 7 + i)) for i in range(5)]
    ex.execute(plan)
    t = ex.last_timing
    assert t.instance_time_s[2] == pytest.approx((10 + 5 * 400) / 100)
    # Instance 0 sends a query over NVLink and a query plus the five blocks over the network.
    assert t.instance_time_s[0] == pytest.approx(10 / 1000 + (10 + 2000) / 100)


def test_shared_host_adds_up_instances_that_share_cores():
    plan = StepPlan(step_id=1, block_size=4, seqs=[
        _work("a", 0, [BlockRef(0, 0)], start=0, n=1), _work("b", 1, [BlockRef(1, 0)], start=0, n=1)])
    lockstep = SimulatedExecutor(_flat_cost(), 2)
    shared = SimulatedExecutor(_flat_cost(combine="shared_host", host_lanes=1), 2)
    lockstep.execute(plan)
    shared.execute(plan)
    assert shared.last_timing.step_time_s == pytest.approx(2 * lockstep.last_timing.step_time_s)


def test_executor_rejects_a_short_block_table():
    ex = SimulatedExecutor(_flat_cost(), 2)
    plan = StepPlan(step_id=1, block_size=4, seqs=[_work("a", 0, [BlockRef(0, 0)], start=4, n=1)])
    with pytest.raises(ValueError, match="block table"):
        ex.execute(plan)


# ----------------------------------------------------------------------------- cluster spec
def test_paper_cluster_memory_and_bad_specs():
    spec = SimClusterSpec()  # 32 x A100-80GB, LLaMA2-7B, 256-token blocks
    # (0.9 * 80 GiB - 13.5 GB of fp16 weights) / 512 KiB per token of KV.
    assert spec.kv_tokens_per_instance == 121_750
    assert spec.blocks_per_instance == 475
    assert spec.cost_model().instances_per_node == 8
    with pytest.raises(ValueError, match="do not fit"):
        SimClusterSpec(model="llama2-70b")
    assert SimClusterSpec(model="llama2-70b", tensor_parallel=4).blocks_per_instance > 0
    with pytest.raises(ValueError, match="hardware"):
        SimClusterSpec(hardware="TPU")


# ----------------------------------------------------------------------------- CLI
def test_cli_quick_run_writes_json(tmp_path):
    parser = argparse.ArgumentParser()
    sim_cli.add_cli_args(parser)
    args = parser.parse_args(["--quick", "--num-requests", "24", "--probe-context", "300000",
                              "--output-dir", str(tmp_path)])
    payload = sim_cli.main_from_args(args)
    data = json.loads((tmp_path / "simulate.json").read_text())
    assert payload["json_path"] == str(tmp_path / "simulate.json")
    assert set(data["full_trace"]) == {"static", "striped", "infinite"}
    assert data["config"]["cluster"]["num_instances"] == sim_cli.QUICK_INSTANCES
    for policy, result in data["full_trace"].items():
        assert result["num_completed"] + result["num_rejected"] == 24, policy
    assert data["probe"]["static"]["num_completed"] == 0
    assert data["probe"]["infinite"]["num_completed"] == 1
    assert {c["claim"] for c in data["claims"]} >= {"infinite serves contexts static cannot"}
    assert (tmp_path / "simulate_policies.png").stat().st_size > 0


def test_cli_rejects_bad_arguments():
    parser = argparse.ArgumentParser()
    sim_cli.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sweep", "8,zero"])
    with pytest.raises(ValueError, match="--instances"):
        sim_cli.main_from_args(parser.parse_args(["--instances", "0"]))


def test_the_simulator_does_not_import_torch():
    code = ("import sys, infinite_llm.sim.cli, infinite_llm.sim.simulator, infinite_llm.sim.executor; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shared_host_sums_work_but_not_latency_waits():
    # Two instances, each with half its KV on the other: both wait on messages, and both work.
    plan = StepPlan(step_id=1, block_size=4, seqs=[
        _work("a", 0, [BlockRef(0, 0), BlockRef(1, 1)], start=5, n=1),
        _work("b", 1, [BlockRef(1, 0), BlockRef(0, 1)], start=5, n=1)])
    base = dict(combine="shared_host", host_lanes=1, intra_node_bandwidth_Bps=1e12, intra_node_latency_s=0.5,
                latency_per_peer=True)
    waits_only = SimulatedExecutor(_flat_cost(**base), 2)
    waits_only.execute(plan)
    t = waits_only.last_timing
    work = [t.non_attention_s[i] + t.attention_s[i] for i in range(2)]
    latency = 2 * 2 * 0.5  # 2 messages x 2 layers x 0.5 s, one peer each
    assert t.instance_time_s == pytest.approx([w + latency for w in work], rel=1e-6)
    # The waits overlap the other instance's work: the step is the summed work, not the sum of
    # both instances' times (which would count each wait too).
    assert t.step_time_s == pytest.approx(max(sum(work), max(t.instance_time_s)), rel=1e-6)
    assert t.step_time_s < sum(t.instance_time_s)

    with_cpu = SimulatedExecutor(_flat_cost(message_cpu_s=0.25, **base), 2)
    with_cpu.execute(plan)
    # 4 messages per instance at 0.25 s of host work each: summed over both instances.
    assert with_cpu.last_timing.step_time_s == pytest.approx(max(sum(work) + 2 * 4 * 0.25,
                                                                 max(t.instance_time_s) + 4 * 0.25), rel=1e-6)

    # One guest sequence per instance (each hosts the other's second block): 0.1 s of work each.
    with_guests = SimulatedExecutor(_flat_cost(guest_segment_cpu_s=0.1, **base), 2)
    with_guests.execute(plan)
    assert with_guests.last_timing.instance_time_s == pytest.approx([x + 0.1 for x in t.instance_time_s], rel=1e-6)
