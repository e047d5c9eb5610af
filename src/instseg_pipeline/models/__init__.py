"""Models: one contract every family meets, a registry of families, and their factories.

The contract (torchvision's detection contract; `contract.check_eval_output` and
`contract.check_losses` check it)::

    train mode   network(images, targets) -> {loss name: float scalar tensor}
                 images: list of float [3, H, W] RGB in [0, 1], sizes may differ
                 targets: list of {"boxes": float [K, 4] xyxy, "labels": int64 [K],
                                   "masks": uint8 [K, H, W]}, optionally
                                  "mask_weights": float [K] >= 0 (each instance's weight
                                  in the mask loss, `contract.mask_weights`)
                 the loss names are the family's ``loss_names``
    eval mode    network(images) -> one dict per image:
                 boxes   float [N, 4]        x1, y1, x2, y2 in input pixels
                 labels  int64 [N]           1..num_classes-1 (0 is the background)
                 scores  float [N]           in [0, 1], best first
                 masks   float [N, 1, H, W]  probabilities at the input size
                 other keys (a panoptic family's semantic map) are allowed; code that does
                 not know them ignores them

The registry (`registry.FAMILIES`) maps ``training.model.name`` to a `ModelFamily`: its
``build(params, num_classes) -> nn.Module``, the parameter keys it accepts (an unknown one
fails as ``training.model.<key>``), its loss names, how it is traced for ONNX (`OnnxSpec`)
and where its postprocessing cuts are read. The engine, evaluation, serving and export know
only this contract; a new family is one module and one registry line.

``params`` (``training.model``)::

    name: maskrcnn_tiny | maskrcnn_resnet50_fpn | maskrcnn_resnet50_fpn_v2
          | maskrcnn_mobilenet_v3_large_fpn
          | panoptic_fpn_tiny | panoptic_fpn_resnet50
          (Panoptic FPN, `models.panoptic_fpn`: also needs stuff_classes, set by training)
    weights: null | DEFAULT | COCO_V1 | <full torchvision enum name> | path/to/checkpoint.pt
    ...                                 # the family's keys (see `models.maskrcnn`)

``num_classes`` counts the background. The builders never download: backbone weights are
None and torchvision weight names are read from the local torch cache only.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn

from instseg_pipeline.models.contract import (
    ContractError,
    ModelFamily,
    OnnxSpec,
    check_eval_output,
    check_losses,
)
from instseg_pipeline.models.registry import (
    DEFAULT_NAME,
    FAMILY_ATTRIBUTE,
    check_params,
    family,
    family_of,
    register,
    sections,
)
from instseg_pipeline.models.weights import WeightsError, load_weights, strip_prefix

logger = logging.getLogger(__name__)

__all__ = ["ContractError", "ModelFamily", "OnnxSpec", "WeightsError", "build_model",
           "check_eval_output", "check_losses", "family", "family_of", "family_params", "load_model",
           "model_config", "register"]


def _without_nulls(params: Mapping | None) -> dict:
    """``params`` less its null entries: null in the parameters means "the default"."""
    return {k: v for k, v in (params or {}).items() if v is not None}


def family_params(model: Mapping | None, families: Mapping | None = None) -> dict:
    """The ``params`` of `build_model` from the training parameters: the family's block
    ``training.families.<section>`` with ``training.model`` (name, weights, input size and
    any override) on top. Unknown keys fail with their dotted names."""
    model = _without_nulls(model)
    families = dict(families or {})
    unknown = sorted(set(families) - sections())
    if unknown:
        raise ValueError(f"unknown model family block training.families.{unknown[0]}; "
                         f"known: {', '.join(sorted(sections()))}")
    entry = family(model.get("name", DEFAULT_NAME))
    block = _without_nulls(families.get(entry.section)) if entry.section else {}
    check_params(entry, block, where=f"training.families.{entry.section}")
    return {**block, **model}


def _checked_family(params: Mapping) -> ModelFamily:
    """The family ``params`` name, after checking it accepts every key of ``params``."""
    entry = family(params.get("name", DEFAULT_NAME))
    check_params(entry, params)
    return entry


def build_model(params: Mapping | None, num_classes: int) -> nn.Module:
    """The network of family ``params["name"]`` for ``num_classes`` classes (background
    included), in train mode.

    With ``weights`` the checkpoint is loaded; a different class count there leaves fresh
    box and mask predictors. Raises `WeightsError` for weights that are not available.
    """
    params = _without_nulls(params)
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    entry = _checked_family(params)
    model = entry.build(params, num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model family {entry.name}: build returned "
                        f"{type(model).__name__}, not an nn.Module")
    setattr(model, FAMILY_ATTRIBUTE, entry.name)
    if params.get("weights") is not None:
        loaded = load_weights(model, entry.name, params["weights"])
        logger.info("model %s: loaded weights %s", entry.name, loaded)
    return model


def model_config(params: Mapping | None, num_classes: int) -> dict:
    """Everything `load_model` needs to rebuild the architecture (JSON-serialisable).

    Weights are not part of it: the state_dict is stored beside it.
    """
    params = _without_nulls(params)
    entry = _checked_family(params)
    return {"name": entry.name, **entry.resolve(params), "num_classes": int(num_classes)}


def load_model(config: Mapping, state_dict: Mapping) -> nn.Module:
    """Rebuild the model of `model_config` and load ``state_dict`` strictly."""
    params = {k: v for k, v in config.items() if k != "num_classes"}
    model = build_model(params, int(config["num_classes"]))
    try:
        model.load_state_dict(strip_prefix(dict(state_dict), "module."))
    except RuntimeError as exc:
        raise WeightsError(f"saved state_dict does not fit its model config: {exc}") from None
    return model
