"""The model registry: ``training.model.name`` -> its `ModelFamily`.

A new family is one module that defines its `ModelFamily` and one line in `FAMILIES`
(or a `register` call, e.g. from a plugin or a test).
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from instseg_pipeline.models import maskrcnn, panoptic_fpn, simpleseg, solov2, tiny, yolact
from instseg_pipeline.models.contract import ModelFamily

DEFAULT_NAME = "maskrcnn_tiny"
# set by build_model on every network it returns, so code holding only the network (the
# ONNX parity check) finds its family
FAMILY_ATTRIBUTE = "model_family"

FAMILIES: dict[str, ModelFamily] = {entry.name: entry for entry in (
    tiny.FAMILY,
    maskrcnn.RESNET50_FPN,
    maskrcnn.RESNET50_FPN_V2,
    maskrcnn.MOBILENET_V3_LARGE_FPN,
    *yolact.FAMILIES,
    *solov2.FAMILIES,
    *simpleseg.FAMILIES,
    *panoptic_fpn.FAMILIES,
)}


def register(entry: ModelFamily) -> ModelFamily:
    """Add ``entry`` to the registry under its name; a taken name is an error."""
    if entry.name in FAMILIES:
        raise ValueError(f"model family {entry.name!r} is already registered")
    FAMILIES[entry.name] = entry
    return entry


def family(name: str) -> ModelFamily:
    """The family registered as ``name`` (the value of ``training.model.name``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r} (training.model.name); use one of "
                         f"{sorted(FAMILIES)}") from None


def sections() -> set[str]:
    """The ``training.families`` keys some registered family reads."""
    return {entry.section for entry in FAMILIES.values() if entry.section}


def family_of(network: nn.Module) -> ModelFamily:
    """The family of a network made by `build_model` or `load_model` (DDP-wrapped or not)."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    name = getattr(network, FAMILY_ATTRIBUTE, None)
    if name is None:
        raise ValueError(f"this {type(network).__name__} was not made by "
                         "models.build_model or models.load_model: its family is unknown")
    return family(name)


def check_params(entry: ModelFamily, params: Mapping, where: str = "training.model") -> None:
    """Refuse keys of ``params`` (the block at ``where``) that ``entry`` does not accept,
    naming each one."""
    unknown = [k for k in params if k not in entry.parameter_keys]
    if unknown:
        named = ", ".join(f"{where}.{k}" for k in unknown)
        raise ValueError(f"unknown model parameter {named} for {entry.name}; known: "
                         f"{', '.join(sorted(entry.parameter_keys))}")
