"""Training-history figures: the loss curve and one panel per other metric, written as a PNG.

The trainer's tracker keeps every metric it logged as ``{name: [(step, value), ...]}`` and calls
``plot_history`` to attach a picture of the run to MLflow. Drawing uses matplotlib's object API with
the Agg canvas (no pyplot, no global backend switch), so it works on headless nodes and from any
thread.

    plot_history({"train/loss": [(10, 2.3), (20, 1.9)], "eval/hr_at_10": [(20, 0.05)]}, "history.png")
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Panels per row; more metrics wrap onto further rows.
MAX_COLUMNS = 3

SKIPPED_METRICS = ("epoch", "num_users")


def panel_layout(history: dict[str, list[tuple[int, float]]]) -> list[tuple[str, list[str]]]:
    """Group metric names into panels: ``[(title, [metric names]), ...]``.

    Every name containing "loss" (train and eval loss) shares the first panel, titled "loss" (or
    the name when there is only one), so the curves can be compared on one axis. Other metrics are
    grouped by what follows their prefix, so ``valid/hr_at_10`` and ``test/hr_at_10`` share a panel
    titled ``hr_at_10``; a metric alone keeps its full name as title. Bookkeeping series (``*/epoch``,
    ``*/num_users``) and metrics without any points are left out.
    """
    names = sorted(name for name, points in history.items() if points)
    loss_names = [name for name in names if "loss" in name.lower()]
    panels: list[tuple[str, list[str]]] = []
    if loss_names:
        panels.append((loss_names[0] if len(loss_names) == 1 else "loss", loss_names))
    groups: dict[str, list[str]] = {}
    for name in names:
        metric = name.split("/", 1)[-1]
        if name in loss_names or metric in SKIPPED_METRICS:
            continue
        groups.setdefault(metric, []).append(name)
    panels += [(members[0] if len(members) == 1 else metric, members) for metric, members in groups.items()]
    return panels


def plot_history(history: dict[str, list[tuple[int, float]]], path: str | os.PathLike) -> Path:
    """Draw ``history`` (metric name -> [(step, value), ...]) into the PNG ``path``; return the path.

    Raises ``ValueError`` when no metric has any point, since an empty figure would hide that the
    trainer logged nothing.
    """
    panels = panel_layout(history)
    if not panels:
        raise ValueError("plot_history: the history holds no metric points; log metrics before plotting")
    num_cols = min(MAX_COLUMNS, len(panels))
    num_rows = math.ceil(len(panels) / num_cols)
    fig = Figure(figsize=(4.5 * num_cols, 3.2 * num_rows), layout="constrained")
    FigureCanvasAgg(fig)
    for index, (title, names) in enumerate(panels):
        ax = fig.add_subplot(num_rows, num_cols, index + 1)
        for name in names:
            points = sorted(history[name])
            steps = [step for step, _ in points]
            values = [value for _, value in points]
            # A metric logged once (e.g. a single eval) is invisible as a line; draw its point.
            ax.plot(steps, values, label=name, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
