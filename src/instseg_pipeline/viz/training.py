"""Training figures (matplotlib, imported lazily; figures are built without pyplot, so no
GUI backend): a preview of augmented samples and the loss / learning-rate curves."""
from __future__ import annotations

import math

import numpy as np

from instseg_pipeline.viz.overlays import _COLORS, overlay_masks


def _draw_sample(ax, image, target: dict, label_names: dict) -> None:
    """One augmented sample on ``ax``: masks tinted, boxes outlined, class names written."""
    from matplotlib.patches import Rectangle

    picture = overlay_masks(image.permute(1, 2, 0).numpy(), target["masks"].numpy())
    ax.imshow(picture.clip(0, 1))
    for k, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist())):
        color = _COLORS[k % len(_COLORS)]
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=1.2))
        ax.text(x1, y1, label_names.get(label, str(label)), color="white", fontsize=6,
                va="bottom", bbox={"facecolor": color, "pad": 1, "lw": 0})
    ax.set_title(f"image {target['image_id']}", fontsize=7)
    ax.axis("off")


def augmentation_preview(dataset, n: int = 8, seed: int = 0, columns: int = 4):
    """A matplotlib Figure of ``n`` augmented samples of an `InstanceDataset` (masks + boxes).

    ``seed`` picks which samples; their augmentation follows the dataset's seed and epoch.
    """
    from matplotlib.figure import Figure

    count = min(n, len(dataset))
    indices = np.random.default_rng(seed).choice(len(dataset), size=count, replace=False)
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(3 * columns, 3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, index in zip(axes, indices):
        image, target = dataset[int(index)]
        _draw_sample(ax, image, target, getattr(dataset, "label_names", {}))
    for ax in axes[count:]:
        ax.axis("off")
    return figure


def training_curves(history, val_history=None):
    """Loss components (log scale) and learning rate against iterations; validation loss
    per epoch as markers. ``history``: the engine's per-iteration table."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    losses, rate = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    columns = [c for c in history.columns if c.startswith("loss")]
    window = max(1, len(history) // 50)  # a light moving average keeps trends readable
    for column in columns:
        smooth = history[column].rolling(window, min_periods=1).mean()
        losses.plot(history["iteration"], smooth, label=column,
                    linewidth=2.2 if column == "loss" else 1.2)
    if val_history is not None and len(val_history) and "loss" in val_history:
        losses.plot(val_history["iteration"], val_history["loss"], "ko--", label="val loss")
    losses.set(yscale="log", xlabel="iteration", ylabel="loss",
               title=f"training losses (moving average over {window} iterations)")
    losses.legend(fontsize=8)
    rate.plot(history["iteration"], history["lr"])
    rate.set(xlabel="iteration", ylabel="learning rate", title="schedule (warmup, steps)")
    return fig
