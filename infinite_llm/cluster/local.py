"""The embedded default: every instance and the gManager are threads of this process, talking
through the in-process transport (the same messages as across processes)."""

from __future__ import annotations

import os
import threading
from typing import Collection

from infinite_llm.config import EngineConfig, ModelConfig
from infinite_llm.cluster.gmanager_service import GManagerService
from infinite_llm.control.messages import GMANAGER, ROUTER, InstanceJoined, RemoveInstance
from infinite_llm.control.perf_model import PerfModel, default_perf_model
from infinite_llm.instance.scratch_thread import run_on_scratch_thread
from infinite_llm.transport.local import LocalFabric


def perf_model_for(config: EngineConfig, model_config: ModelConfig) -> PerfModel:
    path = config.cluster.perf_model_path
    if path:
        return PerfModel.load(path)
    return default_perf_model(model_config.num_parameters(), model_config.kv_bytes_per_token())


def copy_s_per_block(config: EngineConfig, model_config: ModelConfig, bandwidth_Bps: float = 10e9) -> float:
    """What moving one block costs the links, for the rebalancer's net-gain test."""
    return config.cache.block_size * model_config.kv_bytes_per_token() / bandwidth_Bps


def make_gmanager(endpoint, config: EngineConfig, model_config: ModelConfig) -> GManagerService:
    cluster = config.cluster
    return GManagerService(
        endpoint, cluster.num_instances, perf_model_for(config, model_config), config.cache.block_size,
        rebalance=cluster.placement == "infinite", rebalance_interval_s=cluster.rebalance_interval_s,
        copy_s_per_block=copy_s_per_block(config, model_config), heartbeat_timeout_s=cluster.instance_timeout_s,
        cross_host_copy_factor=cluster.cross_host_copy_factor,
    )


class LocalCluster:
    def __init__(self, config: EngineConfig, model_path: str, model_config: ModelConfig) -> None:
        import torch

        from infinite_llm.model.loader import load_model

        cluster = config.cluster
        n = cluster.num_instances
        if n > 1 and not cluster.device.startswith("cuda"):
            # Instance threads each running torch's full intra-op pool oversubscribe the cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
        dtype = config.cache.dtype if config.cache.dtype != "auto" else None
        # Torch work off the caller's thread (see instance/scratch_thread.py).
        _, model = run_on_scratch_thread(lambda: load_model(model_path, device=cluster.device, dtype=dtype))
        model.eval()  # shared read-only by the instance threads
        self.config, self.model_config, self.model = config, model_config, model
        self.fabric = LocalFabric()
        self.router_endpoint = self.fabric.endpoint(ROUTER)
        self.gmanager = make_gmanager(self.fabric.endpoint(GMANAGER), config, model_config)
        self.instances = [self._make_instance(rank, list(range(n))) for rank in range(n)]  # index = id
        self._lock = threading.Lock()
        self.gmanager.start()
        for instance in self.instances:
            instance.start()

    def _make_instance(self, rank: int, members: list[int]):
        from infinite_llm.instance.engine import InstanceEngine

        endpoint = self.fabric.endpoint(rank)
        # The KV cache is allocated (and zeroed) by torch: off the caller's thread too.
        return run_on_scratch_thread(lambda: InstanceEngine(
            rank, self.config, self.model_config, self.model, endpoint, device=self.config.cluster.device,
            members=members))

    def add_instance(self) -> int:
        """Start a new instance thread set with the next id; the gManager admits it."""
        with self._lock:
            rank = len(self.instances)
            instance = self._make_instance(rank, list(range(rank + 1)))
            self.instances.append(instance)
        self.router_endpoint.send(GMANAGER, InstanceJoined(rank))
        instance.start()
        return rank

    def remove_instance(self, rank: int) -> None:
        """The gManager announces it down; the instance stops itself on hearing that."""
        self.router_endpoint.send(GMANAGER, RemoveInstance(rank))

    def control_states(self, exclude: Collection[int] = ()) -> list:
        """(rManager, tables) of every instance but `exclude` (e.g. dead ones), for invariant
        checks (quiesce first)."""
        from infinite_llm.control.invariants import HomeTables

        states = []
        for instance in self.instances:
            if instance.rank in exclude:
                continue
            with instance.lock:
                states.append((instance.rm, HomeTables.of(instance.kv)))
        return states

    def shutdown(self) -> None:
        # The gManager first, so instances stopping one after another are not declared dead and
        # recovered from; then every instance is told to stop before any is waited for.
        self.gmanager.stop()
        for instance in self.instances:
            instance.stop(timeout_s=0)
        for instance in self.instances:
            instance.stop()
