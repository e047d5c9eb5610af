"""Pretrained weights: torchvision names served from the local cache, or checkpoint files.

Nothing is downloaded: a torchvision weights name works only when its file already sits in
torch's hub cache (``$TORCH_HOME/hub/checkpoints``). When the checkpoint's class count
differs from the model's, the box and mask predictors are left freshly initialised (the
torchvision fine-tuning recipe) and everything else is loaded. A model may name heads that a
detection checkpoint lacks (``optional_state_prefixes``, e.g. Panoptic FPN's semantic
branch): a checkpoint without any of their keys leaves them fresh.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
)

from instseg_pipeline.models.torch_files import (
    UnreadableFileError,
    UnsafeFileError,
    load_weights_only,
)

logger = logging.getLogger(__name__)

WEIGHT_ENUMS = {"maskrcnn_resnet50_fpn": MaskRCNN_ResNet50_FPN_Weights,
                "maskrcnn_resnet50_fpn_v2": MaskRCNN_ResNet50_FPN_V2_Weights,
                "maskrcnn_mobilenet_v3_large_fpn": FasterRCNN_MobileNet_V3_Large_FPN_Weights,
                # Mask R-CNN's COCO weights: everything but the semantic branch
                "panoptic_fpn_resnet50": MaskRCNN_ResNet50_FPN_Weights}
CLASS_KEY = "roi_heads.box_predictor.cls_score.weight"
PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")
# a detection-only checkpoint (MobileNet's COCO weights) has no mask branch
MASK_BRANCH_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
# a model attribute: state_dict prefixes of heads a detection checkpoint may lack
OPTIONAL_PREFIXES_ATTRIBUTE = "optional_state_prefixes"


class WeightsError(ValueError):
    """Weights that cannot be found, read or fitted to the model; the message says why."""


def torchvision_weights(model_name: str, weights: str):
    """The torchvision weights enum member named ``weights``, or None when it is not one."""
    enum = WEIGHT_ENUMS.get(model_name)
    if enum is None:
        return None
    try:
        return enum.verify(weights)
    except KeyError:
        return None


def cached_weights_path(member) -> Path:
    """Where torch's hub cache keeps the file of a torchvision weights enum member."""
    filename = os.path.basename(urlparse(member.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _resolve_path(model_name: str, weights: str) -> tuple[Path, object]:
    """(file to load, torchvision member or None) for a weights parameter."""
    path = Path(weights).expanduser()
    if path.is_file():
        return path, None
    member = torchvision_weights(model_name, weights)
    if member is None:
        raise WeightsError(
            f"weights {weights!r} for {model_name}: no such file, and not a torchvision weights "
            f"name for this model ({_known_names(model_name)})")
    cached = cached_weights_path(member)
    if not cached.is_file():
        raise WeightsError(
            f"weights {weights!r} ({member}) are not in the local torch cache ({cached}) and "
            "cannot be downloaded here; pass a local checkpoint path as weights instead")
    return cached, member


def _known_names(model_name: str) -> str:
    enum = WEIGHT_ENUMS.get(model_name)
    if enum is None:
        return "it has none"
    return "one of " + ", ".join(enum.__members__)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model state_dict in ``path``: a raw state_dict or a dict with a "model" entry."""
    try:
        loaded = load_weights_only(path, "weights file")
    except UnsafeFileError as exc:
        raise WeightsError(str(exc)) from None
    except (UnreadableFileError, OSError) as exc:
        raise WeightsError(f"weights file {path}: cannot be read ({exc})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not (isinstance(loaded, Mapping) and loaded
            and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise WeightsError(f"weights file {path}: holds neither a state_dict nor a dict with "
                           "a 'model' state_dict")
    return strip_prefix(dict(loaded), "module.")


def strip_prefix(state: dict, prefix: str) -> dict:
    """Drop the DistributedDataParallel ``module.`` prefix when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, model_name: str, weights: str) -> str:
    """Load ``weights`` (file path or torchvision name) into ``model``; return what was loaded."""
    path, member = _resolve_path(model_name, str(weights))
    state = read_state_dict(path)
    allowed_missing = MASK_BRANCH_PREFIXES if model_name == "maskrcnn_mobilenet_v3_large_fpn" \
        and not any(k.startswith(MASK_BRANCH_PREFIXES) for k in state) else ()
    optional = tuple(getattr(model, OPTIONAL_PREFIXES_ATTRIBUTE, ()))
    if optional and not any(k.startswith(optional) for k in state):
        logger.info("%s has no %s: left freshly initialised", path, ", ".join(optional))
        allowed_missing = (*allowed_missing, *optional)
    fit_state_dict(model, state, allowed_missing, source=str(path))
    return str(member or path)


def checkpoint_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Number of classes (background included) of a detection state_dict, if it says."""
    weight = state.get(CLASS_KEY)
    return None if weight is None else int(weight.shape[0])


def fit_state_dict(model: nn.Module, state: dict, allowed_missing: tuple[str, ...] = (),
                   source: str = "state_dict") -> None:
    """Load ``state`` strictly, except predictors of another class count (left fresh)."""
    model_classes, state_classes = checkpoint_classes(model.state_dict()), checkpoint_classes(state)
    if state_classes is not None and state_classes != model_classes:
        logger.info("%s has %d classes, the model %s: fresh box and mask predictors",
                    source, state_classes, model_classes)
        state = {k: v for k, v in state.items() if not k.startswith(PREDICTOR_PREFIXES)}
        allowed_missing = (*allowed_missing, *PREDICTOR_PREFIXES)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"{source} does not fit the model: {exc}") from None
    missing = [k for k in missing if not k.startswith(allowed_missing)]
    if missing or unexpected:
        raise WeightsError(f"{source} does not fit the model: missing keys {missing[:5]} "
                           f"({len(missing)}), unexpected keys {unexpected[:5]} "
                           f"({len(unexpected)})")
