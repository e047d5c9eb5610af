"""YOLACT++: hand-computed Fast NMS, anchor matching, box coding, prototype assembly and
crop; the model contract, the parameter block, the round trip, ONNX parity and the overfit.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from model_fixtures import (
    one_thread,  # noqa: F401 (autouse)
    shapes_scene,
)
from overfit import overfit

from instseg_pipeline.models import (
    build_model,
    check_eval_output,
    check_losses,
    family,
    family_of,
    family_params,
    load_model,
    model_config,
)
from instseg_pipeline.models.yolact import DEFAULTS, LOSS_NAMES, Yolact
from instseg_pipeline.models.yolact_backbones import DeformableConv
from instseg_pipeline.models.yolact_parts import (
    anchor_shapes,
    assemble_masks,
    crop_masks,
    decode_boxes,
    encode_boxes,
    fast_nms,
    level_anchors,
    match_anchors,
)

TINY = {"name": "yolact_tiny", "min_size": 96, "max_size": 128}
PARAMETERS = Path(__file__).resolve().parents[2] / "conf" / "base" / "parameters_training.yml"
VARIANCES = (0.1, 0.2)
# mask AP 0.875 (box AP 0.88) at 250 steps with the deterministic engine, ~85 s of training
OVERFIT_ITERS = 250


def _nms(boxes, scores, iou=0.5, score=0.05, top_k=200, max_detections=100):
    return fast_nms(torch.as_tensor(boxes, dtype=torch.float32),
                    torch.as_tensor(scores, dtype=torch.float32), iou, score, top_k,
                    max_detections)


# --- Fast NMS ------------------------------------------------------------------------------

def test_fast_nms_lets_a_suppressed_box_still_suppress():
    # IoU(A, B) = IoU(B, C) = 70/130 > 0.5, IoU(A, C) = 40/160: greedy NMS would keep A
    # and C; Fast NMS drops C too, because B (dropped itself) is better than C
    boxes = [[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]]
    kept_boxes, scores, labels, index = _nms(boxes, [[0.9], [0.8], [0.7]])
    assert index.tolist() == [0]
    assert labels.tolist() == [1]
    assert scores.tolist() == pytest.approx([0.9])
    assert kept_boxes.tolist() == [[0, 0, 10, 10]]


def test_fast_nms_ties_keep_the_first_anchor_and_a_lone_class_survives():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 10], [30, 30, 40, 40]]
    # class 1: anchors 0 and 1 tie on the same box; class 2: anchor 2 alone
    scores = [[0.6, 0.01], [0.6, 0.01], [0.01, 0.3]]
    _, kept, labels, index = _nms(boxes, scores)
    assert index.tolist() == [0, 2]
    assert labels.tolist() == [1, 2]
    assert kept.tolist() == pytest.approx([0.6, 0.3])


def test_fast_nms_never_suppresses_across_classes():
    # one box scored for class 1, an overlapping one for class 2, and one anchor wanted by
    # both classes: all four detections survive, best first
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 70]]
    scores = [[0.9, 0.02], [0.02, 0.8], [0.4, 0.5]]
    _, kept, labels, index = _nms(boxes, scores)
    assert list(zip(index.tolist(), labels.tolist())) == [(0, 1), (1, 2), (2, 2), (2, 1)]
    assert kept.tolist() == pytest.approx([0.9, 0.8, 0.5, 0.4])


def test_fast_nms_applies_threshold_top_k_and_cap():
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(5)]  # disjoint
    scores = [[0.9], [0.8], [0.7], [0.6], [0.04]]
    assert _nms(boxes, scores)[3].tolist() == [0, 1, 2, 3]  # 0.04 < the 0.05 threshold
    assert _nms(boxes, scores, top_k=2)[3].tolist() == [0, 1]
    assert _nms(boxes, scores, max_detections=3)[3].tolist() == [0, 1, 2]
    empty = _nms(torch.zeros(0, 4), torch.zeros(0, 2))
    assert [t.shape[0] for t in empty] == [0, 0, 0, 0]


# --- anchors, matching, box coding ---------------------------------------------------------

def test_anchor_shapes_keep_the_area_and_follow_the_ratio():
    shapes = anchor_shapes(24.0, [1.0, 2.0], [1.0, 0.5, 2.0])
    expected = [[24, 24], [24 * math.sqrt(0.5), 24 / math.sqrt(0.5)],
                [24 * math.sqrt(2), 24 / math.sqrt(2)], [48, 48],
                [48 * math.sqrt(0.5), 48 / math.sqrt(0.5)], [48 * math.sqrt(2), 48 / math.sqrt(2)]]
    torch.testing.assert_close(shapes, torch.tensor(expected))


def test_level_anchors_are_cell_centred_in_row_major_order():
    shapes = torch.tensor([[4.0, 2.0]])
    anchors = level_anchors(shapes, torch.zeros(1, 1, 2, 3), (16, 24))  # stride 8
    assert anchors.tolist() == [[2, 3, 6, 5], [10, 3, 14, 5], [18, 3, 22, 5],
                                [2, 11, 6, 13], [10, 11, 14, 13], [18, 11, 22, 13]]


def test_anchor_scales_follow_min_size_relative_to_550():
    network = build_model({**TINY, "min_size": 275, "max_size": 400}, 3)
    first = network.anchor_shapes[0]  # P3: the paper's 24 px at 550 -> 12 px at 275
    assert first[0].tolist() == pytest.approx([12.0, 12.0])
    assert first[3].tolist() == pytest.approx([12 * 2 ** (1 / 3)] * 2)
    assert len(network.anchor_shapes) == 5 and first.shape == (9, 2)


def test_matching_marks_positive_negative_neutral_and_forces_each_box_a_match():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [100, 100, 104, 104]])
    gt_labels = torch.tensor([2, 1])
    anchors = torch.tensor([
        [0.0, 0, 10, 10],      # IoU 1 with box 0: positive
        [0, 0, 10, 20],        # IoU 0.5: positive (>= 0.5)
        [0, 0, 10, 22],        # IoU 100/220 = 0.45: neutral
        [0, 0, 10, 30],        # IoU 1/3: negative
        [50, 50, 60, 60],      # IoU 0: negative
        [100, 100, 110, 110],  # IoU 0.16 with box 1, but its best anchor: positive
    ])
    labels, matched = match_anchors(anchors, gt_boxes, gt_labels, 0.5, 0.4)
    assert labels.tolist() == [2, 2, -1, 0, 0, 1]
    assert matched[[0, 1, 5]].tolist() == [0, 0, 1]


def test_matching_without_boxes_makes_every_anchor_negative():
    labels, _ = match_anchors(torch.tensor([[0.0, 0, 4, 4]]), torch.zeros(0, 4),
                              torch.zeros(0, dtype=torch.int64), 0.5, 0.4)
    assert labels.tolist() == [0]


def test_box_targets_are_ssd_offsets_with_variances():
    anchor = torch.tensor([[0.0, 0, 10, 20]])  # centre (5, 10), size (10, 20)
    box = torch.tensor([[0.0, 0, 10, 10]])     # centre (5, 5), size (10, 10)
    offsets = encode_boxes(box, anchor, VARIANCES)
    # ((5-5)/(0.1*10), (5-10)/(0.1*20), log(10/10)/0.2, log(10/20)/0.2)
    assert offsets[0].tolist() == pytest.approx([0.0, -2.5, 0.0, math.log(0.5) / 0.2])
    torch.testing.assert_close(decode_boxes(offsets, anchor, VARIANCES), box)


# --- prototypes, assembly and crop ---------------------------------------------------------

def _prototypes() -> torch.Tensor:
    """[4, 5, 2]: prototype 0 is all ones, prototype 1 is the column index."""
    ones = torch.ones(4, 5)
    columns = torch.arange(5.0).expand(4, 5)
    return torch.stack([ones, columns], dim=-1)


def test_assembly_is_the_linear_combination_of_prototypes():
    coefficients = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])
    masks = assemble_masks(_prototypes(), coefficients)
    columns = torch.arange(5.0).expand(4, 5)
    assert masks.shape == (3, 4, 5)
    assert torch.equal(masks[0], torch.ones(4, 5))
    assert torch.equal(masks[1], columns)
    assert torch.equal(masks[2], 2 - columns)


def test_crop_keeps_the_pixels_the_box_overlaps_and_zeroes_the_rest():
    masks = torch.sigmoid(assemble_masks(_prototypes(), torch.tensor([[0.0, 0.0]])))
    cropped = crop_masks(masks, torch.tensor([[1.5, 0.5, 3.0, 2.0]]))
    expected = torch.zeros(4, 5)
    expected[0:2, 1:3] = 0.5  # columns 1, 2 and rows 0, 1 overlap the box
    assert torch.equal(cropped[0], expected)


def test_pasted_masks_are_zero_outside_their_box_at_input_size():
    network = build_model(TINY, 3).eval()
    masks = torch.ones(1, 48, 64)  # prototype resolution of a 96x128 batch (stride 2)
    box = torch.tensor([[10.0, 20.0, 50.0, 60.0]])  # input pixels of a 96x128 image
    pasted = network._paste(masks, box, (96, 128), (96, 128), (96, 128))
    assert pasted.shape == (1, 96, 128)
    assert torch.all(pasted[0, 20:60, 10:50] == 1)
    pasted[0, 20:60, 10:50] = 0
    assert torch.all(pasted == 0)


# --- the network and its family ------------------------------------------------------------

def test_tiny_eval_output_meets_the_contract_on_two_sizes_and_a_blank_image():
    torch.manual_seed(0)
    network = build_model(TINY, 3).eval()
    images = [torch.rand(3, 96, 128), torch.rand(3, 120, 100), torch.zeros(3, 96, 128)]
    with torch.no_grad():
        outputs = network(images)
    for output, image in zip(outputs, images):
        found = check_eval_output(output, *image.shape[1:])
        assert 0 < found <= network.detections_per_img  # untrained: scores ~1/3 everywhere
        assert torch.all(output["scores"][:-1] >= output["scores"][1:])
        assert torch.all(output["scores"] > network.score_threshold)


def test_tiny_train_output_has_the_declared_losses():
    torch.manual_seed(0)
    network = build_model(TINY, 3).train()
    assert _deformable(network) == 2  # C4 and C5 (C3's would dominate a CPU step)
    image, target = shapes_scene(np.random.default_rng(0), 96, 128)
    blank = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 96, 128, dtype=torch.uint8)}
    images = [torch.from_numpy(image).permute(2, 0, 1).float() / 255, torch.zeros(3, 96, 128)]
    losses = network(images, [target, blank])
    check_losses(losses, family("yolact_tiny").loss_names)
    assert set(LOSS_NAMES) == set(losses)
    assert all(float(v.detach()) > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in network.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _deformable(model: torch.nn.Module) -> int:
    return sum(isinstance(m, DeformableConv) for m in model.modules())


def test_resnet50_size_builds_near_the_paper_parameter_count():
    model = build_model({"name": "yolact_plus_resnet50_fpn"}, 81)
    # the paper reports ~34 M for YOLACT++ ResNet-50 on COCO (81 classes)
    assert 32_500_000 < _count(model) < 34_500_000
    # ResNet-50 C3-C5 hold 4, 6, 3 blocks: blocks 0 and 3, 0 and 3, 0 are deformable
    assert _deformable(model) == 5
    assert _deformable(build_model({"name": "yolact_plus_resnet50_fpn", "dcn_interval": 0},
                                   81)) == 0


def test_resnet101_size_builds_with_its_deformable_interval():
    model = build_model({"name": "yolact_plus_resnet101_fpn"}, 81)
    # C3-C5 of ResNet-101 hold 4, 23, 3 blocks: 2 + 8 + 1 deformable at interval 3
    assert _deformable(model) == 11
    assert _count(model) > 50_000_000


def test_parameter_block_repeats_the_defaults_and_overrides_apply():
    block = yaml.safe_load(PARAMETERS.read_text())["training"]["families"]["yolact"]
    assert block == DEFAULTS
    params = family_params({"name": "yolact_tiny", "num_prototypes": 8},
                           {"yolact": block})
    network = build_model(params, 3)
    assert network.protonet.after[-2].out_channels == 8
    assert network.settings["fpn_channels"] == 64  # null in the block: the size's own
    with pytest.raises(ValueError, match="training.model.nms_iuo"):
        build_model({**TINY, "nms_iuo": 0.5}, 3)
    with pytest.raises(ValueError, match="negative_iou"):
        build_model({**TINY, "negative_iou": 0.6}, 3)


def test_postprocess_cuts_are_the_network_settings():
    network = build_model({**TINY, "score_threshold": 0.2, "detections_per_img": 7}, 3)
    assert family_of(network).postprocess_cuts(network) == {"score_threshold": 0.2,
                                                            "detections_per_img": 7}


def test_round_trip_through_model_config_gives_identical_outputs():
    torch.manual_seed(1)
    params = {**TINY, "num_prototypes": 8}
    network = build_model(params, 3).eval()
    config = model_config(params, 3)
    assert config["num_prototypes"] == 8 and config["anchor_scales"] == [24, 48, 96, 192, 384]
    rebuilt = load_model(config, network.state_dict()).eval()
    assert isinstance(rebuilt, Yolact)
    image = [torch.rand(3, 100, 120)]
    with torch.no_grad():
        first, second = network(image)[0], rebuilt(image)[0]
    assert len(first["scores"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(first[key], second[key]), key


# --- ONNX ----------------------------------------------------------------------------------

PARITY_SIZES = [(98, 131), (120, 100)]


def _scene_network():
    """An untrained tiny network whose score threshold lies between its best score on a
    blank image and on a scene: the scene has detections, the blank image none."""
    torch.manual_seed(0)
    network = build_model(TINY, 3).eval()
    example, _ = shapes_scene(np.random.default_rng(1), 112, 128)
    scene = torch.from_numpy(example).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        best_scene, best_blank = (float(network([x])[0]["scores"][:1].max())
                                  for x in (scene, torch.zeros(3, 98, 131)))
    assert best_scene > best_blank + 0.002, (best_scene, best_blank)
    network.score_threshold = (best_scene + best_blank) / 2
    return network, example


@pytest.mark.slow
def test_onnx_export_at_opset_19_matches_eager_on_two_sizes_and_a_blank_image(tmp_path):
    """The project's default opset (17) is raised to the family's minimum, DeformConv's 19."""
    from instseg_pipeline.export import onnx as onnx_export
    from instseg_pipeline.export import parity as onnx_parity

    network, example = _scene_network()
    path = tmp_path / "yolact.onnx"
    manifest = onnx_export.export_onnx(network, path, opset=17, example=example)
    assert manifest["opset"] == 19
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert "DeformConv" in ops
    rng = np.random.default_rng(1)
    images = [shapes_scene(rng, h, w)[0] for h, w in PARITY_SIZES]
    images[0] = example[:98, :128].copy()  # a crop of the example keeps detections
    images, ids = onnx_parity.insert_blank(images, [f"{h}x{w}" for h, w in PARITY_SIZES])
    report = onnx_parity.check_parity(network, path, images, image_ids=ids)
    assert report["passed"], [r["failures"] for r in report["per_image"]]
    assert report["no_detection_case_covered"]
    records = {r["image_id"]: r for r in report["per_image"]}
    assert records[onnx_parity.BLANK_ID]["onnx_detections"] == 0
    assert records[ids[0]]["matched"] == records[ids[0]]["eager_detections"] > 0


@pytest.mark.slow
def test_onnx_export_below_opset_19_names_the_deformable_conv(tmp_path):
    from instseg_pipeline.export import onnx as onnx_export

    network, example = _scene_network()
    tensor, _ = onnx_export._example(network.eval(), example, example.shape[:2])
    with pytest.raises(Exception, match="opset >= 19"):  # traced below the family's minimum
        onnx_export._trace_to_onnx(network, tensor, tmp_path / "old.onnx", 17, True)


# --- overfitting four images ---------------------------------------------------------------

@pytest.mark.slow
def test_tiny_overfits_four_images(tmp_path):
    started = time.perf_counter()
    result = overfit(tmp_path, {"name": "yolact_tiny", "min_size": 128, "max_size": 128},
                     iters=OVERFIT_ITERS, lr=0.002)
    elapsed = time.perf_counter() - started
    history = result["history"]
    assert result["segm"] >= 0.8, (result["segm"], result["bbox"], elapsed)
    for name in LOSS_NAMES:
        assert history[name].tail(20).mean() < history[name].head(20).mean(), name
