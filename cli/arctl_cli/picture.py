"""A per-layer bar picture of a plan's true bits, as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot
from matplotlib.figure import Figure

from arctl.atomic import atomic_write_bytes
from arctl.plan import Plan


def plan_bars_png(plan: Plan, path: Path) -> Path:
    """One bar per layer (model order), height = true bits per weight, colour = scheme; written
    through a temporary file."""
    names = sorted({layer.scheme.name for layer in plan.layers}, key=lambda n: min(
        layer.bits.per_weight for layer in plan.layers if layer.scheme.name == n))
    colours = {name: pyplot.get_cmap("viridis")(i / max(len(names) - 1, 1)) for i, name in enumerate(names)}
    figure, axes = pyplot.subplots(figsize=(max(8, len(plan.layers) / 12), 3.5), dpi=120)
    for index, layer in enumerate(plan.layers):
        axes.bar(index, layer.bits.per_weight, color=colours[layer.scheme.name], width=0.9)
    for name in names:
        axes.bar(0, 0, color=colours[name], label=name)
    axes.axhline(plan.avg_bits, color="black", linewidth=0.8, linestyle="--", label=f"average {plan.avg_bits:.3f}")
    axes.set_xlabel("layer (model order)")
    axes.set_ylabel("true bits / weight")
    axes.set_title(f"{plan.model_id}: {len(plan.layers)} layers")
    axes.legend(loc="upper right", fontsize=7, ncol=min(len(names) + 1, 6))
    figure.tight_layout()
    return write_figure_png(figure, Path(path))


def write_figure_png(figure: Figure, path: Path) -> Path:
    """Save ``figure`` as PNG at ``path`` through a temporary file, then close it."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png")
    finally:
        pyplot.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path
