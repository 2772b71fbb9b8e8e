"""Instances and the gManager as Ray actors, talking over ZeroMQ.

Ray places and starts the processes (one instance per device, or per CPU slot); it carries no
per-step traffic. Each actor binds a ZeroMQ endpoint, the driver gathers every address (its
router's too) and hands the full map to every actor, after which any pair talks directly.
With no `ray_address` an embedded local Ray is started (the default); with one (e.g. "auto")
the instances are placed on an existing cluster, one per GPU when the device is CUDA.

Placement: each new instance actor goes to the live Ray node (with a free CPU, or a GPU on CUDA)
that hosts the fewest of this cluster's instances, so instances spread one per host (or device)
before any host gets a second; on the embedded single-node Ray they all share the one node.

A watcher thread keeps one long call (`wait_stopped`) open on every instance actor: when Ray
reports the actor dead (its process was killed or crashed), the watcher tells the gManager at
once with `InstanceFailed`, instead of waiting for the heartbeat timeout.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Collection, Optional

from infinite_llm.cluster.local import make_gmanager
from infinite_llm.config import EngineConfig, ModelConfig
from infinite_llm.control.messages import GMANAGER, ROUTER, InstanceFailed, InstanceJoined, RemoveInstance

logger = logging.getLogger(__name__)


class _InstanceActor:
    """The body of a Ray actor; wrapped with ray.remote at start-up."""

    def __init__(self, rank: int, config: EngineConfig, model_spec: str, model_fingerprint: str,
                 model_config: ModelConfig, num_threads: int) -> None:
        import ray

        from infinite_llm.transport.zmq_transport import ZmqEndpoint

        self.rank = rank
        self.config = config
        self.model_spec, self.model_fingerprint = model_spec, model_fingerprint
        self.model_config = model_config
        self.num_threads = num_threads
        self.host = ray.util.get_node_ip_address()
        self.endpoint = ZmqEndpoint(rank, bind_host=self.host)
        self.engine = None
        self._stopped = threading.Event()

    def address(self) -> str:
        return self.endpoint.address

    def connect(self, peers: dict) -> None:
        """Learn peers' addresses (a new instance joined)."""
        self.endpoint.connect(peers)

    def start(self, peers: dict, members: Optional[list[int]] = None) -> int:
        import torch

        from infinite_llm.instance.engine import InstanceEngine
        from infinite_llm.instance.scratch_thread import run_on_scratch_thread
        from infinite_llm.model.files import resolve_on_this_host
        from infinite_llm.model.loader import load_model

        torch.set_num_threads(self.num_threads)
        device = self.config.cluster.device
        if device.startswith("cuda"):
            torch.cuda.set_device(0)  # Ray exposes exactly the GPU assigned to this actor
            device = "cuda:0"
        dtype = self.config.cache.dtype if self.config.cache.dtype != "auto" else None
        # The files on this actor's host, not a path of the driver's.
        path = resolve_on_this_host(self.model_spec, self.model_fingerprint)
        # Torch work off the actor's own thread, which lives on after the set-up (see instance/scratch_thread.py).
        _, model = run_on_scratch_thread(lambda: load_model(path, device=device, dtype=dtype))
        model.eval()
        self.endpoint.connect(peers)
        self.engine = run_on_scratch_thread(lambda: InstanceEngine(
            self.rank, self.config, self.model_config, model, self.endpoint, device=device, members=members,
            host=self.host))
        self.engine.start()
        return os.getpid()

    def control_state(self):
        """(rManager, tables) for cross-process invariant checks."""
        from infinite_llm.control.invariants import HomeTables

        assert self.engine is not None
        with self.engine.lock:
            return self.engine.rm, HomeTables.of(self.engine.kv)

    def is_fenced(self) -> bool:
        return self.engine is not None and self.engine.fenced

    def wait_stopped(self) -> None:
        """Returns when the actor is stopped; errors (in the caller) when its process dies."""
        self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()
        if self.engine is not None:
            self.engine.stop()


class _GManagerActor:
    """The gManager service in a Ray actor of its own (it needs no device)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        import ray

        from infinite_llm.transport.zmq_transport import ZmqEndpoint

        self.endpoint = ZmqEndpoint(GMANAGER, bind_host=ray.util.get_node_ip_address())
        self.service = make_gmanager(self.endpoint, config, model_config)

    def address(self) -> str:
        return self.endpoint.address

    def start(self, peers: dict) -> None:
        self.endpoint.connect(peers)
        self.service.start()

    def connect(self, peers: dict) -> None:
        self.endpoint.connect(peers)

    def stop(self) -> None:
        self.service.stop()


class RayCluster:
    def __init__(self, config: EngineConfig, model_path: str, model_config: ModelConfig) -> None:
        import ray

        from infinite_llm.transport.zmq_transport import ZmqEndpoint

        cluster = config.cluster
        n = cluster.num_instances
        self._closing = threading.Event()
        self._started_ray = self._init_ray(cluster.ray_address, n)
        self._on_gpu = on_gpu = cluster.device.startswith("cuda")
        self._node_of: dict[int, str] = {}  # rank -> Ray node id it was placed on
        self._gone: set[int] = set()  # ranks whose actor died
        # max_concurrency: `wait_stopped` stays open while the other calls are served.
        self._actor_cls = ray.remote(num_cpus=0 if on_gpu else 1, num_gpus=1 if on_gpu else 0,
                                     max_concurrency=4)(_InstanceActor)
        from infinite_llm.model.files import fingerprint

        # Each actor resolves the model on its own host: "default" is rebuilt there; a checkpoint
        # folder must be at the same absolute path (checked by fingerprint).
        spec = "default" if config.model == "default" else str(Path(model_path).resolve())
        self._actor_args = (config, spec, fingerprint(Path(model_path)), model_config,
                            max(1, (os.cpu_count() or 1) // n))
        self.actors = [self._new_actor(rank) for rank in range(n)]  # index = id
        self.gmanager = ray.remote(num_cpus=0)(_GManagerActor).remote(config, model_config)
        addresses = ray.get([a.address.remote() for a in self.actors], timeout=120)
        self.router_endpoint = ZmqEndpoint(ROUTER, bind_host=ray.util.get_node_ip_address())
        self.peers = {ROUTER: self.router_endpoint.address,
                      GMANAGER: ray.get(self.gmanager.address.remote(), timeout=120)}
        self.peers.update(enumerate(addresses))
        self.router_endpoint.connect(self.peers)
        ray.get(self.gmanager.start.remote(self.peers), timeout=60)
        self.pids = ray.get([a.start.remote(self.peers) for a in self.actors], timeout=300)
        self._lock = threading.Lock()
        self._watched = {actor.wait_stopped.remote(): rank for rank, actor in enumerate(self.actors)}
        self._watcher = threading.Thread(target=self._watch_actors, name="ray-actor-watch", daemon=True)
        self._watcher.start()

    def add_instance(self) -> int:
        """A new actor with the next id: every party learns its address before it starts."""
        import ray

        with self._lock:
            rank = len(self.actors)
            actor = self._new_actor(rank)
            self.actors.append(actor)
        address = ray.get(actor.address.remote(), timeout=120)
        self.peers[rank] = address
        self.router_endpoint.connect({rank: address})
        others = self.actors[:rank] + [self.gmanager]
        # A dead actor fails the call and a stopped one never answers: neither needs the address,
        # and neither may hold up the others.
        ray.wait([a.connect.remote({rank: address}) for a in others], num_returns=len(others), timeout=5)
        self.router_endpoint.send(GMANAGER, InstanceJoined(rank))
        self.pids.append(ray.get(actor.start.remote(self.peers, list(range(rank + 1))), timeout=300))
        with self._lock:
            self._watched[actor.wait_stopped.remote()] = rank
        return rank

    def _new_actor(self, rank: int):
        """Start the actor of instance `rank` on the least-used live node that can take it."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        need = "GPU" if self._on_gpu else "CPU"
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(need, 0) >= 1)
        options = {}
        if nodes:
            used = Counter(node for r, node in self._node_of.items() if r not in self._gone)
            node = min(nodes, key=lambda n: used[n])
            self._node_of[rank] = node
            # soft: if that node cannot take it after all, Ray places it elsewhere.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        return self._actor_cls.options(**options).remote(rank, *self._actor_args)

    def node_of(self, rank: int) -> Optional[str]:
        """The Ray node the instance was placed on."""
        return self._node_of.get(rank)

    def remove_instance(self, rank: int) -> None:
        self.router_endpoint.send(GMANAGER, RemoveInstance(rank))

    def _watch_actors(self) -> None:
        import ray

        while not self._closing.is_set():
            with self._lock:
                pending = dict(self._watched)
            if not pending:
                self._closing.wait(0.5)
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                rank = pending[ref]
                with self._lock:
                    self._watched.pop(ref, None)
                try:
                    ray.get(ref)
                    continue  # stopped on purpose
                except Exception as exc:  # noqa: BLE001 - RayActorError and kin: the process is gone
                    reason = f"Ray reports its actor died ({type(exc).__name__})"
                if self._closing.is_set():
                    return
                logger.warning("instance %d: %s", rank, reason)
                self._gone.add(rank)
                try:
                    self.router_endpoint.send(GMANAGER, InstanceFailed(rank, reason))
                except Exception:  # noqa: BLE001 - the heartbeat timeout still catches it
                    logger.exception("could not report instance %d dead", rank)

    @staticmethod
    def _init_ray(address: Optional[str], num_instances: int) -> bool:
        import ray

        if ray.is_initialized():
            return False
        if address:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            return False
        # Embedded default: a private local Ray sized for the instances; nothing big goes
        # through its object store (messages travel over ZeroMQ).
        # CPU slots for twice the instances: room to add (or replace) instances later.
        ray.init(num_cpus=2 * max(num_instances, 1), include_dashboard=False, object_store_memory=128 * 1024 * 1024,
                 log_to_driver=False, configure_logging=False)
        return True

    def control_states(self, exclude: Collection[int] = ()) -> list:
        import ray

        live = [a for rank, a in enumerate(list(self.actors)) if rank not in exclude]
        return ray.get([a.control_state.remote() for a in live], timeout=60)

    def is_fenced(self, rank: int) -> bool:
        """Whether the instance stopped itself after learning it had been declared dead."""
        import ray

        return ray.get(self.actors[rank].is_fenced.remote(), timeout=30)

    def shutdown(self) -> None:
        import ray

        self._closing.set()
        if not ray.is_initialized():
            return
        actors = self.actors + [self.gmanager]
        try:  # the gManager first: instances stopping one by one must not be "recovered" from
            ray.get(self.gmanager.stop.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        ray.wait([a.stop.remote() for a in self.actors], num_returns=len(self.actors), timeout=15)
        for actor in actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
