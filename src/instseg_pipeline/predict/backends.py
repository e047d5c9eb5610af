"""Raw outputs of one preprocessed image from a torch model or an ONNX Runtime session.

Both backends take float32 ``[3, H, W]`` in [0, 1] (`preprocess.to_chw`) and return the
model contract's eval outputs as numpy: boxes float32 [N, 4] xyxy in input pixels, labels
int64 [N], scores float32 [N], masks float32 [N, 1, H, W] probabilities at input size,
and for a semantic family (a model or graph that has it) semantic int64 [H, W], labels
0..S at input size. Nothing is thresholded here; `postprocess` turns raw outputs into instances.

torch and onnxruntime are imported inside: a process that serves the ONNX model does not
load torch, and one that serves the torch model does not load onnxruntime.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from instseg_pipeline.predict.device import resolve_device

OUTPUT_NAMES = ("boxes", "labels", "scores", "masks")
# the fifth output of a semantic family (after OUTPUT_NAMES in an exported graph)
SEMANTIC_NAME = "semantic"


def forward(network, images: Sequence, device) -> list[dict]:
    """Eval-mode outputs (tensors on ``device``) of ``network`` for float32 ``[3, H, W]``
    tensors; AMP on CUDA (the project's device rule), full precision elsewhere."""
    import torch

    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        return network([image.to(device) for image in images])


def numpy_outputs(output: Mapping) -> dict[str, np.ndarray]:
    """The raw outputs of a torch output dict as CPU numpy arrays: the four instance
    outputs (float32 / int64) and ``semantic`` (int64) when the output has it."""
    out = {k: output[k].cpu().numpy() if k == "labels" else output[k].float().cpu().numpy()
           for k in OUTPUT_NAMES}
    if SEMANTIC_NAME in output:
        out[SEMANTIC_NAME] = output[SEMANTIC_NAME].cpu().numpy().astype(np.int64, copy=False)
    return out


class TorchBackend:
    """A torch detection model (eval mode) on the `resolve_device` of ``device``."""

    name = "torch"

    def __init__(self, model, device: str = "auto"):
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        self.model = model.to(self.torch_device).eval()

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """``image`` float32 [3, H, W] in [0, 1] -> raw outputs (see the module docstring)."""
        import torch

        return numpy_outputs(forward(self.model, [torch.from_numpy(image)],
                                     self.torch_device)[0])


class OnnxBackend:
    """An onnxruntime session of an exported model (`export.onnx.create_session`)."""

    name = "onnxruntime"

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        names = [o.name for o in session.get_outputs()]
        # exports name their outputs; an unnamed export is read in the documented order
        self.output_names = list(OUTPUT_NAMES) if set(OUTPUT_NAMES) <= set(names) else names[:4]
        self.keys = list(OUTPUT_NAMES)
        if SEMANTIC_NAME in names:  # a semantic family's graph
            self.output_names.append(SEMANTIC_NAME)
            self.keys.append(SEMANTIC_NAME)
        self.device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """``image`` float32 [3, H, W] in [0, 1] -> raw outputs (see the module docstring)."""
        values = self.session.run(self.output_names, {self.input_name: image})
        out = dict(zip(self.keys, values))
        if SEMANTIC_NAME in out:
            out[SEMANTIC_NAME] = out[SEMANTIC_NAME].astype(np.int64, copy=False)
        return out
