"""Pieces shared by the benchmark front ends (`bench`, `profile`, `simulate`).

Why a module of its own: those three CLIs parsed the same kinds of list arguments, built their
traces with the same checks and wrote their results the same way, each with a copy of the code.
Only what is really the same lives here; their options keep their own names, defaults and help
texts (they differ between the CLIs, and users and tests rely on them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from infinite_llm.bench.workloads import TraceRequest, make_trace, paper_workloads


def positive_int_list(text: str) -> list[int]:
    """argparse type: "1,4,16" -> [1, 4, 16]; every value must be >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def comma_separated_subset(choices: Sequence[str], *, reject_repeats: bool) -> Callable[[str], list[str]]:
    """argparse type: "a,b" -> ["a", "b"], each one of `choices`.

    `reject_repeats` makes a value listed twice a parse error; without it a repeat is left for
    the caller to refuse (the offline benchmark does, with its own message).
    """
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        repeated = reject_repeats and len(set(values)) != len(values)
        if not values or unknown or repeated:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return values

    return parse


def build_workload_trace(scale: str, workload: str, num_requests: int, request_rate: float,
                         seed: int) -> list[TraceRequest]:
    """The `workload` trace of `paper_workloads(scale)` with the given size, arrival rate and seed.

    The errors name the CLI options the values come from.
    """
    specs = paper_workloads(scale)
    if workload not in specs:
        raise ValueError(f"unknown workload {workload!r}; choose from {sorted(specs)}")
    if num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0, got {request_rate}")
    spec = dataclasses.replace(specs[workload], num_requests=num_requests, request_rate=request_rate, seed=seed)
    return make_trace(spec)


def ensure_parent_dir(path: str | Path) -> Path:
    """`path` as a Path, with its folder created if missing (results go to fresh folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` as JSON with a one-space indent (the result files' format), creating the
    folder. Returns the path."""
    path = ensure_parent_dir(path)
    path.write_text(json.dumps(payload, indent=1))
    return path


__all__ = [
    "positive_int_list",
    "comma_separated_subset",
    "build_workload_trace",
    "ensure_parent_dir",
    "write_json",
]
