"""The simulated cluster: hardware, model, memory and links (pure Python, no torch).

`SimClusterSpec` turns a hardware preset and a model preset into what the control plane and the
simulator's pricing need: KV blocks per instance (HBM minus weights, minus an activation /
workspace reserve), bytes per KV token, bytes a query and a partial result take on the wire,
and which link (NVLink inside a node, the network across nodes) joins two instances.

`StepCostModel` is the cost side: a `PerfModel` for the non-attention layers and for reading KV,
optionally a FLOP rate for the compute side of attention (long prefill chunks are compute
bound), link bandwidths and latencies, and (for instances that are threads of one host) how
they share its cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from infinite_llm.control.perf_model import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    HardwareSpec,
    ModelSpec,
    PerfModel,
    kv_token_capacity,
)

# Per-message latencies of the per-layer query/partial exchange. Published figures for
# NVLink/NCCL small messages and InfiniBand RDMA are a few microseconds; these are the order
# of magnitude, not a measurement.
DEFAULT_INTRA_NODE_LATENCY_S = 5e-6
DEFAULT_INTER_NODE_LATENCY_S = 10e-6
# What one guest sequence adds to an attention message per layer besides its query rows: request
# id, layer, positions (`GuestSeq`). It does not depend on the context length.
DEFAULT_HEADER_BYTES_PER_SEQ = 64


@dataclass(frozen=True)
class StepCostModel:
    """Everything the simulator needs to price an instance step, a guest's attention and a copy.

    perf:                non-attention time (per instance batch/tokens) and KV-read time.
    attn_flop_s_per_kv_query: seconds for one query token to attend to one KV token (compute
                         side); 0 disables the compute bound (the PerfModel's KV-read term
                         alone then prices attention).
    kv_bytes_per_token:  K and V of one token, all layers (migration and KV-write traffic).
    query_bytes_per_token / partial_bytes_per_token: one token's query, and its (out, lse)
                         partial, over all layers (DistAttention traffic).
    header_bytes_per_seq: per layer and guest sequence, the rest of an attention message.
    num_layers:          per-layer exchanges: a remote holder costs 2 latencies per layer.
    host_stretch:        None: every instance has its own accelerator. Otherwise the instances
                         are threads sharing one host's cores (the local engine): a step taken
                         while k instances are busy lasts host_stretch[k - 1] times longer (the
                         last entry times k / len beyond the table); measured, not derived.
    step_overhead_s:     host time of an engine step outside the model (the loop, queues,
                         scheduling); 0 on an accelerator cluster, where it overlaps the GPU.
    control_latency_s:   one small control message (borrow, grant, creditor query); None: the
                         link latency. Threads of one process hand those over much faster than an
                         attention message, which carries tensors and the holder's compute.
    holders_serial_fraction: 0: a home waits for its slowest holder (messages to different
                         holders travel in parallel). 1: for the sum of its holders' exchanges
                         (threads of one process handing messages over one after another). In
                         between: the slowest plus that fraction of the others; measured.
    """

    perf: PerfModel
    kv_bytes_per_token: int
    query_bytes_per_token: int
    partial_bytes_per_token: int
    num_layers: int
    attn_flop_s_per_kv_query: float = 0.0
    header_bytes_per_seq: int = DEFAULT_HEADER_BYTES_PER_SEQ
    intra_node_bandwidth_Bps: float = math.inf
    inter_node_bandwidth_Bps: float = math.inf
    intra_node_latency_s: float = 0.0
    inter_node_latency_s: float = 0.0
    instances_per_node: int = 1
    host_stretch: Optional[tuple[float, ...]] = None
    step_overhead_s: float = 0.0
    holders_serial_fraction: float = 0.0
    control_latency_s: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("kv_bytes_per_token", "query_bytes_per_token", "partial_bytes_per_token",
                     "num_layers", "instances_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StepCostModel.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.header_bytes_per_seq, bool) or not isinstance(self.header_bytes_per_seq, int) \
                or self.header_bytes_per_seq < 0:
            raise ValueError(f"StepCostModel.header_bytes_per_seq must be an integer >= 0, got {self.header_bytes_per_seq!r}")
        for name in ("attn_flop_s_per_kv_query", "intra_node_latency_s", "inter_node_latency_s", "step_overhead_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"StepCostModel.{name} must be finite and >= 0, got {value!r}")
        for name in ("intra_node_bandwidth_Bps", "inter_node_bandwidth_Bps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"StepCostModel.{name} must be > 0, got {getattr(self, name)!r}")
        if self.control_latency_s is not None and not (math.isfinite(self.control_latency_s)
                                                       and self.control_latency_s >= 0):
            raise ValueError(f"StepCostModel.control_latency_s must be None or finite and >= 0, got {self.control_latency_s!r}")
        if not 0.0 <= self.holders_serial_fraction <= 1.0:
            raise ValueError(f"StepCostModel.holders_serial_fraction must be in [0, 1], got {self.holders_serial_fraction!r}")
        if self.host_stretch is not None and (
                not self.host_stretch or not all(math.isfinite(x) and x > 0 for x in self.host_stretch)):
            raise ValueError(f"StepCostModel.host_stretch must be None or positive factors, got {self.host_stretch!r}")

    def same_node(self, a: int, b: int) -> bool:
        return a // self.instances_per_node == b // self.instances_per_node

    def latency(self, a: int, b: int) -> float:
        """One message's latency between instances a and b."""
        return self.intra_node_latency_s if self.same_node(a, b) else self.inter_node_latency_s

    def control_latency(self, a: int, b: int) -> float:
        """One control message's latency between instances a and b."""
        return self.latency(a, b) if self.control_latency_s is None else self.control_latency_s

    def bandwidth(self, a: int, b: int) -> float:
        return self.intra_node_bandwidth_Bps if self.same_node(a, b) else self.inter_node_bandwidth_Bps

    def stretch(self, busy: int) -> float:
        """How much longer a step takes while `busy` instances (itself included) share the host."""
        table = self.host_stretch
        if table is None or busy < 1:
            return 1.0
        if busy <= len(table):
            return table[busy - 1]
        return table[-1] * busy / len(table)

    def attention_time(self, kv_tokens: int, pairs: int) -> float:
        """Attention over `kv_tokens` KV tokens for `pairs` query x KV-token pairs: reading the KV
        bounds decode, FLOPs bound long prefill chunks (a roofline)."""
        return max(self.perf.attention_time(kv_tokens), pairs * self.attn_flop_s_per_kv_query)


@dataclass(frozen=True)
class SimClusterSpec:
    """A cluster of `num_instances` identical instances of `tensor_parallel` GPUs each."""

    hardware: str = "A100-80GB"
    model: str = "llama2-7b"
    num_instances: int = 32
    block_size: int = 256
    tensor_parallel: int = 1
    dtype_bytes: int = 2
    # Share of HBM the server may use; the rest is the activation / workspace reserve.
    memory_utilization: float = 0.9
    lend_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.hardware not in HARDWARE_PRESETS:
            raise ValueError(f"unknown hardware {self.hardware!r}; choose one of {sorted(HARDWARE_PRESETS)}")
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(MODEL_PRESETS)}")
        for name in ("num_instances", "block_size", "tensor_parallel", "dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SimClusterSpec.{name} must be an integer >= 1, got {value!r}")
        if self.hardware_spec.gpus_per_node % self.tensor_parallel != 0:
            raise ValueError(
                f"tensor_parallel ({self.tensor_parallel}) must divide the {self.hardware_spec.gpus_per_node} "
                f"GPUs of a {self.hardware} node"
            )
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if not 0 <= self.lend_fraction <= 1:
            raise ValueError(f"lend_fraction must be in [0, 1], got {self.lend_fraction}")
        self.blocks_per_instance  # raises a clear error if the weights do not fit

    @property
    def hardware_spec(self) -> HardwareSpec:
        return HARDWARE_PRESETS[self.hardware]

    @property
    def model_spec(self) -> ModelSpec:
        return MODEL_PRESETS[self.model]

    @property
    def kv_tokens_per_instance(self) -> int:
        return kv_token_capacity(self.hardware_spec, self.model_spec, self.tensor_parallel,
                                 self.dtype_bytes, self.memory_utilization)

    @property
    def blocks_per_instance(self) -> int:
        blocks = self.kv_tokens_per_instance // self.block_size
        if blocks < 1:
            raise ValueError(
                f"{self.model} on {self.tensor_parallel} x {self.hardware} leaves room for "
                f"{self.kv_tokens_per_instance} KV tokens, less than one {self.block_size}-token block"
            )
        return blocks

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model_spec.kv_bytes_per_token(self.dtype_bytes)

    @property
    def num_gpus(self) -> int:
        return self.num_instances * self.tensor_parallel

    def cost_model(self, perf: Optional[PerfModel] = None) -> StepCostModel:
        """The roofline cost model of this cluster (or `perf` for the per-instance part)."""
        hw, model = self.hardware_spec, self.model_spec
        tp = self.tensor_parallel
        perf = perf or PerfModel.from_hardware(hw, model, self.dtype_bytes, tp)
        query = model.num_layers * model.num_heads * model.head_dim * self.dtype_bytes
        # The partial output has the query's shape; its log-sum-exp is one fp32 per head.
        partial = query + model.num_layers * model.num_heads * 4
        return StepCostModel(
            perf=perf,
            kv_bytes_per_token=self.kv_bytes_per_token,
            query_bytes_per_token=query,
            partial_bytes_per_token=partial,
            num_layers=model.num_layers,
            attn_flop_s_per_kv_query=model.attention_flops_per_kv_token() / (hw.peak_flops * tp),
            # Every GPU of an instance has its own NVLink ports and NIC.
            intra_node_bandwidth_Bps=hw.intra_node_bandwidth_Bps * tp,
            inter_node_bandwidth_Bps=hw.inter_node_bandwidth_Bps * tp,
            intra_node_latency_s=DEFAULT_INTRA_NODE_LATENCY_S,
            inter_node_latency_s=DEFAULT_INTER_NODE_LATENCY_S,
            instances_per_node=hw.gpus_per_node // tp,
        )


__all__ = ["SimClusterSpec", "StepCostModel"]
