"""Pseudo-masks from boxes (`data.pseudo_masks`) on hand-made scenes with known masks."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scene_shapes import circle, rect

from instseg_pipeline.config_schema import ConfigError
from instseg_pipeline.data import masks as mask_codec
from instseg_pipeline.data.config import SourceConfig
from instseg_pipeline.data.pseudo_masks import (
    PseudoMaskConfig,
    box_pixels,
    generate,
    main_components,
    pseudo_masks_for_image,
)

H, W = 120, 160
BACKGROUND, OBJECT = (40, 120, 200), (220, 60, 40)


def scene(shapes: list[np.ndarray], height: int = H, width: int = W, noise: int = 20,
          seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: ``OBJECT`` coloured shapes on a ``BACKGROUND`` with pixel noise."""
    image = np.empty((height, width, 3), np.int64)
    image[:] = BACKGROUND
    for shape in shapes:
        image[shape.astype(bool)] = OBJECT
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.integers(-noise, noise + 1, image.shape), 0, 255).astype(np.uint8)


def coco_box(mask: np.ndarray) -> list[float]:
    return mask_codec.rle_bbox(mask_codec.bitmap_to_rle(mask))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / (a | b).sum())


def test_grabcut_recovers_a_disc_that_its_box_only_approximates():
    disc = circle(H, W, 80, 60, 40)
    image = scene([disc])
    boxes = np.array([coco_box(disc)])
    box = pseudo_masks_for_image(image, boxes, PseudoMaskConfig(method="box"))
    cut = pseudo_masks_for_image(image, boxes, PseudoMaskConfig(method="grabcut"))
    assert box.masks.shape == cut.masks.shape == (1, H, W) and cut.masks.dtype == bool
    assert 0.74 < iou(box.masks[0], disc) < 0.8          # pi / 4 of a square, pixelated
    assert iou(cut.masks[0], disc) > 0.9
    assert cut.sources == ["grabcut"] and cut.fallbacks == [None]
    assert box.sources == ["box"] and box.fallbacks == [None]


def test_each_mask_stays_inside_its_box_and_the_image():
    near = circle(H, W, 40, 60, 25)
    touching = rect(H, W, 66, 30, 110, 90)   # touches the disc's box
    image = scene([near, touching])
    boxes = np.array([coco_box(near), coco_box(touching), [130, -20, 60, 50]])
    found = pseudo_masks_for_image(image, boxes, PseudoMaskConfig(method="grabcut"))
    for mask, box in zip(found.masks, boxes):
        x0, y0, x1, y1 = box_pixels(box, H, W)
        assert mask.any() and not mask[:, :x0].any() and not mask[:, x1:].any()
        assert not mask[:y0].any() and not mask[y1:].any()
    assert iou(found.masks[0], near) > 0.85 and iou(found.masks[1], touching) > 0.85
    # partly outside: clipped to x 130..160, y 0..30
    clipped = pseudo_masks_for_image(image, boxes[2:], PseudoMaskConfig(method="box"))
    assert clipped.masks[0].sum() == 30 * 30 and clipped.masks[0][:30, 130:].all()


def test_a_uniform_image_falls_back_to_the_box_and_is_counted(tmp_path):
    image = np.full((H, W, 3), 128, np.uint8)
    boxes = np.array([[20, 20, 50, 40]], float)
    found = pseudo_masks_for_image(image, boxes, PseudoMaskConfig(method="grabcut"))
    assert found.sources == ["box"]
    assert found.fallbacks[0] in ("grabcut_collapsed", "too_large_in_box")
    assert found.masks[0].sum() == 50 * 40
    Image.fromarray(image).save(tmp_path / "uniform.png")
    results, counts = generate([(tmp_path / "uniform.png", boxes)],
                               PseudoMaskConfig(method="grabcut", workers=0), progress=False)
    assert counts["sources"] == {"box": 1} and sum(counts["fallbacks"].values()) == 1
    assert results[0].fallbacks == found.fallbacks and results[0].areas == [2000]


def test_fill_limits_send_too_small_and_too_large_masks_back_to_the_box():
    disc = circle(H, W, 80, 60, 8)
    image = scene([disc])
    wide = np.array([[30, 10, 100, 100]], float)       # the disc covers 2 % of this box
    small = pseudo_masks_for_image(image, wide, PseudoMaskConfig(method="grabcut"))
    assert small.fallbacks == ["too_small_in_box"] and small.sources == ["box"]
    assert small.masks[0].sum() == 100 * 100
    lenient = pseudo_masks_for_image(image, wide, PseudoMaskConfig(method="grabcut",
                                                                   min_fill=0.0))
    assert lenient.sources == ["grabcut"] and iou(lenient.masks[0], disc) > 0.8
    tight = pseudo_masks_for_image(image, np.array([coco_box(disc)]),
                                   PseudoMaskConfig(method="grabcut", max_fill=0.5))
    assert tight.fallbacks == ["too_large_in_box"]


def test_main_components_drop_specks_but_keep_two_halves():
    mask = np.zeros((40, 60), bool)
    mask[5:35, 2:25] = True      # 690 px
    mask[5:35, 30:50] = True     # 600 px: the other half of an occluded object
    mask[0, 58] = True           # a speck
    kept = main_components(mask)
    assert kept.sum() == 690 + 600 and not kept[0, 58]


def test_workers_give_the_in_process_results_in_job_order(tmp_path):
    jobs = []
    for index, (cx, cy, r) in enumerate([(50, 50, 30), (100, 70, 20), (70, 60, 35),
                                         (40, 80, 15)]):
        disc = circle(H, W, cx, cy, r)
        path = tmp_path / f"scene{index}.png"
        Image.fromarray(scene([disc], seed=index)).save(path)
        jobs.append((path, np.array([coco_box(disc), [5, 5, 30, 30]]), (W, H)))
    alone, counts_alone = generate(jobs, PseudoMaskConfig(method="grabcut", workers=0),
                                   progress=False)
    pooled, counts_pooled = generate(jobs, PseudoMaskConfig(method="grabcut", workers=2),
                                     progress=False)
    assert pooled == alone and counts_pooled == counts_alone
    assert counts_alone["images"] == 4 and counts_alone["masks"] == 8
    areas = np.array([result.areas[0] for result in alone])  # job order: the discs' sizes
    assert np.allclose(areas, np.pi * np.array([30, 20, 35, 15]) ** 2, rtol=0.1)
    decoded = mask_codec.decode_strings([alone[2].rles[0]], H, W)[0]
    assert decoded.sum() == alone[2].areas[0]
    assert iou(decoded, circle(H, W, 70, 60, 35)) > 0.9


def test_sam_needs_a_checkpoint():
    with pytest.raises(ConfigError, match=r"^sam_checkpoint: required with method 'sam'"):
        PseudoMaskConfig(method="sam")
    with pytest.raises(ConfigError, match=r"^source\.pseudo_masks\.sam_checkpoint: required"):
        SourceConfig.from_params({"pseudo_masks": {"method": "sam"}})
    with pytest.raises(ConfigError, match=r"^source\.pseudo_masks\.metod: unknown key"):
        SourceConfig.from_params({"pseudo_masks": {"metod": "box"}})


def test_a_box_with_nothing_inside_the_image_is_refused_by_index():
    image = scene([])
    with pytest.raises(ValueError, match=r"box 1 \[200.0, 10.0, 5.0, 5.0\] has no area"):
        pseudo_masks_for_image(image, np.array([[1, 1, 5, 5], [200, 10, 5, 5]]),
                               PseudoMaskConfig(method="box"))
    assert box_pixels([10, 10, 0, 5], H, W) is None
    assert box_pixels([10.2, 10.2, 0.3, 0.3], H, W) == (10, 10, 11, 11)  # under a pixel


TINY_SAM = {"image_size": 128, "patch_size": 16, "encoder_embed_dim": 32, "encoder_depth": 2,
            "encoder_num_heads": 2, "encoder_global_attn_indexes": [1], "window_size": 4,
            "prompt_embed_dim": 32, "mask_in_chans": 4, "decoder_mlp_dim": 64,
            "decoder_num_heads": 2, "iou_head_hidden_dim": 32}


def test_sam_prompts_each_box_and_keeps_its_answer_inside_the_box(tmp_path):
    torch = pytest.importorskip("torch")
    from instseg_pipeline.predict.sam import build_sam, load_sam, sam_config

    torch.manual_seed(0)
    path = tmp_path / "tiny_sam.pt"
    torch.save({"config": TINY_SAM, "state_dict": build_sam(sam_config("vit_b", TINY_SAM))
                .state_dict()}, path)
    disc, square = circle(H, W, 50, 60, 30), rect(H, W, 100, 20, 150, 100)
    image = scene([disc, square])
    boxes = np.array([coco_box(disc), coco_box(square)])
    config = PseudoMaskConfig(method="sam", sam_checkpoint=str(path), sam_model_type="custom")
    found = pseudo_masks_for_image(image, boxes, config)
    assert found.masks.shape == (2, H, W) and found.masks.dtype == bool
    sam = load_sam(path, "custom", device="cpu")
    raw, scores = sam.boxes(image, np.array([box_pixels(b, H, W) for b in boxes], np.float32))
    assert raw.shape == (2, H, W) and scores.shape == (2,)
    for mask, source, reason, answer, box in zip(found.masks, found.sources, found.fallbacks,
                                                 raw, boxes):
        x0, y0, x1, y1 = box_pixels(box, H, W)
        inside = main_components(answer[y0:y1, x0:x1])
        assert not mask[:, :x0].any() and not mask[:y0].any()
        if source == "sam":
            assert reason is None and np.array_equal(mask[y0:y1, x0:x1], inside)
        else:
            assert source == "box" and mask[y0:y1, x0:x1].all()
            share = inside.mean()
            assert reason == ("sam_failed" if share == 0 else
                              "too_small_in_box" if share < 0.1 else "too_large_in_box")
    # the loaded model can be handed in, and gives the same masks
    again = pseudo_masks_for_image(image, boxes, config, sam=sam)
    assert np.array_equal(again.masks, found.masks) and again.sources == found.sources
