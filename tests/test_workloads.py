"""Tests for synthetic workload traces."""

import dataclasses
import json
import math
import statistics

import pytest

from infinite_llm.bench.workloads import (
    TraceRequest,
    WorkloadSpec,
    load_trace,
    make_trace,
    paper_workloads,
    save_trace,
)


def spec(**overrides) -> WorkloadSpec:
    base = dict(kind="mixed", num_requests=200, request_rate=10.0, seed=7, short_range=(16, 256),
                long_range=(1024, 8192), long_fraction=0.25, output_range=(4, 32))
    base.update(overrides)
    return WorkloadSpec(**base)


def test_same_seed_same_trace_other_seed_other_trace():
    assert make_trace(spec()) == make_trace(spec())
    assert make_trace(spec()) != make_trace(spec(seed=8))


def test_rate_changes_arrivals_but_not_the_requests():
    slow, fast = make_trace(spec(request_rate=1.0)), make_trace(spec(request_rate=100.0))
    assert [(r.prompt_len, r.output_len) for r in slow] == [(r.prompt_len, r.output_len) for r in fast]
    assert slow[-1].arrival_time_s > fast[-1].arrival_time_s


@pytest.mark.parametrize("kind", ["short", "long", "mixed"])
def test_lengths_respect_ranges(kind):
    s = spec(kind=kind, num_requests=2000)
    trace = make_trace(s)
    allowed = {"short": [s.short_range], "long": [s.long_range], "mixed": [s.short_range, s.long_range]}[kind]
    for r in trace:
        assert any(lo <= r.prompt_len <= hi for lo, hi in allowed)
        assert s.output_range[0] <= r.output_len <= s.output_range[1]
    # Log-uniform: the median sits near the geometric mean of the range, not the arithmetic one.
    if kind != "mixed":
        lo, hi = allowed[0]
        median = statistics.median(r.prompt_len for r in trace)
        assert 0.8 * math.sqrt(lo * hi) < median < 1.25 * math.sqrt(lo * hi)


def test_mixed_long_fraction():
    s = spec(num_requests=4000, long_fraction=0.25)
    trace = make_trace(s)
    long_share = sum(r.prompt_len >= s.long_range[0] for r in trace) / len(trace)
    assert long_share == pytest.approx(0.25, abs=0.03)


def test_poisson_mean_rate_for_many_requests():
    trace = make_trace(spec(num_requests=20_000, request_rate=5.0))
    rate = len(trace) / trace[-1].arrival_time_s
    assert rate == pytest.approx(5.0, rel=0.03)
    gaps = [b.arrival_time_s - a.arrival_time_s for a, b in zip(trace, trace[1:])]
    # Exponential gaps: standard deviation equals the mean.
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)


def test_gamma_arrivals_keep_the_rate_and_set_burstiness():
    bursty = make_trace(spec(num_requests=20_000, request_rate=5.0, arrival="gamma", burstiness=0.25))
    gaps = [b.arrival_time_s - a.arrival_time_s for a, b in zip(bursty, bursty[1:])]
    assert len(bursty) / bursty[-1].arrival_time_s == pytest.approx(5.0, rel=0.05)
    # Gamma with shape k has coefficient of variation 1 / sqrt(k) = 2.
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(2.0, rel=0.1)


def test_infinite_rate_puts_everything_at_zero():
    trace = make_trace(spec(request_rate=math.inf, num_requests=10))
    assert [r.arrival_time_s for r in trace] == [0.0] * 10


def test_arrivals_are_sorted_and_ids_unique():
    trace = make_trace(spec())
    times = [r.arrival_time_s for r in trace]
    assert times == sorted(times)
    assert len({r.request_id for r in trace}) == len(trace)


def test_paper_workloads():
    for scale in ("paper", "local"):
        workloads = paper_workloads(scale)
        assert set(workloads) == {"short", "long", "mixed"}
        for kind, s in workloads.items():
            assert s.kind == kind
            assert s.short_range[1] <= s.long_range[0]
    paper, local = paper_workloads("paper"), paper_workloads("local")
    assert paper["long"].long_range[1] == 2_000_000
    assert paper["short"].short_range[1] == 60_000
    assert local["long"].long_range[1] <= 8192  # tiny model on CPUs
    assert max(r.prompt_len for r in make_trace(local["mixed"])) <= 4096
    with pytest.raises(ValueError, match="scale"):
        paper_workloads("huge")


def test_jsonl_round_trip(tmp_path):
    trace = make_trace(spec(num_requests=50))
    path = tmp_path / "trace.jsonl"
    save_trace(trace, path)
    assert len(path.read_text().splitlines()) == 50
    assert load_trace(path) == trace


def test_load_trace_names_the_bad_line(tmp_path):
    path = tmp_path / "trace.jsonl"
    good = json.dumps(dataclasses.asdict(TraceRequest("a", 0.0, 5, 5)))
    path.write_text(good + "\n" + json.dumps({"request_id": "b", "arrival_time_s": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"trace.jsonl:2: expected fields"):
        load_trace(path)
    path.write_text(good + "\n\n" + json.dumps({**json.loads(good), "prompt_len": 0}) + "\n")
    with pytest.raises(ValueError, match=r"trace.jsonl:3: .*prompt_len"):
        load_trace(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_trace(path)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(kind="huge"), "kind"),
        (dict(num_requests=-1), "num_requests"),
        (dict(request_rate=0.0), "request_rate"),
        (dict(short_range=(10, 5)), "short_range"),
        (dict(long_range=(0, 5)), "long_range"),
        (dict(long_fraction=1.5), "long_fraction"),
        (dict(arrival="uniform"), "arrival"),
        (dict(burstiness=0.0), "burstiness"),
    ],
)
def test_spec_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        spec(**overrides)
