"""Deterministic train / val split by image id."""
from __future__ import annotations

import hashlib

import pandas as pd


def _unit_interval(image_id: int, seed: int) -> float:
    # A hash rather than a shuffle: an image keeps its split when others are added or removed.
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(images: pd.DataFrame, val_fraction: float, seed: int = 0) -> pd.DataFrame:
    """Keep the source's split where every image has one; otherwise hash image ids.

    An image goes to ``val`` when its hashed id falls below ``val_fraction``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    has_split = images["split"].fillna("").astype(str).str.len() > 0
    if len(images) and bool(has_split.all()):
        return images
    out = images.copy()
    out["split"] = ["val" if _unit_interval(int(i), seed) < val_fraction else "train"
                    for i in out["image_id"]]
    out["split"] = out["split"].astype("string")
    return out
