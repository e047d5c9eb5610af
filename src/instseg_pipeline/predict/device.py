"""The one device rule, for training, batch prediction, the predictor and SAM."""
from __future__ import annotations

import os


def local_rank() -> int:
    """This process's rank on its node, from the launcher's LOCAL_RANK (0 when absent).

    The one reading of LOCAL_RANK: `engine.distributed` imports it from here, since
    prediction must not import the engine.
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str = "auto", setting: str = "device"):
    """``torch.device`` for ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or any torch device).

    ``auto``: CUDA when present, else CPU. ``auto`` and a bare ``cuda`` mean this process's
    GPU (LOCAL_RANK under DDP, else GPU 0); ``cuda:N`` is taken as given. Asking for CUDA
    without it, or a name torch does not know, raises ValueError naming ``setting`` (the
    option or parameter the name came from).
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{setting} {name!r} is not a device: use auto, cpu or cuda[:N] "
                         f"({exc})") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"{setting} is {name!r} but CUDA is not available; use auto or cpu")
    return device if device.index is not None else torch.device("cuda", local_rank())
