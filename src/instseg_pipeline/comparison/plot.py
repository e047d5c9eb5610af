"""The comparison figure: mask AP against images/s, one labelled point per model and
backend (matplotlib, imported lazily; built without pyplot, so no GUI backend)."""
from __future__ import annotations

import math

import pandas as pd

EAGER, ONNX = "o", "^"  # marker per backend


def _finite(value) -> bool:
    return value is not None and not math.isnan(float(value))


def comparison_plot(table: pd.DataFrame):
    """A Figure of ``mAP`` (y) against ``fps`` and ``fps_onnx`` (x, log scale) of each row
    of a comparison table; a model's two points share a colour and a line."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import ScalarFormatter

    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.subplots()
    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    for index, row in enumerate(table.itertuples()):
        ap = row.mAP if _finite(row.mAP) else 0.0
        color = cycle[index % len(cycle)]
        xs = [x for x in (row.fps, row.fps_onnx) if _finite(x)]
        if len(xs) == 2:
            ax.plot(xs, [ap, ap], color=color, lw=0.8, alpha=0.6)
        if _finite(row.fps):
            ax.scatter([row.fps], [ap], marker=EAGER, color=color, s=50, zorder=3)
        if _finite(row.fps_onnx):
            ax.scatter([row.fps_onnx], [ap], marker=ONNX, color=color, s=60, zorder=3)
        if xs:
            # alternate above / below: models of equal AP and similar speed stay readable
            ax.annotate(row.model, (min(xs), ap), textcoords="offset points",
                        xytext=(4, 6 if index % 2 == 0 else -12), fontsize=8, color=color)
    if any(_finite(x) and float(x) > 0 for x in (*table["fps"], *table["fps_onnx"])):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("images / s (batch 1, CPU)")
    ax.set_ylabel("mask AP (val)")
    ax.set_title("Model families: accuracy against speed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=[Line2D([], [], marker=EAGER, ls="", color="0.3", label="eager torch"),
                       Line2D([], [], marker=ONNX, ls="", color="0.3", label="ONNX Runtime")],
              loc="best", fontsize=8)
    return figure
