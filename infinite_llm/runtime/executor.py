"""Executors run one StepPlan on every instance and gather the sampled tokens.

`LocalExecutor` keeps all instances in this process (one thread per instance during a step,
exchanging tensors through `LocalTransport`); `RayExecutor` (runtime/cluster.py) runs one Ray
actor per instance with a torch.distributed group. Both expose the same two calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

from infinite_llm.config import CacheConfig, ModelConfig
from infinite_llm.control.plan import SampleResult, StepPlan
from infinite_llm.runtime.instance import InstanceWorker, torch_dtype
from infinite_llm.runtime.transport import LocalMailboxes, LocalTransport


class Executor(ABC):
    num_instances: int

    @abstractmethod
    def execute(self, plan: StepPlan) -> list[SampleResult]: ...

    def shutdown(self) -> None:
        pass


def _involved_instances(plan: StepPlan) -> set[int]:
    involved: set[int] = set()
    for work in plan.seqs:
        involved.add(work.home)
        visible = -(-work.end_pos // plan.block_size)
        involved.update(ref.instance for ref in work.block_table[:visible])
    for move in plan.migrations:
        involved.update((move.src.instance, move.dst.instance))
    return involved


class LocalExecutor(Executor):
    def __init__(self, model_path: str, model_config: ModelConfig, cache_config: CacheConfig,
                 num_instances: int, device: str = "cpu", dtype: str | None = None, seed: int = 0):
        from infinite_llm.model.loader import load_model

        self.num_instances = num_instances
        if num_instances > 1 and not device.startswith("cuda"):
            import os

            import torch

            # Instance threads each running torch's full intra-op pool oversubscribe the cores;
            # measured 10-50x slower steps on a loaded 2-core machine without this.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_instances))
        # In one process the instances share one read-only copy of the weights.
        _, model = load_model(model_path, device=device, dtype=dtype)
        model.eval()
        self.mailboxes = LocalMailboxes(num_instances) if num_instances > 1 else None
        # Block copies get their own mailboxes: they run beside the per-layer exchange.
        self.copy_mailboxes = LocalMailboxes(num_instances) if num_instances > 1 else None
        self.workers = [
            InstanceWorker(
                rank, model_config, cache_config, model,
                LocalTransport(rank, self.mailboxes) if self.mailboxes else None,
                device=device, seed=seed,
                copy_channel=LocalTransport(rank, self.copy_mailboxes) if self.copy_mailboxes else None,
            )
            for rank in range(num_instances)
        ]
        self.pool = ThreadPoolExecutor(max_workers=num_instances) if num_instances > 1 else None

    def execute(self, plan: StepPlan) -> list[SampleResult]:
        involved = sorted(_involved_instances(plan))
        if len(involved) <= 1 or self.pool is None:
            return [r for rank in involved for r in self.workers[rank].execute(plan)]
        futures = [self.pool.submit(self._run_one, rank, plan) for rank in involved]
        results: list[SampleResult] = []
        errors = []
        for future in futures:
            try:
                results.extend(future.result())
            except Exception as exc:  # noqa: BLE001 - re-raised below with the first cause
                errors.append(exc)
        if errors:
            for mailboxes in (self.mailboxes, self.copy_mailboxes):
                assert mailboxes is not None
                mailboxes.failed.clear()
                mailboxes.drain()
            raise errors[0]
        return results

    def _run_one(self, rank: int, plan: StepPlan) -> list[SampleResult]:
        try:
            return self.workers[rank].execute(plan)
        except Exception:
            # Wake peers blocked on this instance's messages so the step fails instead of hanging.
            assert self.mailboxes is not None
            self.mailboxes.failed.set()
            raise

    def shutdown(self) -> None:
        for worker in self.workers:
            try:
                worker.copier.wait()
            except RuntimeError:
                pass  # a failed copy was already reported by the step that hit it, or is moot now
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
