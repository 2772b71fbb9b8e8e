"""The cluster simulator: independent instances on the real control plane, priced by a model."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys

import pytest

from infinite_llm.bench.workloads import TraceRequest
from infinite_llm.config import SchedulerConfig
from infinite_llm.control.invariants import check_cluster
from infinite_llm.control.messages import MigrationOrder
from infinite_llm.sim import cli as sim_cli
from infinite_llm.sim.cluster import SimClusterSpec
from infinite_llm.sim.simulator import SimSetup, Simulator, simulate

BLOCK = 16
BLOCKS_PER_INSTANCE = 32  # 512 tokens per instance
INSTANCES = 4
SCHED = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=256)
# The A100 / LLaMA2-7B roofline prices the steps; only the cluster is tiny.
COST = SimClusterSpec(num_instances=INSTANCES).cost_model()
POLICIES = ["static", "striped", "infinite"]


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
    return {k: v for k, v in summary.items() if k != "wall_time_s"}


def run(setup: SimSetup, trace: list[TraceRequest]) -> tuple[Simulator, object]:
    sim = Simulator(setup)
    return sim, sim.run(trace)


# ----------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("placement", POLICIES)
def test_same_inputs_give_the_same_result(placement):
    first = simulate(tiny_setup(placement), mixed_trace())
    second = simulate(tiny_setup(placement), mixed_trace())
    assert without_wall_time(first.summary()) == without_wall_time(second.summary())
    assert first.records == second.records


@pytest.mark.parametrize("placement", POLICIES)
def test_every_request_completes_or_is_rejected_and_no_block_leaks(placement):
    too_long = TraceRequest("too-long", 0.05, 3 * BLOCK * BLOCKS_PER_INSTANCE // 2, 8)  # 768 + 8 > 512
    trace = mixed_trace() + [too_long]
    sim, result = run(tiny_setup(placement), trace)
    assert result.num_completed + result.num_rejected == len(trace)
    assert all((r.completed) != (r.rejected is not None) for r in result.records)
    check_cluster(sim.rmanagers, [inst.kv for inst in sim.instances])
    for rm in sim.rmanagers:
        assert rm.num_free == BLOCKS_PER_INSTANCE and rm.num_lent == rm.num_borrowed == 0
    for inst in sim.instances:
        assert not inst.scheduler.has_unfinished() and inst.kv.requests() == []
    if placement == "static":
        assert result.rejected_ids == ["too-long"]
        assert result.rejection_reasons == {"RequestTooLongError": 1}
    else:
        assert result.record("too-long").completed
        assert result.max_context_served == 776 > BLOCK * BLOCKS_PER_INSTANCE


def test_static_never_borrows_and_sends_nothing():
    result = simulate(tiny_setup("static"), mixed_trace())
    assert result.num_borrows == 0
    assert result.attention_bytes == 0
    assert result.time_split_s["guest_attention"] == 0


def test_striped_spreads_every_request_over_all_instances():
    # 12 blocks of KV: every instance holds some, so each decode step talks to the 3 others.
    result = simulate(tiny_setup("striped"), [TraceRequest("r", 0.0, 12 * BLOCK - 8, 8)])
    assert result.decode_steps == 7
    assert result.decode_exchanges == 3 * result.decode_steps
    infinite = simulate(tiny_setup("infinite"), [TraceRequest("r", 0.0, 12 * BLOCK - 8, 8)])
    assert infinite.attention_bytes == 0  # it fits its home: nothing is borrowed


def test_bytes_per_decode_step_do_not_grow_with_the_context():
    short = simulate(tiny_setup("striped"), [TraceRequest("s", 0.0, 8 * BLOCK, 8)])
    long_ = simulate(tiny_setup("striped"), [TraceRequest("l", 0.0, 100 * BLOCK, 8)])
    assert short.decode_exchanges == long_.decode_exchanges > 0
    assert long_.decode_bytes_per_holder == pytest.approx(short.decode_bytes_per_holder, rel=0.05)


def test_infinite_serves_a_long_request_by_borrowing():
    trace = [TraceRequest("long", 0.0, 3 * BLOCK * BLOCKS_PER_INSTANCE // 2, 8), TraceRequest("short", 0.0, 40, 8)]
    static = simulate(tiny_setup("static"), trace)
    infinite = simulate(tiny_setup("infinite"), trace)
    assert static.completed_ids == ["short"]
    assert sorted(infinite.completed_ids) == ["long", "short"]
    assert infinite.num_borrows > 0 and infinite.attention_bytes > 0
    assert infinite.generated_tokens == 16  # outputs come from the trace (EOS is ignored)


# ----------------------------------------------------------------------------- stragglers
def _three_requests(prompt: int) -> list[TraceRequest]:
    # An empty view spreads a burst by what was dispatched: homes 0, 1, 2 in that order.
    return [TraceRequest(f"r{i}", 0.001 * i, prompt, 64) for i in range(3)]


@pytest.mark.parametrize("placement", ["static", "infinite"])
def test_a_slow_instance_does_not_slow_requests_without_blocks_there(placement):
    setup = dict(num_instances=3, placement=placement)
    fast = simulate(tiny_setup(**setup), _three_requests(200))
    slow = simulate(tiny_setup(speed={2: 0.1}, **setup), _three_requests(200))
    assert [fast.record(f"r{i}").home for i in range(3)] == [0, 1, 2]
    for i in (0, 1):  # homed elsewhere, all their KV at home
        assert slow.record(f"r{i}").finished_s == pytest.approx(fast.record(f"r{i}").finished_s)
    assert slow.record("r2").finished_s > 5 * fast.record("r2").finished_s


def test_a_slow_holder_slows_the_requests_whose_blocks_it_holds():
    fast = simulate(tiny_setup(num_instances=3, placement="striped"), _three_requests(200))
    # Attention over a few hundred tokens is tiny next to the weights' read: slow it a lot.
    slow = simulate(tiny_setup(num_instances=3, placement="striped", speed={2: 0.01}), _three_requests(200))
    for i in (0, 1):  # striped: every request has blocks on the slow instance 2
        assert slow.record(f"r{i}").finished_s > 1.2 * fast.record(f"r{i}").finished_s


def test_a_newcomer_calls_off_a_prompt_step_running_alone():
    """As the engine: a prompt alone takes the whole budget; a request arriving during that step
    calls it off at the next check, so it waits far less than the step."""
    one = dict(num_instances=1, placement="static")
    step_s = simulate(tiny_setup(**one), [TraceRequest("long", 0.0, 256, 4)]).record("long").first_token_s
    arrives = 0.3 * step_s
    sim, result = run(tiny_setup(**one), [TraceRequest("long", 0.0, 480, 4), TraceRequest("short", arrives, 32, 4)])
    assert sim.instances[0].stats.num_called_off == 1
    assert result.record("short").first_token_s - arrives < 0.7 * step_s  # the rest of the step
    assert result.record("long").output_len == 4


def test_guest_attention_is_charged_to_the_holder():
    # One request homed on 0 spread over everyone: only 0 steps, the others serve its queries.
    sim, result = run(tiny_setup("striped"), [TraceRequest("r", 0.0, 20 * BLOCK, 8)])
    assert sim.instances[0].stats.num_steps > 0 and sim.instances[0].stats.guest_s == 0
    for inst in sim.instances[1:]:
        assert inst.stats.num_steps == 0 and inst.stats.guest_s > 0
    assert result.time_split_s["guest_attention"] == pytest.approx(sum(i.stats.guest_s for i in sim.instances))


# ----------------------------------------------------------------------------- migration
def test_an_ordered_migration_copies_and_commits_without_leaks():
    sim = Simulator(tiny_setup("infinite", rebalance_interval_s=1e3))  # no planned moves in this run
    trace = [TraceRequest("r", 0.0, 10 * BLOCK, 400)]
    sim.order_migration(0.05, MigrationOrder("r", src=0, dst=3, num_blocks=6))
    result = sim.run(trace)
    assert result.migrated_blocks == 6
    assert result.migrated_bytes == 6 * BLOCK * COST.kv_bytes_per_token
    assert result.decode_exchanges > 0  # after the move, decodes ask instance 3
    check_cluster(sim.rmanagers, [inst.kv for inst in sim.instances])


def test_idle_gaps_are_skipped_and_count_in_the_makespan():
    result = simulate(tiny_setup("infinite"), [TraceRequest("a", 0.0, 32, 4), TraceRequest("b", 100.0, 32, 4)])
    assert result.num_completed == 2
    assert 100.0 < result.makespan_s < 101.0
    assert result.busy_time_s < 1.0


def test_a_simulator_refuses_a_second_run_and_bad_inputs():
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
    with pytest.raises(ValueError, match="speed"):
        tiny_setup("static", speed={7: 0.5})


# ----------------------------------------------------------------------------- pieces
def test_the_layout_counts_tokens_per_instance_like_walking_the_table():
    from infinite_llm.control.home_kv import HomeKV
    from infinite_llm.control.plan import BlockRef
    from infinite_llm.control.rmanager import RManager
    from infinite_llm.sim.layout import KVLayout

    rng = random.Random(1)
    kv = HomeKV(RManager(0, 8, 0), 4, "static", 1, None)
    table = [BlockRef(rng.randrange(3), i) for i in range(30)]
    kv._tables["r"] = table  # a hand-made table (the layout only reads it)
    kv._counts["r"] = __import__("collections").Counter(ref.instance for ref in table)
    layout = KVLayout(kv)
    for pos in list(range(121)) + [1, 60, 119]:
        expected: dict[int, int] = {}
        for p in range(pos):
            instance = table[p // 4].instance
            expected[instance] = expected.get(instance, 0) + 1
        assert {i: n for i, n in layout.tokens_below("r", pos, ()).items() if n} == expected


def test_a_step_is_priced_as_local_work_plus_the_slowest_holder():
    from infinite_llm.control.perf_model import PerfModel
    from infinite_llm.control.plan import SeqWork
    from infinite_llm.sim.cluster import StepCostModel
    from infinite_llm.sim.pricing import price_step

    cost = StepCostModel(perf=PerfModel(t_fixed=1.0, t_per_token=0.1, t_per_seq=0.0, t_per_kv_token=0.01),
                         kv_bytes_per_token=100, query_bytes_per_token=10, partial_bytes_per_token=12, num_layers=2,
                         header_bytes_per_seq=1, intra_node_bandwidth_Bps=1000.0, inter_node_bandwidth_Bps=100.0,
                         intra_node_latency_s=0.5, inter_node_latency_s=1.0, instances_per_node=2)
    batch = [SeqWork("a", [0], start_pos=9, block_table=[], sample=True),  # decode at position 9
             SeqWork("b", [0, 0, 0], start_pos=0, block_table=[], sample=False)]  # a 3-token prefill chunk
    layout = {"a": ({0: 4, 1: 4, 2: 2}, {2: 1}), "b": ({0: 3}, {})}
    price = price_step(cost, 0, batch, lambda w: layout[w.request_id], lambda i: 0.5 if i == 2 else 1.0)
    assert price.non_attention_s == pytest.approx(1.0 + 0.1 * 4)
    assert price.attention_s == pytest.approx(0.01 * 7)  # 4 + 3 KV tokens read on the home
    holder1, holder2 = price.holders
    assert holder1.compute_s == pytest.approx(0.04)
    assert holder1.bytes_sent == 2 * 1 + 10 + 12  # headers (2 layers), one query, one partial
    assert holder1.wait_s == pytest.approx(2 * 2 * 0.5 + 24 / 1000 + 0.04)  # NVLink: same node
    assert holder2.compute_s == pytest.approx(0.02 / 0.5)  # the slow instance
    assert holder2.bytes_sent == 2 * 1 + 10 + 100 + 12  # plus the new token's K/V, written there
    assert holder2.wait_s == pytest.approx(2 * 2 * 1.0 + 124 / 100 + 0.04)  # the network
    assert price.remote_wait_s == holder2.wait_s
    assert price.duration_s == pytest.approx(price.non_attention_s + holder2.wait_s)


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
                              "--bytes-contexts", "10000,100000", "--output-dir", str(tmp_path)])
    payload = sim_cli.main_from_args(args)
    data = json.loads((tmp_path / "simulate.json").read_text())
    assert payload["json_path"] == str(tmp_path / "simulate.json")
    assert set(data["full_trace"]) == {"static", "striped", "infinite"}
    assert data["config"]["cluster"]["num_instances"] == sim_cli.QUICK_INSTANCES
    for policy, result in data["full_trace"].items():
        assert result["num_completed"] + result["num_rejected"] == 24, policy
    assert data["probe"]["static"]["num_completed"] == 0
    assert data["probe"]["infinite"]["num_completed"] == 1
    assert any("bytes per decode step" in t["name"] and t["holds"] for t in data["targets"])
    assert (tmp_path / "simulate_policies.png").stat().st_size > 0


def test_cli_rejects_bad_arguments():
    parser = argparse.ArgumentParser()
    sim_cli.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sweep", "8,zero"])
    with pytest.raises(ValueError, match="--instances"):
        sim_cli.main_from_args(parser.parse_args(["--instances", "0"]))
    with pytest.raises(ValueError, match="--spanning-prefill-every"):
        sim_cli.scheduler_config(parser.parse_args(["--spanning-prefill-every", "0"]), 10)


def test_the_simulator_does_not_import_torch():
    code = "import sys, infinite_llm.sim.cli, infinite_llm.sim.simulator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
