"""Plots for the offline policy benchmark (matplotlib, Agg backend: no display needed).

One column per policy; the top row is generation throughput over time, the bottom row each
instance's KV memory utilisation over time. Axes are shared along rows so the policies can be
compared at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from infinite_llm.bench.offline import PolicyResult


def throughput_series(result: "PolicyResult", num_bins: int = 40) -> tuple[list[float], list[float]]:
    """(bin centres in s, generated tokens/s in each bin) from a result's step timeline."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if not result.timeline or result.elapsed_s <= 0:
        return [], []
    width = result.elapsed_s / num_bins
    tokens = [0] * num_bins
    for sample in result.timeline:
        index = min(num_bins - 1, int(sample.t / width))
        tokens[index] += sample.generated_tokens
    centres = [(i + 0.5) * width for i in range(num_bins)]
    return centres, [n / width for n in tokens]


def plot_policies(results: Sequence["PolicyResult"], path: str | Path, title: str = "") -> Path:
    """Write a PNG with throughput and per-instance memory utilisation over time, one panel
    column per policy. Returns the path written."""
    if not results:
        raise ValueError("nothing to plot: no policy results")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(results)
    # Shared axes: the same time scale and the same y range make the panels comparable.
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.0), sharex=True, sharey="row", squeeze=False)
    for col, result in enumerate(results):
        top, bottom = axes[0][col], axes[1][col]
        centres, rates = throughput_series(result)
        top.plot(centres, rates, color="tab:blue")
        top.set_title(
            f"{result.policy}: {result.generated_tokens_per_s:.0f} gen tok/s\n"
            f"{result.num_completed} done, {result.num_rejected} rejected"
        )
        top.set_xlabel("time (s)")
        top.grid(alpha=0.3)
        times = [s.t for s in result.timeline]
        total = max(1, result.blocks_per_instance)
        num_instances = len(result.timeline[0].blocks_used) if result.timeline else 0
        for i in range(num_instances):
            util = [s.blocks_used[i] / total for s in result.timeline]
            bottom.plot(times, util, label=f"instance {i}", linewidth=1.0)
        bottom.set_ylim(0.0, 1.05)
        bottom.set_xlabel("time (s)")
        bottom.grid(alpha=0.3)
        if num_instances:
            bottom.legend(fontsize="x-small", loc="lower right")
    axes[0][0].set_ylabel("generated tokens/s")
    axes[1][0].set_ylabel("KV memory utilisation")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["plot_policies", "throughput_series"]
