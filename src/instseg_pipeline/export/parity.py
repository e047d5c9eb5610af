"""The parity gate of an export: onnxruntime against eager PyTorch, image by image.

Both sides are the project's backends (`predict.backends`) on the same preprocessed image
(`predict.preprocess.to_chw`); their raw outputs are compared before any threshold, so the
gate holds for whatever thresholds serving later applies. Detections pair up by box IoU
within a label; paired boxes, scores and masks must agree within `DEFAULT_PARITY`
tolerances (``export.parity`` parameters override). Detections at a cut (the score
threshold, the top-k limit) may exist on one side only (`marginal_detections`), and on a
flat image differences are reported, not gated (`ungate_flat`). A semantic family's maps
must give the same label on at least ``semantic_agreement_min`` of the pixels
(`compare_semantic`; gated on every image, flat ones included: no proposal ties there).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from instseg_pipeline.config_schema import as_dict
from instseg_pipeline.export.config import ParityConfig
from instseg_pipeline.export.onnx import create_session
from instseg_pipeline.predict.backends import SEMANTIC_NAME, OnnxBackend, TorchBackend
from instseg_pipeline.predict.preprocess import to_chw

logger = logging.getLogger(__name__)

# the schema's tolerances (num_images says how many images, not how close)
DEFAULT_PARITY = {k: v for k, v in as_dict(ParityConfig()).items() if k != "num_images"}
BLANK_ID = "blank"


class ParityError(AssertionError):
    """ONNX Runtime and eager PyTorch disagree beyond the tolerances; says where and how."""


# --- images ----------------------------------------------------------------------------------

def blank_image(height: int, width: int) -> np.ndarray:
    """An all-black uint8 ``[H, W, 3]`` image: a trained detector finds nothing there."""
    return np.zeros((height, width, 3), np.uint8)


def insert_blank(images: list[np.ndarray], image_ids: list) -> tuple[list, list]:
    """Put a blank image (the first image's size) in the middle of the list.

    In the middle, not at the end: the image after it proves that a run without detections
    leaves the session fit for the next one.
    """
    if not images:
        raise ValueError("parity needs at least one image")
    at = max(1, len(images) // 2)
    blank = blank_image(*images[0].shape[:2])
    return images[:at] + [blank] + images[at:], image_ids[:at] + [BLANK_ID] + image_ids[at:]


# --- comparing outputs ----------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes float [N, 4] x [M, 4] -> float64 [N, M]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks [H, W]; two empty masks agree (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def match_detections(eager: Mapping, onnx: Mapping, min_iou: float) -> list[tuple[int, int]]:
    """Hungarian matching on box IoU among same-label pairs; pairs with IoU >= ``min_iou``."""
    from scipy.optimize import linear_sum_assignment

    iou = box_iou(eager["boxes"], onnx["boxes"])
    iou[eager["labels"][:, None] != onnx["labels"][None, :]] = 0.0
    if iou.size == 0:
        return []
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if iou[i, j] >= min_iou]


def marginal_detections(outputs: Mapping, limits: Mapping) -> np.ndarray:
    """bool [N]: detections at a cut, which one backend may keep and the other drop.

    Which detections survive a cut depends on the last bits of their scores, so a
    numerically tiny difference may change them: a score within ``score_atol`` of the score
    threshold, or, when the backend returned the maximum number of detections, within
    ``score_atol`` of the last score kept (the top-k cut; untrained heads and flat image
    regions give exactly tied scores there, and the backends break ties differently).
    """
    scores, atol = np.asarray(outputs["scores"], np.float64), limits["score_atol"]
    marginal = np.abs(scores - limits["score_threshold"]) <= atol
    if len(scores) and len(scores) >= limits["detections_per_img"]:
        marginal |= np.abs(scores - scores.min()) <= atol
    return marginal


def _alone(outputs: Mapping, matched: set, marginal: np.ndarray) -> tuple[int, list[float]]:
    """How many detections lack a partner, and the scores of those not at a cut."""
    alone = [i for i in range(len(outputs["scores"])) if i not in matched]
    return len(alone), [float(outputs["scores"][i]) for i in alone if not marginal[i]]


def _pair_stats(eager: Mapping, onnx: Mapping, pairs: list) -> dict:
    """Largest box and score differences and the smallest mask IoU over matched pairs
    (None without pairs)."""
    if not pairs:
        return {"max_box_diff": None, "max_score_diff": None, "min_mask_iou": None}
    i, j = (np.array(idx) for idx in zip(*pairs))
    box = np.abs(eager["boxes"][i] - onnx["boxes"][j]).max(axis=1)
    score = np.abs(eager["scores"][i] - onnx["scores"][j])
    ious = [mask_iou(eager["masks"][a, 0] > 0.5, onnx["masks"][b, 0] > 0.5) for a, b in pairs]
    worst = int(np.argmin(ious))
    return {"max_box_diff": float(box.max()), "max_score_diff": float(score.max()),
            "min_mask_iou": float(ious[worst]), "worst_box": int(i[np.argmax(box)]),
            "worst_score": int(i[np.argmax(score)]), "worst_mask": int(i[worst])}


def _pair_failures(stats: dict, limits: Mapping) -> list[str]:
    """Matched pairs further apart than the tolerances, in words."""
    out = []
    if stats["max_box_diff"] > limits["box_atol"]:
        out.append(f"box of eager detection #{stats['worst_box']} differs by "
                   f"{stats['max_box_diff']:.3f} px > box_atol {limits['box_atol']}")
    if stats["max_score_diff"] > limits["score_atol"]:
        out.append(f"score of eager detection #{stats['worst_score']} differs by "
                   f"{stats['max_score_diff']:.4f} > score_atol {limits['score_atol']}")
    if stats["min_mask_iou"] < limits["mask_iou_min"]:
        out.append(f"mask IoU of eager detection #{stats['worst_mask']} is "
                   f"{stats['min_mask_iou']:.3f} < mask_iou_min {limits['mask_iou_min']}")
    return out


def _failures(stats: dict, unmatched: dict, limits: Mapping) -> list[str]:
    """What broke, in words (empty when within tolerances)."""
    out = [] if stats["max_box_diff"] is None else _pair_failures(stats, limits)
    for side, bad in unmatched.items():
        if bad:
            out.append(f"{len(bad)} {side} detection(s) without a partner and not at a "
                       f"cut (score threshold {limits['score_threshold']}; scores "
                       f"{', '.join(f'{s:.3f}' for s in bad[:5])})")
    return out


def compare_detections(eager: Mapping, onnx: Mapping, limits: Mapping) -> dict:
    """One image's parity record: counts, matched pairs, worst differences, failures.

    Pairs of two marginal detections (`marginal_detections`) are left out of the
    differences: tied candidates at a cut may pair up with each other, not with their twin.
    """
    pairs = match_detections(eager, onnx, limits["match_iou"])
    m_e, m_o = marginal_detections(eager, limits), marginal_detections(onnx, limits)
    firm = [(i, j) for i, j in pairs if not (m_e[i] and m_o[j])]
    n_e, bad_e = _alone(eager, {i for i, _ in pairs}, m_e)
    n_o, bad_o = _alone(onnx, {j for _, j in pairs}, m_o)
    stats = _pair_stats(eager, onnx, firm)
    failures = _failures(stats, {"eager": bad_e, "onnx": bad_o}, limits)
    if len(onnx["masks"]) and onnx["masks"].shape[1:] != eager["masks"].shape[1:]:
        failures.append(f"onnx masks have shape {onnx['masks'].shape[1:]}, eager "
                        f"{eager['masks'].shape[1:]}")
    return {"eager_detections": len(eager["scores"]), "onnx_detections": len(onnx["scores"]),
            "matched": len(pairs), "marginal_pairs": len(pairs) - len(firm),
            "unmatched_eager": n_e, "unmatched_onnx": n_o,
            **{k: stats[k] for k in ("max_box_diff", "max_score_diff", "min_mask_iou")},
            "failures": failures, "passed": not failures}


def compare_semantic(eager: Mapping, onnx: Mapping, limits: Mapping) -> dict:
    """``{"semantic_agreement": share of pixels where the two maps agree, "failures": [...]}``
    for a semantic family's outputs; ``{}`` when eager has no semantic map."""
    if SEMANTIC_NAME not in eager:
        return {}
    if SEMANTIC_NAME not in onnx:
        return {"semantic_agreement": None,
                "failures": ["the ONNX graph has no semantic output; the eager model has one"]}
    a, b = np.asarray(eager[SEMANTIC_NAME]), np.asarray(onnx[SEMANTIC_NAME])
    if a.shape != b.shape:
        return {"semantic_agreement": None,
                "failures": [f"onnx semantic map has shape {b.shape}, eager {a.shape}"]}
    agreement = float((a == b).mean()) if a.size else 1.0
    failures = []
    if agreement < limits["semantic_agreement_min"]:
        failures.append(f"semantic map agrees on {agreement:.4f} of the pixels < "
                        f"semantic_agreement_min {limits['semantic_agreement_min']}")
    return {"semantic_agreement": agreement, "failures": failures}


def _with_semantic(record: dict, eager: Mapping, onnx: Mapping, limits: Mapping) -> dict:
    """``record`` with the semantic comparison (`compare_semantic`) merged in."""
    semantic = compare_semantic(eager, onnx, limits)
    if not semantic:
        return record
    failures = [*record["failures"], *semantic["failures"]]
    return {**record, "semantic_agreement": semantic["semantic_agreement"],
            "failures": failures, "passed": not failures}


def parity_limits(network, params: Mapping | None) -> dict:
    """Tolerances (`DEFAULT_PARITY`, ``params`` override) plus the network's own cuts."""
    limits = {**DEFAULT_PARITY, **{k: v for k, v in (params or {}).items()
                                   if k in DEFAULT_PARITY}}
    from instseg_pipeline.models import family_of

    limits.update(family_of(network).postprocess_cuts(network))
    return limits


def _ort_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's run-time error types (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "EPFail",
             "InvalidGraph")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


def is_flat(image: np.ndarray) -> bool:
    """True for an image of one colour (such as `blank_image`)."""
    return bool(image.size) and bool((image == image.reshape(-1, image.shape[-1])[0]).all())


def ungate_flat(record: dict) -> dict:
    """A flat image's record with its differences kept as notes, not failures.

    On an image of one colour every anchor away from the border sees the same input, so the
    RPN's objectness scores tie exactly and which tied proposals survive its top-k cut is the
    backend's tie-break. A model that detects anything there (an under-trained one does)
    then yields detections that legitimately differ between backends. What stays gated on
    such an image: onnxruntime runs, the outputs have the right shapes, and where both
    backends find nothing the no-detection path is covered.
    """
    if not record.get("eager_detections") or not record["failures"]:
        return record
    shape = [f for f in record["failures"] if f.startswith("onnx masks have shape")]
    notes = [f for f in record["failures"] if f not in shape]
    return {**record, "failures": shape, "passed": not shape,
            "ungated": "flat image: tied RPN scores, the backends break ties differently",
            "notes": notes}


def _image_record(eager_backend: TorchBackend, onnx_backend: OnnxBackend, image: np.ndarray,
                  image_id, limits: Mapping) -> dict:
    chw = to_chw(image)
    record = {"image_id": image_id, "height": int(chw.shape[1]), "width": int(chw.shape[2])}
    eager = eager_backend(chw)
    try:
        onnx = onnx_backend(chw)
    except _ort_errors() as exc:  # a failing run is a parity failure to report, not a crash
        return {**record, "eager_detections": len(eager["scores"]), "passed": False,
                "failures": [f"onnxruntime failed: {exc}"]}
    record = {**record, **compare_detections(eager, onnx, limits)}
    if is_flat(image):
        record = ungate_flat(record)
        for note in record.get("notes", []):
            logger.warning("ONNX parity, image %s (flat, not gated): %s", image_id, note)
    return _with_semantic(record, eager, onnx, limits)


def _summary(records: list[dict], limits: Mapping) -> dict:
    def worst(key, fn):
        values = [r[key] for r in records if r.get(key) is not None]
        return float(fn(values)) if values else None

    blank = [r for r in records if r["image_id"] == BLANK_ID]
    return {"passed": all(r["passed"] for r in records), "images": len(records),
            "max_box_diff": worst("max_box_diff", max),
            "max_score_diff": worst("max_score_diff", max),
            "min_mask_iou": worst("min_mask_iou", min),
            "min_semantic_agreement": worst("semantic_agreement", min),
            "no_detection_case_covered": any(r.get("eager_detections") == 0 for r in blank),
            "tolerances": dict(limits)}


def check_parity(network, onnx_path: str | Path | bytes, images: Sequence[np.ndarray],
                 params: Mapping | None = None, image_ids: Sequence | None = None,
                 session_params: Mapping | None = None) -> dict:
    """Compare onnxruntime with eager PyTorch image by image, in the given order.

    ``images``: uint8 RGB ``[H, W, 3]`` of different sizes, a blank one among them (see
    `insert_blank`); all run through ONE onnxruntime session so that state left by one run
    shows in the next. ``params``: box_atol (px), score_atol, mask_iou_min (masks
    thresholded at 0.5), match_iou (box IoU to pair detections of the same label). On a
    flat image (one colour) differences in detections are reported, not gated
    (`ungate_flat`).
    A semantic family's maps are compared too (``semantic_agreement_min``).
    Returns ``{"passed", "max_box_diff", "max_score_diff", "min_mask_iou",
    "min_semantic_agreement" (None without semantic maps), "images": n, "per_image": [...],
    "tolerances"}``; raising is the caller's call (`raise_on_failure`).
    """
    limits = parity_limits(network, params)
    eager = TorchBackend(network, "cpu")
    runtime = OnnxBackend(create_session(onnx_path, session_params))
    ids = list(image_ids) if image_ids is not None else list(range(len(images)))
    records = [_image_record(eager, runtime, image, image_id, limits)
               for image, image_id in zip(images, ids)]
    report = {**_summary(records, limits), "per_image": records}
    logger.info("ONNX parity %s on %d images: max box diff %s px, max score diff %s, "
                "min mask IoU %s, min semantic agreement %s",
                "passed" if report["passed"] else "FAILED", len(records),
                report["max_box_diff"], report["max_score_diff"], report["min_mask_iou"],
                report["min_semantic_agreement"])
    return report


def raise_on_failure(report: Mapping) -> None:
    """Raise `ParityError` naming every failing image and what failed there."""
    if report["passed"]:
        return
    lines = [f"image {r['image_id']} ({r['height']}x{r['width']}): " + "; ".join(r["failures"])
             for r in report["per_image"] if not r["passed"]]
    raise ParityError("ONNX export does not match eager PyTorch:\n  " + "\n  ".join(lines))
