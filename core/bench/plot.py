"""PNG charts of serve results: each latency metric's percentiles, and throughput, against load."""

from __future__ import annotations

from typing import Any, Sequence


def _x_axis(summaries: Sequence[dict[str, Any]]) -> tuple[str, list[float]]:
    concurrencies = {s["max_concurrency"] for s in summaries}
    rates = {s["request_rate"] for s in summaries}
    if len(concurrencies) > 1 and len(rates) == 1 and None not in concurrencies:
        return "max concurrency", [s["max_concurrency"] for s in summaries]
    if len(rates) > 1 and len(concurrencies) == 1 and "inf" not in rates:
        return "request rate (req/s)", [s["request_rate"] for s in summaries]
    # Both or neither swept: the load actually achieved is the one comparable axis.
    return "achieved request throughput (req/s)", [s["request_throughput"] for s in summaries]


def plot_serve(series: dict[str, Sequence[dict[str, Any]]], path: str) -> None:
    """Write a PNG to ``path``: per series (name -> run summaries), TTFT, TPOT, ITL and E2EL
    percentiles and output throughput against load."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)"), ("itl", "ITL (ms)"), ("e2el", "end-to-end latency (ms)")]
    styles = ["-", "--", ":", "-."]
    xlabel, ticks = "load", set()
    # One colour per series, one line style per percentile, so two servers read apart at a glance.
    for colour, (name, summaries) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], series.items()):
        summaries = list(summaries)
        xlabel, xs = _x_axis(summaries)
        ticks.update(xs)
        for ax, (metric, title) in zip(axes.flat, panels):
            keys = [k for k in summaries[0][f"{metric}_ms"] if k.startswith("p")]
            for style, key in zip(styles * len(keys), keys):
                ax.plot(xs, [s[f"{metric}_ms"][key] for s in summaries], style, color=colour, marker="o",
                        label=f"{name} {key}")
            ax.set_title(title)
        axes.flat[4].plot(xs, [s["output_throughput"] for s in summaries], color=colour, marker="o", label=name)
        axes.flat[5].plot(xs, [s["request_throughput"] for s in summaries], color=colour, marker="o", label=name)
    axes.flat[4].set_title("output tokens/s")
    axes.flat[5].set_title("requests/s")
    for ax in axes.flat:
        ax.set_xlabel(xlabel)
        if xlabel == "max concurrency":
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
