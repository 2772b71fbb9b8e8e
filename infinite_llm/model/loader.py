"""Load Llama-family HF checkpoints (config.json + safetensors) from a local folder. Never downloads.

Reads both config.json conventions: transformers 4's top-level `rope_theta` / `rope_scaling` and
transformers 5's `rope_parameters` (which carries rope_theta and the scaling type together).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from infinite_llm.config import ModelConfig
from infinite_llm.model.llama import SUPPORTED_ROPE_TYPES, LlamaForCausalLM, compute_inv_freq, rope_type_of

logger = logging.getLogger(__name__)

# architecture -> model_type
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCH_BY_MODEL_TYPE = {model_type: arch for arch, model_type in SUPPORTED_ARCHITECTURES.items()}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

INDEX_FILE = "model.safetensors.index.json"


def resolve_model_path(model: str | Path) -> Path:
    """"default" -> the built-in checkpoint (written on first use); otherwise an existing local folder."""
    if str(model) == "default":
        from infinite_llm.model.default_model import ensure_default_model

        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {str(model)!r} does not exist; pass 'default' or a local HF checkpoint "
            "folder (models are never downloaded)"
        )
    return path


def _read_config_json(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; an HF checkpoint folder needs a config.json")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    return raw


def _architecture(raw: dict[str, Any], where: Path) -> str:
    archs = raw.get("architectures") or []
    if archs:
        arch = archs[0]
    elif raw.get("model_type") in _ARCH_BY_MODEL_TYPE:
        arch = _ARCH_BY_MODEL_TYPE[raw["model_type"]]
    else:
        arch = f"model_type={raw.get('model_type')!r}"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch} in {where}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _rope(raw: dict[str, Any], where: Path) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) from either config.json convention."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"rope_parameters in {where} must be an object, got {params!r}")
    params = dict(params or {})
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = dict(raw.get("rope_scaling") or {}) or params
    scaling.pop("rope_theta", None)
    rope_type = rope_type_of(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling {rope_type!r} in {where}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return float(theta), (scaling if rope_type != "default" else None)


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or every *.safetensors file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    legacy = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
    hint = (
        f" (found {', '.join(sorted(legacy))}: only safetensors weights are supported; convert them, e.g. "
        "load with transformers and save_pretrained(safe_serialization=True))"
        if legacy else ""
    )
    raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint}")


def _attention_biases(model_type: str, raw: dict[str, Any]) -> tuple[bool, bool]:
    """(q/k/v projections have a bias, o_proj has one) as transformers builds each architecture."""
    if model_type == "qwen2":
        return True, False  # always on q/k/v, never on o_proj, whatever the config says
    if model_type == "llama":
        bias = bool(raw.get("attention_bias", False))
        return bias, bias  # LlamaAttention gives all four projections bias=attention_bias
    return False, False  # MistralAttention has no bias and ignores attention_bias


def load_model_config(path: str | Path) -> ModelConfig:
    """Read config.json of a Llama / Mistral / Qwen2 checkpoint folder into a ModelConfig.

    Also checks the weights are present, so a folder that cannot be served fails here, early.
    """
    folder = Path(path)
    raw = _read_config_json(folder)
    where = folder / "config.json"
    arch = _architecture(raw, where)
    model_type = SUPPORTED_ARCHITECTURES[arch]
    qkv_bias, o_bias = _attention_biases(model_type, raw)
    if raw.get("mlp_bias"):
        raise ValueError(f"mlp_bias=true in {where} is not supported")
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"unsupported hidden_act {hidden_act!r} in {where}; only 'silu' is implemented")
    if model_type == "qwen2" and raw.get("use_sliding_window"):
        raise ValueError(f"sliding-window attention (use_sliding_window=true) in {where} is not supported")
    sliding = raw.get("sliding_window")
    if model_type == "mistral" and sliding is not None:
        logger.warning(
            "%s sets sliding_window=%s; attention here is over the full context, which matches "
            "the checkpoint only for sequences of at most %s tokens", where, sliding, sliding,
        )
    theta, scaling = _rope(raw, where)
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        config = ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw["head_dim"]) if raw.get("head_dim") else None,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=hidden_act,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            model_type=model_type,
            architecture=arch,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )
    except KeyError as exc:
        raise ValueError(f"{where} lacks the required field {exc.args[0]!r}") from exc
    compute_inv_freq(config)  # validates the rope-scaling parameters now rather than at first use
    find_weight_files(folder)
    return config


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """A read-only name -> tensor view over a checkpoint's safetensors files.

    Tensors are read one at a time on access, so loading never holds a second full copy of the
    weights in memory.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where: dict[str, int] = {}
        for i, (handle, f) in enumerate(zip(self._handles, files)):
            for name in handle.keys():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in more than one weight file (again in {f.name})")
                self._where[name] = i

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_weights(model: LlamaForCausalLM, path: str | Path) -> None:
    """Copy a checkpoint folder's safetensors weights (single file or sharded) into `model`."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    model.load_hf_state_dict(SafetensorsCheckpoint(find_weight_files(folder)))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; choose float32, bfloat16 or float16") from None


def _default_dtype(config: ModelConfig, device: str) -> torch.dtype:
    # The checkpoint's half-precision dtype on accelerators; float32 on the CPU, where half
    # precision matmuls are slow and tests compare against float32 references.
    if torch.device(device).type == "cpu":
        return torch.float32
    try:
        return parse_dtype(config.torch_dtype)
    except ValueError:
        return torch.float32


def load_model(model: str, device: str = "cpu", dtype: str | None = None) -> tuple[ModelConfig, LlamaForCausalLM]:
    """Config and weights of `model` ("default" or a local checkpoint folder) on `device` in `dtype`."""
    path = resolve_model_path(model)
    config = load_model_config(path)
    target_dtype = parse_dtype(dtype) if dtype not in (None, "auto") else _default_dtype(config, device)
    # Build on the meta device (no random init, no memory), then allocate once on the target.
    with torch.device("meta"):
        net = LlamaForCausalLM(config)
    net = net.to(dtype=target_dtype).to_empty(device=device)
    load_weights(net, path)
    net.eval()
    return config, net
