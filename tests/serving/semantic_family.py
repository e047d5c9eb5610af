"""A semantic (panoptic) test family: maskrcnn_tiny's network plus a fixed semantic map
(the top half of every image stuff label 1, the bottom half label 2), so the serving tests
know exactly where stuff must be and do not depend on a real panoptic family.

`semantic_family` registers it for one test module (in a copy of the registry, gone
afterwards);
``python -m semantic_family serve|demo ARGS`` runs ``instseg-serve`` / ``instseg-demo``
with it registered, for tests that start a real server process (this folder on PYTHONPATH).
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

from instseg_pipeline.models import OnnxSpec, build_model, model_config, registry

SEMANTIC_FAMILY = "semantictest_tiny"
STUFF_CATEGORY_IDS = {1: 101, 2: 102}  # semantic label -> stuff category id
STUFF_CLASSES = {1: "sky", 2: "grass"}
THING_CLASSES = {1: "disk", 2: "square"}
PARAMS = {"name": SEMANTIC_FAMILY, "min_size": 224, "max_size": 256, "box_score_thresh": 0.0,
          "box_detections_per_img": 20, "stuff_classes": len(STUFF_CLASSES)}


def half_map(height: int, width: int, device=None) -> torch.Tensor:
    """int64 [H, W]: label 1 on the top half (rows < H // 2), label 2 below."""
    semantic = torch.full((height, width), 2, dtype=torch.int64, device=device)
    semantic[: height // 2] = 1
    return semantic


class HalvesSemantic(nn.Module):
    """A maskrcnn_tiny ``detector`` whose eval output per image also carries
    ``"semantic"``: `half_map` at the input size. Train mode: the detector's losses."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images, targets=None):
        outputs = self.detector(images, targets)
        if self.training:
            return outputs
        return [{**out, "semantic": half_map(*image.shape[-2:], device=image.device)}
                for out, image in zip(outputs, images)]


def _build(params: Mapping, num_classes: int) -> nn.Module:
    tiny = registry.family("maskrcnn_tiny")
    detector = tiny.build({k: v for k, v in params.items() if k != "stuff_classes"},
                          num_classes)
    return HalvesSemantic(detector)


def _resolve(params: Mapping) -> dict:
    tiny = registry.family("maskrcnn_tiny")
    return {**tiny.resolve({k: v for k, v in params.items() if k != "stuff_classes"}),
            "stuff_classes": int(params["stuff_classes"])}


def semantic_entry():
    """The `ModelFamily` of the test family (not registered)."""
    tiny = registry.family("maskrcnn_tiny")
    return dataclasses.replace(
        tiny, name=SEMANTIC_FAMILY, build=_build, resolve=_resolve,
        keys=(*tiny.keys, "stuff_classes"), semantic=True,
        onnx=OnnxSpec(exportable=False, note="test family: never exported"),
        postprocess_cuts=lambda network: tiny.postprocess_cuts(network.detector))


@pytest.fixture(scope="module")
def semantic_family():
    """The semantic test family, registered for one test module (in a copy of the
    registry, restored afterwards)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
        yield registry.register(semantic_entry())


def semantic_model_dict(seed: int = 0) -> dict:
    """An untrained model of the family as the training pipeline saves a semantic one
    (needs the family registered)."""
    torch.manual_seed(seed)
    num_classes = len(THING_CLASSES) + 1
    network = build_model(PARAMS, num_classes)
    return {"config": model_config(PARAMS, num_classes), "state_dict": network.state_dict(),
            "classes": dict(THING_CLASSES), "iterations": 5,
            "stuff_category_ids": dict(STUFF_CATEGORY_IDS),
            "stuff_classes": dict(STUFF_CLASSES)}


def save_semantic_checkpoint(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(semantic_model_dict(seed), path)
    return path


def main(argv: list[str]) -> int:
    """``serve ARGS`` or ``demo ARGS`` with the family registered."""
    registry.register(semantic_entry())
    command, *rest = argv
    if command == "serve":
        from instseg_pipeline.commands.serve import main as run
    elif command == "demo":
        from instseg_pipeline.commands.demo import main as run
    else:
        raise SystemExit(f"unknown command {command!r}: use serve or demo")
    return run(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
