"""Which model files an instance loads, on whatever host it runs (no shared cache assumed).

The driver resolves the model spec and fingerprints the folder; each instance resolves the same
spec on its own host ("default" is rebuilt there, deterministically; an HF checkpoint must be at
the same path, e.g. a shared mount) and refuses to start unless its fingerprint matches, so two
hosts can never serve different weights under one model name.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from infinite_llm.model.loader import resolve_model_path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def fingerprint(folder: Path) -> str:
    """sha256 over config.json's bytes and the name and size of every weight file (reading
    gigabytes of weights at start-up would cost more than it protects against)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.suffix in _WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def resolve_on_this_host(spec: str, expected_fingerprint: str) -> Path:
    """The local folder for `spec`, checked against the driver's fingerprint (clear error if the
    folder is missing or holds different files on this host)."""
    host = socket.gethostname()
    try:
        folder = resolve_model_path(spec)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"host {host}: {exc}. Every host needs the model at the same path (a shared mount), or "
            "use the built-in 'default' model, which each host builds itself"
        ) from exc
    found = fingerprint(folder)
    if found != expected_fingerprint:
        raise RuntimeError(
            f"host {host}: the model files at {folder} differ from the driver's (fingerprint "
            f"{found[:12]} vs {expected_fingerprint[:12]}); every host must hold the same checkpoint"
        )
    return folder
