"""Segment Anything (SAM): building, loading and prompting one model.

Used by the interactive endpoint (`serving.interactive`: points and a box from a person) and
by the ``sam`` pseudo-masks of box-only annotations (`data.pseudo_masks`: one box per object).

SAM checkpoints are either the official state dicts (``model_type`` vit_h, vit_l, vit_b) or
``{"config": {...}, "state_dict": {...}}`` saved with ``torch.save`` (``model_type`` custom
or any: the embedded config wins). Config keys, defaults from vit_b (`SAM_DEFAULTS`):
image_size, patch_size, encoder_embed_dim, encoder_depth, encoder_num_heads,
encoder_global_attn_indexes, window_size, mlp_ratio, prompt_embed_dim, mask_in_chans,
decoder_depth, decoder_mlp_dim, decoder_num_heads, iou_head_depth, iou_head_hidden_dim.
torch and segment_anything are imported inside the functions.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from instseg_pipeline.predict.device import resolve_device

logger = logging.getLogger(__name__)

SAM_DEFAULTS = {
    "image_size": 1024, "patch_size": 16, "encoder_embed_dim": 768, "encoder_depth": 12,
    "encoder_num_heads": 12, "encoder_global_attn_indexes": [2, 5, 8, 11], "window_size": 14,
    "mlp_ratio": 4.0, "prompt_embed_dim": 256, "mask_in_chans": 16, "decoder_depth": 2,
    "decoder_mlp_dim": 2048, "decoder_num_heads": 8, "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
}
SAM_PRESETS = {
    "vit_b": {},
    "vit_l": {"encoder_embed_dim": 1024, "encoder_depth": 24, "encoder_num_heads": 16,
              "encoder_global_attn_indexes": [5, 11, 17, 23]},
    "vit_h": {"encoder_embed_dim": 1280, "encoder_depth": 32, "encoder_num_heads": 16,
              "encoder_global_attn_indexes": [7, 15, 23, 31]},
}
BOX_BATCH = 64  # box prompts decoded at once: the masks of a batch are [B, H, W] at full size


def sam_config(model_type: str = "vit_b", overrides: dict | None = None) -> dict:
    """Full SAM config: `SAM_DEFAULTS` + the ``model_type`` preset + ``overrides``."""
    if model_type not in SAM_PRESETS and not overrides:
        raise ValueError(f"unknown SAM model type {model_type!r}; use one of "
                         f"{sorted(SAM_PRESETS)} or a checkpoint with its own config")
    unknown = sorted(set(overrides or {}) - set(SAM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown SAM config keys {unknown}; known: {sorted(SAM_DEFAULTS)}")
    return {**SAM_DEFAULTS, **SAM_PRESETS.get(model_type, {}), **(overrides or {})}


def build_sam(config: dict):
    """A `segment_anything.modeling.Sam` with the architecture of ``config`` (random weights)."""
    from functools import partial

    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    size, dim = int(config["image_size"]), int(config["prompt_embed_dim"])
    grid = size // int(config["patch_size"])
    encoder = ImageEncoderViT(
        img_size=size, patch_size=int(config["patch_size"]),
        embed_dim=int(config["encoder_embed_dim"]), depth=int(config["encoder_depth"]),
        num_heads=int(config["encoder_num_heads"]), mlp_ratio=float(config["mlp_ratio"]),
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=tuple(config["encoder_global_attn_indexes"]),
        window_size=int(config["window_size"]), out_chans=dim)
    decoder = MaskDecoder(
        num_multimask_outputs=3, transformer_dim=dim,
        transformer=TwoWayTransformer(depth=int(config["decoder_depth"]), embedding_dim=dim,
                                      mlp_dim=int(config["decoder_mlp_dim"]),
                                      num_heads=int(config["decoder_num_heads"])),
        iou_head_depth=int(config["iou_head_depth"]),
        iou_head_hidden_dim=int(config["iou_head_hidden_dim"]))
    prompts = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                            input_image_size=(size, size),
                            mask_in_chans=int(config["mask_in_chans"]))
    return Sam(image_encoder=encoder, prompt_encoder=prompts, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


class SamSegmenter:
    """Prompted masks from a SAM model; one image embedding at a time (thread-safe)."""

    def __init__(self, sam, device: str = "auto"):
        from segment_anything import SamPredictor

        self.device = resolve_device(device)
        self.predictor = SamPredictor(sam.to(self.device).eval())
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray, prompts) -> tuple[np.ndarray, np.ndarray]:
        """masks uint8 [M, H, W] and scores float32 [M] for ``image`` uint8 [H, W, 3] RGB.

        ``prompts``: points float32 [K, 2] (x, y), labels int64 [K] (1 keep, 0 exclude) and
        box float32 [4] x1, y1, x2, y2 or None (`serving.interactive.Prompts`).
        """
        has_points = len(prompts.points) > 0
        # one click is ambiguous (part or whole?): let SAM offer its three candidates
        multimask = prompts.box is None and len(prompts.points) == 1
        with self._lock:
            self.predictor.set_image(image, image_format="RGB")
            masks, scores, _ = self.predictor.predict(
                point_coords=prompts.points if has_points else None,
                point_labels=prompts.labels if has_points else None,
                box=prompts.box, multimask_output=multimask)
        order = np.argsort(-scores, kind="stable")
        return masks[order].astype(np.uint8), scores[order].astype(np.float32)

    def boxes(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One mask per box prompt: bool [N, H, W] and SAM's predicted IoU float32 [N].

        ``image`` uint8 [H, W, 3] RGB is embedded once; ``boxes`` float [N, 4] are x1, y1,
        x2, y2 in its pixels, decoded `BOX_BATCH` at a time.
        """
        import torch

        height, width = image.shape[:2]
        masks = np.zeros((len(boxes), height, width), dtype=bool)
        scores = np.zeros(len(boxes), dtype=np.float32)
        if len(boxes) == 0:
            return masks, scores
        with self._lock, torch.inference_mode():
            self.predictor.set_image(image, image_format="RGB")
            for start in range(0, len(boxes), BOX_BATCH):
                chunk = torch.as_tensor(np.asarray(boxes[start:start + BOX_BATCH]),
                                        dtype=torch.float32, device=self.device)
                chunk = self.predictor.transform.apply_boxes_torch(chunk, (height, width))
                found, quality, _ = self.predictor.predict_torch(
                    None, None, boxes=chunk, multimask_output=False)
                stop = start + len(chunk)
                masks[start:stop] = found[:, 0].cpu().numpy()
                scores[start:stop] = quality[:, 0].float().cpu().numpy()
        return masks, scores


def load_sam(checkpoint: str | Path, model_type: str = "vit_b",
             device: str = "auto") -> SamSegmenter:
    """A `SamSegmenter` from an official SAM checkpoint or a ``{config, state_dict}`` file."""
    from instseg_pipeline.models.torch_files import load_weights_only

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SAM checkpoint not found")
    saved = load_weights_only(path, "SAM checkpoint")  # a user's file: weights only
    custom = isinstance(saved, dict) and "state_dict" in saved and "config" in saved
    # a checkpoint that carries its config needs no type; the official ones need theirs
    config = sam_config("vit_b", saved["config"]) if custom else sam_config(model_type)
    sam = build_sam(config)
    try:
        sam.load_state_dict(saved["state_dict"] if custom else saved)
    except RuntimeError as exc:
        raise ValueError(f"{path}: SAM weights do not fit model type {model_type!r} "
                         f"({str(exc)[:300]})") from None
    logger.info("SAM loaded from %s (image_size %d, encoder depth %d)", path,
                config["image_size"], config["encoder_depth"])
    return SamSegmenter(sam, device)


def sam_from_env(device: str = "auto") -> SamSegmenter | None:
    """`load_sam` of $INSTSEG_SAM_CHECKPOINT / $INSTSEG_SAM_MODEL_TYPE, None when unset."""
    checkpoint = os.environ.get("INSTSEG_SAM_CHECKPOINT")
    if not checkpoint:
        return None
    return load_sam(checkpoint, os.environ.get("INSTSEG_SAM_MODEL_TYPE", "vit_b"), device)
