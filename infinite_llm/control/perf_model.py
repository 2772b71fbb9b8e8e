"""Step-time model of one serving instance (pure Python + numpy, no torch).

Infinite-LLM's cluster scheduler needs to predict how long one step of an instance takes so it
can tell whether moving KV between instances raises total throughput. The model separates the
two parts of a step that scale differently:

    step_time = non_attention(batch_size, num_tokens) + attention(kv_tokens)
    non_attention = t_fixed + t_per_token * num_tokens + t_per_seq * batch_size   (0 if no tokens)
    attention     = t_per_kv_token * kv_tokens

- `t_fixed` is what a forward pass costs regardless of batch: at decode time mostly reading the
  weights from HBM once, which is why decode time is nearly flat in batch size until the matmuls
  become compute-bound (`t_per_token` then dominates).
- `t_per_seq` covers per-sequence work (sampling, bookkeeping, per-request kernel overhead).
- `kv_tokens` is every KV token read by attention *on this instance* in the step: its own
  requests' local KV plus the KV it hosts for other instances' requests (guest MicroAttention).
- An instance with no tokens of its own runs no forward pass, so it pays attention time only
  (it still serves guests' MicroAttention).

A model comes either from profiling (`PerfModel.fit` on measured samples, non-negative least
squares) or from a roofline of published hardware numbers (`PerfModel.from_hardware`), which is
what the simulator uses for clusters we do not have.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

_FORMAT = "infinite-llm-perf-model"
_FORMAT_VERSION = 1
_COEFFICIENTS = ("t_fixed", "t_per_token", "t_per_seq", "t_per_kv_token")


# --------------------------------------------------------------------------- hardware / models
@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator and the links around it (bytes, bytes/s, FLOP/s)."""

    name: str
    hbm_bytes: int
    hbm_bandwidth_Bps: float
    peak_flops: float  # dense bf16/fp16 tensor-core peak
    intra_node_bandwidth_Bps: float  # per GPU, e.g. NVLink
    inter_node_bandwidth_Bps: float  # per GPU, e.g. one InfiniBand NIC
    gpus_per_node: int

    def __post_init__(self) -> None:
        for name in ("hbm_bytes", "hbm_bandwidth_Bps", "peak_flops", "intra_node_bandwidth_Bps",
                     "inter_node_bandwidth_Bps", "gpus_per_node"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HardwareSpec {self.name!r}: {name} must be > 0, got {getattr(self, name)}")


# Published datasheet numbers (SXM parts, dense tensor-core peak, no sparsity).
HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "A100-80GB": HardwareSpec(
        name="A100-80GB",
        hbm_bytes=80 * 2**30,  # 81920 MiB as reported by nvidia-smi
        hbm_bandwidth_Bps=2.039e12,
        peak_flops=312e12,
        intra_node_bandwidth_Bps=600e9,  # NVLink 3
        inter_node_bandwidth_Bps=200e9 / 8,  # HDR InfiniBand, 200 Gb/s
        gpus_per_node=8,
    ),
    "H100-80GB": HardwareSpec(
        name="H100-80GB",
        hbm_bytes=81559 * 2**20,  # as reported by nvidia-smi
        hbm_bandwidth_Bps=3.35e12,
        peak_flops=989e12,
        intra_node_bandwidth_Bps=900e9,  # NVLink 4
        inter_node_bandwidth_Bps=400e9 / 8,  # NDR InfiniBand, 400 Gb/s
        gpus_per_node=8,
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts the performance model needs about a decoder-only model."""

    name: str
    num_params: int
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    num_heads: int

    def __post_init__(self) -> None:
        for name in ("num_params", "num_layers", "hidden_size", "num_kv_heads", "head_dim", "num_heads"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelSpec {self.name!r}: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelSpec {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V for one token over all layers."""
        _check_positive_int("dtype_bytes", dtype_bytes)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        _check_positive_int("dtype_bytes", dtype_bytes)
        return self.num_params * dtype_bytes

    def attention_flops_per_kv_token(self) -> int:
        """FLOPs of one query token attending to one KV token (QK^T and PV, all heads, all layers)."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


# Shapes from the published Llama 2 configs; parameter counts are exact for those shapes
# (untied embeddings, vocab 32000; intermediate sizes 11008 / 13824 / 28672).
MODEL_PRESETS: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec("llama2-7b", num_params=6_738_415_616, num_layers=32, hidden_size=4096,
                           num_kv_heads=32, head_dim=128, num_heads=32),
    "llama2-13b": ModelSpec("llama2-13b", num_params=13_015_864_320, num_layers=40, hidden_size=5120,
                            num_kv_heads=40, head_dim=128, num_heads=40),
    "llama2-70b": ModelSpec("llama2-70b", num_params=68_976_648_192, num_layers=80, hidden_size=8192,
                            num_kv_heads=8, head_dim=128, num_heads=64),
}


def kv_token_capacity(hw: HardwareSpec, model: ModelSpec, tensor_parallel: int = 1,
                      dtype_bytes: int = 2, memory_utilization: float = 0.9) -> int:
    """KV tokens an instance of `tensor_parallel` GPUs can hold after loading the weights.

    `memory_utilization` is the share of HBM the server may use (the rest is activations,
    workspace and fragmentation). Raises if the weights alone do not fit.
    """
    _check_positive_int("tensor_parallel", tensor_parallel)
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization}")
    usable = hw.hbm_bytes * tensor_parallel * memory_utilization
    weights = model.weight_bytes(dtype_bytes)
    if weights >= usable:
        raise ValueError(
            f"{model.name} weights ({weights / 2**30:.1f} GiB) do not fit in {tensor_parallel} x "
            f"{hw.name} at memory_utilization={memory_utilization} ({usable / 2**30:.1f} GiB usable)"
        )
    return int((usable - weights) // model.kv_bytes_per_token(dtype_bytes))


# --------------------------------------------------------------------------- samples / NNLS
@dataclass(frozen=True)
class ProfileSample:
    """One measured step.

    batch_size: sequences in the step; num_tokens: tokens through the non-attention layers;
    kv_tokens: KV tokens read by attention on this instance; step_time_s: measured seconds.
    """

    batch_size: int
    num_tokens: int
    kv_tokens: int
    step_time_s: float

    def __post_init__(self) -> None:
        _check_step_shape(self.batch_size, self.num_tokens, self.kv_tokens)
        if not (math.isfinite(self.step_time_s) and self.step_time_s > 0):
            raise ValueError(f"ProfileSample.step_time_s must be finite and > 0, got {self.step_time_s}")


def nnls(a: np.ndarray, b: np.ndarray, max_iter: Optional[int] = None) -> np.ndarray:
    """Non-negative least squares, min ||a x - b||_2 subject to x >= 0 (Lawson-Hanson active set).

    Variables enter the passive (free) set one at a time, the most useful first (largest gradient
    of the residual). Whenever the unconstrained solution on the passive set has a non-positive
    entry, we step back along the segment to the last feasible point and drop the variables that
    hit zero. Converges in finitely many steps; `max_iter` only guards against rounding cycles.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 1 or a.shape[0] != b.shape[0]:
        raise ValueError(f"nnls needs a (m, n) matrix and an (m,) vector, got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("nnls input contains NaN or infinity")
    m, n = a.shape
    max_iter = 3 * n + 30 if max_iter is None else max_iter
    tol = 10 * np.finfo(float).eps * max(m, n) * max(1.0, np.abs(a).sum(axis=0).max(initial=0.0))
    tol *= max(1.0, float(np.abs(b).max(initial=0.0)))
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    gradient = a.T @ (b - a @ x)
    iterations = 0
    while (~passive).any() and gradient[~passive].max() > tol:
        candidate = np.where(passive, -np.inf, gradient)
        entering = int(np.argmax(candidate))
        passive[entering] = True
        while True:
            iterations += 1
            if iterations > max_iter:
                raise RuntimeError(f"nnls did not converge in {max_iter} iterations")
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if s[passive].min() > 0:
                break
            # Step back to the boundary: the largest step from x toward s that keeps x >= 0.
            blocking = passive & (s <= 0)
            alpha = np.min(x[blocking] / (x[blocking] - s[blocking]))
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive[entering] and alpha == 0:
                # The entering variable's gradient was positive only by rounding: the current
                # x already satisfies the optimality conditions to working precision.
                return x
        x = s
        gradient = a.T @ (b - a @ x)
    return x


# --------------------------------------------------------------------------- the model
@dataclass
class PerfModel:
    """step_time = t_fixed + t_per_token*num_tokens + t_per_seq*batch_size + t_per_kv_token*kv_tokens.

    All coefficients are seconds (per token / sequence / KV token) and non-negative.
    `fit_relative_rmse` is the root mean square of (predicted - measured) / measured over the
    samples the model was fitted on (None for a model that was not fitted). `metadata` says
    where the model came from and is saved with it.
    """

    t_fixed: float
    t_per_token: float
    t_per_seq: float
    t_per_kv_token: float
    fit_relative_rmse: Optional[float] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _COEFFICIENTS:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"PerfModel.{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))

    # ----------------------------------------------------------------- prediction
    def non_attention_time(self, batch_size: int, num_tokens: int) -> float:
        """Embeddings, projections, MLP, norms, sampling. Zero when the instance has no tokens."""
        _check_step_shape(batch_size, num_tokens, 0)
        if num_tokens == 0:
            return 0.0
        return self.t_fixed + self.t_per_token * num_tokens + self.t_per_seq * batch_size

    def attention_time(self, kv_tokens: int) -> float:
        """Attention over `kv_tokens` KV tokens held on this instance (own and guest)."""
        _check_non_negative_int("kv_tokens", kv_tokens)
        return self.t_per_kv_token * kv_tokens

    def step_time(self, batch_size: int, num_tokens: int, kv_tokens: int) -> float:
        return self.non_attention_time(batch_size, num_tokens) + self.attention_time(kv_tokens)

    def decode_step_time(self, batch_size: int, kv_tokens: int) -> float:
        """A pure decode step: one new token per sequence."""
        return self.step_time(batch_size, batch_size, kv_tokens)

    def predict(self, sample: ProfileSample) -> float:
        return self.step_time(sample.batch_size, sample.num_tokens, sample.kv_tokens)

    # ----------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, samples: Sequence[ProfileSample], source: str = "profile") -> "PerfModel":
        """Fit the four coefficients to measured steps by non-negative least squares.

        Residuals are weighted by 1/measured time, i.e. the fit minimises *relative* error, so
        millisecond decode steps count as much as long prefill steps. Samples should vary batch
        size, tokens and KV tokens independently enough to separate the terms.
        """
        samples = list(samples)
        if len(samples) < len(_COEFFICIENTS):
            raise ValueError(f"PerfModel.fit needs at least {len(_COEFFICIENTS)} samples, got {len(samples)}")
        for s in samples:
            if not isinstance(s, ProfileSample):
                raise TypeError(f"PerfModel.fit takes ProfileSample objects, got {type(s).__name__}")
        design = np.array([_features(s.batch_size, s.num_tokens, s.kv_tokens) for s in samples], dtype=float)
        measured = np.array([s.step_time_s for s in samples], dtype=float)
        weighted = design / measured[:, None]
        # Scale columns to unit norm so the active-set tolerances mean the same for every term
        # (KV-token counts are ~1e6 where the constant column is 1).
        norms = np.linalg.norm(weighted, axis=0)
        usable = norms > 0
        scaled = np.zeros_like(weighted)
        scaled[:, usable] = weighted[:, usable] / norms[usable]
        coef = np.zeros(len(_COEFFICIENTS))
        coef[usable] = nnls(scaled[:, usable], np.ones(len(samples)))
        coef[usable] /= norms[usable]
        predicted = design @ coef
        relative_rmse = float(np.sqrt(np.mean(((predicted - measured) / measured) ** 2)))
        metadata = {
            "source": source,
            "num_samples": len(samples),
            "batch_size_range": [min(s.batch_size for s in samples), max(s.batch_size for s in samples)],
            "num_tokens_range": [min(s.num_tokens for s in samples), max(s.num_tokens for s in samples)],
            "kv_tokens_range": [min(s.kv_tokens for s in samples), max(s.kv_tokens for s in samples)],
            "step_time_s_range": [float(measured.min()), float(measured.max())],
        }
        return cls(*(float(max(c, 0.0)) for c in coef), fit_relative_rmse=relative_rmse, metadata=metadata)

    @classmethod
    def from_hardware(cls, hw: HardwareSpec, model: ModelSpec, tensor_dtype_bytes: int = 2,
                      tensor_parallel: int = 1) -> "PerfModel":
        """Roofline model of `model` on `tensor_parallel` GPUs of kind `hw`.

        - t_fixed: read all weights once from HBM (the decode floor);
        - t_per_token: 2 FLOPs per parameter per token at peak (the compute-bound slope). Adding
          the two instead of taking their max overestimates by at most 2x at the crossover;
        - t_per_seq: 0 (a roofline has no per-sequence overhead; profiling finds it);
        - t_per_kv_token: the larger of reading one token's K and V from HBM and the FLOPs of
          one query attending to it (reading dominates for decode).
        Tensor parallelism multiplies bandwidth and FLOPs; its communication is not modelled.
        """
        _check_positive_int("tensor_parallel", tensor_parallel)
        bandwidth = hw.hbm_bandwidth_Bps * tensor_parallel
        flops = hw.peak_flops * tensor_parallel
        kv_read = model.kv_bytes_per_token(tensor_dtype_bytes) / bandwidth
        kv_compute = model.attention_flops_per_kv_token() / flops
        return cls(
            t_fixed=model.weight_bytes(tensor_dtype_bytes) / bandwidth,
            t_per_token=2 * model.num_params / flops,
            t_per_seq=0.0,
            t_per_kv_token=max(kv_read, kv_compute),
            metadata={
                "source": "roofline",
                "hardware": asdict(hw),
                "model": asdict(model),
                "tensor_dtype_bytes": tensor_dtype_bytes,
                "tensor_parallel": tensor_parallel,
            },
        )

    # ----------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "coefficients": {name: getattr(self, name) for name in _COEFFICIENTS},
            "fit_relative_rmse": self.fit_relative_rmse,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PerfModel":
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a perf model (expected format {_FORMAT!r})")
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported perf model version {data.get('version')!r} (expected {_FORMAT_VERSION})")
        coefficients = data.get("coefficients")
        if not isinstance(coefficients, dict):
            raise ValueError("perf model has no 'coefficients' object")
        missing = [name for name in _COEFFICIENTS if name not in coefficients]
        if missing:
            raise ValueError(f"perf model is missing coefficients: {', '.join(missing)}")
        return cls(
            **{name: coefficients[name] for name in _COEFFICIENTS},
            fit_relative_rmse=data.get("fit_relative_rmse"),
            metadata=dict(data.get("metadata") or {}),
        )

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "PerfModel":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


# --------------------------------------------------------------------------- helpers
def _features(batch_size: int, num_tokens: int, kv_tokens: int) -> list[float]:
    # The constant term applies only when a forward pass runs (see non_attention_time).
    return [1.0 if num_tokens > 0 else 0.0, float(num_tokens), float(batch_size), float(kv_tokens)]


def _check_step_shape(batch_size: int, num_tokens: int, kv_tokens: int) -> None:
    _check_non_negative_int("batch_size", batch_size)
    _check_non_negative_int("num_tokens", num_tokens)
    _check_non_negative_int("kv_tokens", kv_tokens)
    if num_tokens < batch_size:
        raise ValueError(f"num_tokens ({num_tokens}) < batch_size ({batch_size}): every sequence processes >= 1 token")
    if batch_size == 0 and num_tokens > 0:
        raise ValueError(f"num_tokens ({num_tokens}) > 0 with batch_size 0")


def _check_non_negative_int(name: str, value: int) -> None:
    if type(value) is int and value >= 0:  # fast path: the rebalancer calls this a lot
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


__all__ = [
    "HARDWARE_PRESETS",
    "MODEL_PRESETS",
    "HardwareSpec",
    "ModelSpec",
    "PerfModel",
    "ProfileSample",
    "kv_token_capacity",
    "nnls",
]


def default_perf_model(num_parameters: int = 3_000_000, kv_bytes_per_token: int = 16_384) -> PerfModel:
    """A rough CPU model used until a profile is loaded: weight reads dominate non-attention time,
    attention costs grow with KV read. Only the ratios matter to the rebalancer's decisions."""
    bandwidth = 10e9  # bytes/s, order of a CPU's memory bandwidth
    return PerfModel(
        t_fixed=4 * num_parameters / bandwidth,
        t_per_token=2 * num_parameters / 50e9,
        t_per_seq=20e-6,
        t_per_kv_token=kv_bytes_per_token / bandwidth,
    )
