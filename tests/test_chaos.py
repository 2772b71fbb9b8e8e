"""Chaos (slow; `pytest -m slow tests/test_chaos.py`): under a steady load, a random live
instance is killed or stopped every couple of seconds and a replacement is added. At the end no
request is lost, every output equals transformers' greedy output (so every stream's text equals
an undisturbed run's), streams only ever grew by appending, and no live pool leaked a block.

Backends: instance threads (a crash is a step that raises; a stop is a step hung until later) and
Ray actors (SIGKILL; SIGSTOP, then SIGCONT a few seconds later, which the fenced actor survives
only to stop itself).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from infinite_llm.engine import LLM
from infinite_llm.sampling import SamplingParams
from tests.engine_helpers import assert_all_free, make_llm, prompts
from tests.hf_fixtures import hf_greedy, write_tiny_checkpoint

pytestmark = pytest.mark.slow

NUM_REQUESTS = 120
IN_FLIGHT = 8
MAX_TOKENS = 24
FAULT_EVERY_S = 2.0


class LocalFaults:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.hung: list[threading.Event] = []

    def kill(self, rank: int) -> None:
        def boom():
            raise RuntimeError("chaos: killed")

        self.llm.engine.cluster.instances[rank].scheduler.schedule = boom

    def stop(self, rank: int) -> None:
        runner = self.llm.engine.cluster.instances[rank].runner
        resume, execute = threading.Event(), runner.execute

        def hang(batch, step, called_off=None):
            resume.wait()
            return execute(batch, step, called_off)

        runner.execute = hang
        self.hung.append(resume)

    def resume_all(self) -> None:
        for event in self.hung:
            event.set()


class RayFaults:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.stopped: list[tuple[float, int]] = []

    def kill(self, rank: int) -> None:
        os.kill(self.llm.engine.cluster.pids[rank], signal.SIGKILL)

    def stop(self, rank: int) -> None:
        os.kill(self.llm.engine.cluster.pids[rank], signal.SIGSTOP)
        self.stopped.append((time.monotonic(), rank))

    def resume_all(self) -> None:
        for _, rank in self.stopped:
            os.kill(self.llm.engine.cluster.pids[rank], signal.SIGCONT)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_chaos_loses_no_request(tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray")
    write_tiny_checkpoint(tmp_path, arch="llama", seed=41)
    llm = make_llm(tmp_path, instances=3, blocks=24, batched_tokens=32, backend=backend,
                   rebalance_interval_s=0.3, instance_timeout_s=1.5, heartbeat_interval_s=0.05,
                   debug_step_delay_s={i: 0.02 for i in range(64)})
    faults = LocalFaults(llm) if backend == "local" else RayFaults(llm)
    rng = random.Random(7)
    num_requests = NUM_REQUESTS if backend == "local" else NUM_REQUESTS // 2  # actors start slowly
    batch = prompts(41, [rng.randrange(8, 160) for _ in range(num_requests)])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine = llm.engine
    history: dict[str, list] = {}
    submitted, next_fault, dead = 0, time.monotonic() + FAULT_EVERY_S, set()
    deadline = time.monotonic() + 110
    try:
        while submitted < num_requests or engine.has_unfinished_requests():
            assert time.monotonic() < deadline, f"chaos run did not finish ({len(history)} requests seen)"
            while submitted < num_requests and submitted - _finished(history) < IN_FLIGHT:
                engine.add_request(f"r{submitted}", batch[submitted], params)
                submitted += 1
            for out in engine.step(timeout_s=0.02):
                history.setdefault(out.request_id, []).append(out)
            if time.monotonic() >= next_fault and submitted < num_requests:
                live = [h["instance"] for h in engine.instance_health() if h["state"] == "alive"]
                victim = rng.choice(live)
                (faults.kill if rng.random() < 0.5 else faults.stop)(victim)
                dead.add(victim)
                engine.add_instance()
                next_fault = time.monotonic() + FAULT_EVERY_S
        faults.resume_all()
        for i, prompt in enumerate(batch):
            outs = history[f"r{i}"]
            assert outs[-1].finish_reason == "length", (i, outs[-1].error)
            assert outs[-1].output_token_ids == hf_greedy(tmp_path, prompt, MAX_TOKENS), f"r{i}"
            for before, after in zip(outs, outs[1:]):
                assert after.output_token_ids[: len(before.output_token_ids)] == before.output_token_ids
        print(f"chaos ({backend}): {len(dead)} instances killed or stopped and replaced, "
              f"{engine.failures.num_redispatched_requests} requests re-dispatched, {num_requests} finished")
        assert engine.failures.num_instance_failures == len(dead) >= 3
        assert_all_free(llm, exclude=tuple(dead))
    finally:
        faults.resume_all()
        llm.shutdown()


def _finished(history: dict) -> int:
    return sum(1 for outs in history.values() if outs[-1].finished)
