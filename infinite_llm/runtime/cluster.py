"""Instances as Ray actors, wired into one torch.distributed process group.

With no `ray_address`, an embedded local Ray is started in this process (the default); with an
address (e.g. "auto" or "ray://host:10001") the instances are placed on an existing cluster, one
per GPU when the device is CUDA. Each actor holds its weights and KV pool; the per-layer query
and partial exchange goes actor-to-actor over torch.distributed (gloo on CPU, NCCL on GPU), not
through Ray's object store: Ray only carries the StepPlan in and the sampled tokens out.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from infinite_llm.config import CacheConfig, ModelConfig
from infinite_llm.control.plan import SampleResult, StepPlan
from infinite_llm.runtime.executor import Executor, _involved_instances


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _InstanceActor:
    """The body of a Ray actor; wrapped with ray.remote at executor start-up."""

    def __init__(self, rank: int, world_size: int, model_path: str, model_config: ModelConfig,
                 cache_config: CacheConfig, device: str, dtype: Optional[str], seed: int, num_threads: int):
        self.rank = rank
        self.world_size = world_size
        self.model_path = model_path
        self.model_config = model_config
        self.cache_config = cache_config
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.num_threads = num_threads
        self.worker = None

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        import torch
        import torch.distributed as dist

        from infinite_llm.model.loader import load_model
        from infinite_llm.runtime.instance import InstanceWorker
        from infinite_llm.runtime.transport import TorchDistTransport

        torch.set_num_threads(self.num_threads)
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        device = self.device
        if device.startswith("cuda"):
            torch.cuda.set_device(0)  # Ray exposes exactly the GPU assigned to this actor
            device = "cuda:0"
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
        )
        _, model = load_model(self.model_path, device=device, dtype=self.dtype)
        model.eval()
        transport = TorchDistTransport(torch.device(device))
        # A second group of all ranks: block copies run on their own thread beside the per-layer
        # exchange, and must not share its message order.
        copy_channel = TorchDistTransport(torch.device(device), group=dist.new_group(backend=backend))
        self.worker = InstanceWorker(
            self.rank, self.model_config, self.cache_config, model, transport, device=device, seed=self.seed,
            copy_channel=copy_channel,
        )
        return os.getpid()

    def execute(self, plan: StepPlan) -> list[SampleResult]:
        assert self.worker is not None, "setup() was not called"
        return self.worker.execute(plan)

    def shutdown(self) -> None:
        if self.worker is not None:
            try:
                self.worker.copier.wait()
            finally:
                if self.worker.transport is not None:
                    self.worker.transport.close()


class RayExecutor(Executor):
    def __init__(self, model_path: str, model_config: ModelConfig, cache_config: CacheConfig,
                 num_instances: int, device: str = "cpu", dtype: Optional[str] = None, seed: int = 0,
                 ray_address: Optional[str] = None, step_timeout_s: float = 600.0):
        import ray

        self.num_instances = num_instances
        self.step_timeout_s = step_timeout_s
        self._started_ray = False
        if not ray.is_initialized():
            if ray_address:
                ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
            else:
                # Embedded default: a private local Ray sized for the instances, small object
                # store (only plans and token ids go through it).
                ray.init(
                    num_cpus=max(num_instances, 1),
                    include_dashboard=False,
                    object_store_memory=128 * 1024 * 1024,
                    log_to_driver=False,
                    configure_logging=False,
                )
                self._started_ray = True
        on_gpu = device.startswith("cuda")
        num_threads = max(1, (os.cpu_count() or 1) // num_instances)
        actor_cls = ray.remote(num_cpus=0 if on_gpu else 1, num_gpus=1 if on_gpu else 0)(_InstanceActor)
        self.actors = [
            actor_cls.remote(rank, num_instances, model_path, model_config, cache_config, device, dtype, seed, num_threads)
            for rank in range(num_instances)
        ]
        master_addr, master_port = ray.get(self.actors[0].address.remote(), timeout=120)
        self.pids = ray.get([a.setup.remote(master_addr, master_port) for a in self.actors], timeout=300)

    def execute(self, plan: StepPlan) -> list[SampleResult]:
        import ray

        involved = sorted(_involved_instances(plan))
        futures = [self.actors[rank].execute.remote(plan) for rank in involved]
        results: list[SampleResult] = []
        for part in ray.get(futures, timeout=self.step_timeout_s):
            results.extend(part)
        return results

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
