"""Model factories: ``build_model(params, num_classes)`` and its saved, rebuildable config.

``params`` (the ``model`` block of the training parameters)::

    name: maskrcnn_tiny | maskrcnn_resnet50_fpn | maskrcnn_resnet50_fpn_v2
          | maskrcnn_mobilenet_v3_large_fpn
    weights: null | DEFAULT | COCO_V1 | <full torchvision enum name> | path/to/checkpoint.pt
    trainable_backbone_layers: 3        # default 3 with weights, every stage without
    frozen_batchnorm: true              # default: with weights, except the v2 recipe
    min_size: 800                       # and any key of DETECTOR_KEYS (MaskRCNN arguments)

``num_classes`` counts the background. The builders never download: backbone weights are
None and torchvision weight names are read from the local torch cache only.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.ops.misc import FrozenBatchNorm2d

from instseg_pipeline.models import maskrcnn, tiny
from instseg_pipeline.models.weights import (
    WeightsError,
    load_weights,
    strip_prefix,
    torchvision_weights,
)

logger = logging.getLogger(__name__)

BUILDERS = {
    "maskrcnn_resnet50_fpn": maskrcnn.build_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": maskrcnn.build_resnet50_fpn_v2,
    "maskrcnn_mobilenet_v3_large_fpn": maskrcnn.build_mobilenet_v3_large_fpn,
    "maskrcnn_tiny": tiny.build_tiny,
}
DETECTOR_KEYS = (
    "min_size", "max_size", "image_mean", "image_std",
    "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test", "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh",
    "rpn_batch_size_per_image", "rpn_positive_fraction", "rpn_score_thresh",
    "box_score_thresh", "box_nms_thresh", "box_detections_per_img", "box_fg_iou_thresh",
    "box_bg_iou_thresh", "box_batch_size_per_image", "box_positive_fraction",
    "bbox_reg_weights",
)
ALIASES = {"roi_batch_size_per_image": "box_batch_size_per_image"}
MODEL_KEYS = ("name", "weights", "trainable_backbone_layers", "frozen_batchnorm",
              "frozen_bn_eps")
DEFAULT_NAME = "maskrcnn_tiny"

__all__ = ["BUILDERS", "WeightsError", "build_model", "load_model", "model_config"]


def _without_nulls(params: Mapping | None) -> dict:
    """``params`` less its null entries: null in the parameters means "the default"."""
    return {k: v for k, v in (params or {}).items() if v is not None}


def _detector_kwargs(params: Mapping) -> dict:
    """MaskRCNN keyword arguments from ``params`` (aliases resolved, lists as tuples)."""
    unknown = [k for k in params if k not in (*DETECTOR_KEYS, *ALIASES, *MODEL_KEYS)]
    if unknown:
        raise ValueError(f"unknown model parameters {unknown}; known: "
                         f"{sorted((*MODEL_KEYS, *DETECTOR_KEYS, *ALIASES))}")
    doubled = [k for k in ALIASES if k in params and ALIASES[k] in params]
    if doubled:
        raise ValueError(f"model parameters give both {doubled[0]} and its name "
                         f"{ALIASES[doubled[0]]}; keep one")
    kwargs = {ALIASES.get(k, k): v for k, v in params.items() if k not in MODEL_KEYS}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _eps_for(name: str, weights) -> float | None:
    """torchvision's original COCO weights were trained with FrozenBatchNorm eps 0."""
    if name != "maskrcnn_resnet50_fpn" or weights is None:
        return None
    member = torchvision_weights(name, str(weights))
    return 0.0 if member == MaskRCNN_ResNet50_FPN_Weights.COCO_V1 else None


def _spec(params: Mapping) -> dict:
    """Name, weights and the resolved backbone settings of ``params``."""
    name = params.get("name", DEFAULT_NAME)
    if name not in BUILDERS:
        raise ValueError(f"unknown model name {name!r}; use one of {sorted(BUILDERS)}")
    weights = params.get("weights")
    pretrained = weights is not None
    full = maskrcnn.MAX_TRAINABLE_LAYERS.get(name)
    layers = params.get("trainable_backbone_layers", None if full is None else
                        min(3, full) if pretrained else full)
    return {
        "name": name, "weights": weights,
        "trainable_backbone_layers": None if layers is None else int(layers),
        "frozen_batchnorm": bool(params.get(
            "frozen_batchnorm", pretrained and name != "maskrcnn_resnet50_fpn_v2")),
        "frozen_bn_eps": params.get("frozen_bn_eps", _eps_for(name, weights)),
    }


def _construct(spec: dict, num_classes: int, detector_kwargs: dict) -> MaskRCNN:
    model = BUILDERS[spec["name"]](num_classes, spec, detector_kwargs)
    if spec["frozen_bn_eps"] is not None:
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = float(spec["frozen_bn_eps"])
    return model


def build_model(params: Mapping | None, num_classes: int) -> nn.Module:
    """A Mask R-CNN for ``num_classes`` classes (background included) from ``params``.

    With ``weights`` the checkpoint is loaded; a different class count there leaves fresh
    box and mask predictors. Raises `WeightsError` for weights that are not available.
    """
    params = _without_nulls(params)
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    spec, kwargs = _spec(params), _detector_kwargs(params)
    model = _construct(spec, num_classes, kwargs)
    if spec["weights"] is not None:
        loaded = load_weights(model, spec["name"], spec["weights"])
        logger.info("model %s: loaded weights %s", spec["name"], loaded)
    return model


def _plain(value):
    """JSON-friendly copy: tuples become lists."""
    return list(value) if isinstance(value, tuple) else value


def model_config(params: Mapping | None, num_classes: int) -> dict:
    """Everything `load_model` needs to rebuild the architecture (JSON-serialisable).

    Weights are not part of it: the state_dict is stored beside it.
    """
    params = _without_nulls(params)
    spec = _spec(params)
    spec.pop("weights")
    kwargs = {k: _plain(v) for k, v in _detector_kwargs(params).items()}
    return {**spec, **kwargs, "num_classes": int(num_classes)}


def load_model(config: Mapping, state_dict: Mapping) -> nn.Module:
    """Rebuild the model of `model_config` and load ``state_dict`` strictly."""
    params = {k: v for k, v in config.items() if k != "num_classes"}
    model = build_model(params, int(config["num_classes"]))
    try:
        model.load_state_dict(strip_prefix(dict(state_dict), "module."))
    except RuntimeError as exc:
        raise WeightsError(f"saved state_dict does not fit its model config: {exc}") from None
    return model
