"""Run an instance's set-up (model load, KV cache allocation) on a short-lived thread.

torch's CPU ops start an OpenMP thread pool for each thread that calls them, and the pool lives
as long as that thread. When the pools of a process hold more threads than there are cores,
libgomp stops spinning between parallel regions, so every region of an instance's step (a few
per layer) waits for its workers to be woken by the kernel. Setting an instance up on the
caller's thread (the main thread, the API server's engine thread, a Ray actor's thread) leaves
such a pool behind for good: measured on 2 cores, one instance's decode step took a third longer
(15.5 vs 11.6 ms per token, `benchmarks/bench_engine_step.py`). Set up on a thread that exits,
the pool goes with it, and the instance's step thread has the cores' pool to itself.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_on_scratch_thread(fn: Callable[[], T], name: str = "instance-setup") -> T:
    """fn() on a new thread that exits when it returns; its result, or its exception re-raised."""
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]
