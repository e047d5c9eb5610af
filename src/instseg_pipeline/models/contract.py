"""The model contract in code: what a family entry declares and what its network returns.

`ModelFamily` is the registry entry (see `instseg_pipeline.models.registry`); `OnnxSpec`
says how a family is traced. `check_eval_output` and `check_losses` check a network's
output against the contract written down in `instseg_pipeline.models`; `mask_weights`
reads (and checks) a train target's optional per-instance mask-loss weights.

Train targets: ``boxes`` float [K, 4], ``labels`` int64 [K], ``masks`` uint8 [K, H, W], and
optionally ``mask_weights`` float [K] >= 0: each instance's weight in the family's mask loss
(the training Dataset puts it in when ``training.pseudo_mask_loss_weight`` makes a
pseudo-mask count less than an annotated one). Every family multiplies each instance's
mask-loss term by its weight and keeps its normaliser (the count of instances, ROIs, cells
or pixels as without weights): weight 1 everywhere is the unweighted loss, weight 0 removes
an instance's term, and a batch of pseudo-masks at 0.5 counts half.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# keys every family accepts: build_model resolves the name and loads the weights itself
COMMON_KEYS = ("name", "weights")
EVAL_KEYS = ("boxes", "labels", "scores", "masks")
EXPORTERS = ("torchscript", "dynamo")
# torchvision scales boxes clipped in resized pixels back to input pixels in float32
BOX_SLACK_PX = 0.5
# a semantic output holds labels 0..S (S stuff categories); 254 keeps them apart from void
SEMANTIC_MAX = 254


MASK_WEIGHTS_KEY = "mask_weights"


class ContractError(ValueError):
    """A network output that breaks the model contract; the message names the key."""


def no_tracing_hook(network: nn.Module) -> AbstractContextManager:
    """The tracing hook of a family whose forward traces as it is."""
    return nullcontext(network)


def given_settings(params: Mapping) -> dict:
    """``params`` less name and weights, tuples as lists: what a family without defaults
    to resolve saves in its model config."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()
            if k not in COMMON_KEYS}


@dataclass(frozen=True)
class OnnxSpec:
    """How a family is traced for ONNX.

    ``note`` says how it is traced, or why it cannot be. ``tracing(network)`` is a context
    manager the exporter enters around ``torch.onnx.export`` (family-specific fixes that
    leave eager results unchanged). ``exporter``: "torchscript" (``dynamo=False``) or
    "dynamo". ``min_opset``: the lowest ONNX opset its ops exist in; a lower requested
    opset is raised to it (e.g. DeformConv, opset 19).
    """

    exportable: bool
    note: str
    tracing: Callable[[nn.Module], AbstractContextManager] = no_tracing_hook
    exporter: str = "torchscript"
    min_opset: int = 0

    def __post_init__(self):
        if not self.note:
            raise ValueError("OnnxSpec.note must say how the family is traced or why it "
                             "cannot be")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"OnnxSpec.exporter {self.exporter!r}: use one of {EXPORTERS}")


@dataclass(frozen=True)
class ModelFamily:
    """One registry entry: everything the rest of the project may know about a family.

    - ``build(params, num_classes) -> nn.Module``: the architecture, weights not loaded.
      ``params`` is ``training.model`` less its null entries, keys already checked;
      ``num_classes`` counts the background.
    - ``keys``: the ``training.model`` keys it accepts besides `COMMON_KEYS`.
    - ``loss_names``: the keys of its train-mode loss dict.
    - ``onnx``: how it is traced (`OnnxSpec`).
    - ``postprocess_cuts(network) -> {"score_threshold": float, "detections_per_img": int}``:
      the network's own cuts on its eval output (the ONNX parity check reads them).
    - ``resolve(params) -> dict``: the settings `model_config` saves, defaults resolved,
      JSON-friendly, without name and weights; `load_model` passes them back to ``build``.
    - ``semantic``: the family has a semantic (stuff) head. `build` then also gets
      ``params["stuff_classes"]`` = S, the number of stuff categories; train targets may
      carry ``"semantic"`` int64 [H, W] (0 = any thing pixel, 1..S = the stuff categories
      of `data.tables.stuff_mapping`, 255 = void, not in the loss) and the eval output
      carries ``"semantic"`` int64 [H, W] at the input size, values 0..S. Families
      without it never see either.
    - ``section``: the key under ``training.families`` that holds the family's settings
      (shared by its sizes, e.g. ``yolact`` for ``yolact_tiny`` and
      ``yolact_plus_resnet50_fpn``); ``training.model`` overrides any of them. Empty: none.
    """

    name: str
    build: Callable[[Mapping, int], nn.Module]
    keys: tuple[str, ...]
    loss_names: tuple[str, ...]
    onnx: OnnxSpec
    postprocess_cuts: Callable[[nn.Module], dict]
    resolve: Callable[[Mapping], dict] = given_settings
    section: str = ""
    semantic: bool = False

    def __post_init__(self):
        clash = [k for k in self.keys if k in COMMON_KEYS]
        if clash:
            raise ValueError(f"model family {self.name}: keys {clash} are common to every "
                             "family; leave them out of its keys")

    @property
    def parameter_keys(self) -> tuple[str, ...]:
        """Every ``training.model`` key this family accepts."""
        return (*COMMON_KEYS, *self.keys)


def _as_tensor(key: str, value) -> torch.Tensor:
    """A torch tensor (numpy arrays, e.g. ONNX Runtime outputs, are viewed as one)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ContractError(f"eval output {key!r}: expected a tensor, got {type(value).__name__}")
    return value


def _expect(key: str, tensor: torch.Tensor, dtype: str, shape: tuple) -> None:
    """Raise unless ``tensor`` is of ``dtype`` ("float" or "int64") and ``shape``
    (None matches any size)."""
    dtype_ok = tensor.dtype.is_floating_point if dtype == "float" else tensor.dtype == torch.int64
    shape_ok = tensor.ndim == len(shape) and all(
        want is None or int(got) == want for got, want in zip(tensor.shape, shape))
    if not (dtype_ok and shape_ok):
        wanted = ", ".join("N" if s is None else str(s) for s in shape)
        raise ContractError(f"eval output {key!r}: expected {dtype} [{wanted}], got "
                            f"{tensor.dtype} {list(tensor.shape)}")


def _expect_within(key: str, tensor: torch.Tensor, low: float, high: float) -> None:
    if tensor.numel() and (tensor.min() < low or tensor.max() > high):
        raise ContractError(f"eval output {key!r}: values must lie in [{low}, {high}], got "
                            f"[{float(tensor.min()):.4g}, {float(tensor.max()):.4g}]")


def _expect_xyxy(boxes: torch.Tensor, height: int, width: int) -> None:
    """Boxes x1 <= x2, y1 <= y2 inside the input image (not the resized one)."""
    if not boxes.numel():
        return
    x1, y1, x2, y2 = boxes.unbind(1)
    if bool((x2 < x1).any() | (y2 < y1).any()):
        raise ContractError("eval output 'boxes': expected x1, y1, x2, y2 with x1 <= x2 and "
                            "y1 <= y2 (xyxy, not xywh)")
    _expect_within("boxes", boxes[:, 0::2], -BOX_SLACK_PX, width + BOX_SLACK_PX)
    _expect_within("boxes", boxes[:, 1::2], -BOX_SLACK_PX, height + BOX_SLACK_PX)


def check_eval_output(output: Mapping, height: int, width: int) -> int:
    """Check one image's eval-mode output against the contract; return its N.

    ``boxes float [N, 4]`` xyxy in input pixels, ``labels int64 [N]``, ``scores float [N]``
    in [0, 1], ``masks float [N, 1, height, width]`` probabilities; ``semantic int64
    [height, width]`` labels 0..S when present (a family with ``semantic``). Other keys are
    allowed and not checked. Torch tensors or numpy arrays. Raises `ContractError` naming the key.
    """
    if not isinstance(output, Mapping):
        raise ContractError(f"eval output: expected a dict per image, got "
                            f"{type(output).__name__}")
    missing = [k for k in EVAL_KEYS if k not in output]
    if missing:
        raise ContractError(f"eval output lacks {missing} (has {sorted(output)})")
    boxes, labels, scores, masks = (_as_tensor(k, output[k]) for k in EVAL_KEYS)
    _expect("boxes", boxes, "float", (None, 4))
    n = int(boxes.shape[0])
    _expect("labels", labels, "int64", (n,))
    _expect("scores", scores, "float", (n,))
    _expect("masks", masks, "float", (n, 1, int(height), int(width)))
    _expect_within("scores", scores, 0.0, 1.0)
    _expect_within("masks", masks, 0.0, 1.0)
    _expect_xyxy(boxes, int(height), int(width))
    if "semantic" in output:
        semantic = _as_tensor("semantic", output["semantic"])
        _expect("semantic", semantic, "int64", (int(height), int(width)))
        _expect_within("semantic", semantic, 0, SEMANTIC_MAX)
    return n


def check_losses(losses: Mapping, loss_names: tuple[str, ...] | None = None) -> None:
    """Check a train-mode output: a dict of named scalar float tensors.

    With ``loss_names`` (the family's), the names must be exactly those. Raises
    `ContractError` naming the offending loss.
    """
    if not isinstance(losses, Mapping):
        raise ContractError(f"train output: expected a dict of losses, got "
                            f"{type(losses).__name__}")
    if loss_names is not None and set(losses) != set(loss_names):
        raise ContractError(f"train output: losses {sorted(losses)}, the family declares "
                            f"{sorted(loss_names)}")
    for name, value in losses.items():
        if not (isinstance(value, torch.Tensor) and value.ndim == 0
                and value.dtype.is_floating_point):
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ContractError(f"train output {name!r}: expected a scalar float tensor, got "
                                f"{shape}")


def mask_weights(target: Mapping) -> torch.Tensor | None:
    """A train target's ``mask_weights`` float [K] (K = its number of instances), or None
    when it has none or every weight is 1: the family then computes its unweighted loss
    exactly as before.

    Raises `ContractError` (naming the target's image_id when it has one) for a weight
    tensor of the wrong shape or dtype, or a negative or non-finite weight.
    """
    weights = target.get(MASK_WEIGHTS_KEY)
    if weights is None:
        return None
    where = f" (image_id {target['image_id']})" if "image_id" in target else ""
    count = len(target["labels"])
    if not (isinstance(weights, torch.Tensor) and weights.dtype.is_floating_point
            and tuple(weights.shape) == (count,)):
        got = (f"{weights.dtype} {list(weights.shape)}" if isinstance(weights, torch.Tensor)
               else type(weights).__name__)
        raise ContractError(f"train target {MASK_WEIGHTS_KEY!r}{where}: expected float "
                            f"[{count}] (one weight per instance), got {got}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ContractError(f"train target {MASK_WEIGHTS_KEY!r}{where}: weights must be "
                            f"finite and >= 0, got {weights.tolist()}")
    return None if bool((weights == 1).all()) else weights


def batch_mask_weights(targets) -> list[torch.Tensor] | None:
    """Per target its `mask_weights` (ones where it has none), or None when no target of
    the batch has weights other than 1."""
    weights = [mask_weights(t) for t in targets]
    if all(w is None for w in weights):
        return None
    return [torch.ones(len(t["labels"]), device=t["labels"].device) if w is None
            else w.to(t["labels"].device) for t, w in zip(targets, weights)]
