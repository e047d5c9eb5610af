"""SOLOv2: Matrix NMS and the centre-region assignment against hand-computed values, the
model contract, parameters, the load round trip, ONNX parity and the overfit check."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
import yaml
from model_fixtures import one_thread, shapes_scene  # noqa: F401 (autouse)
from overfit import overfit

from instseg_pipeline.export import onnx as onnx_export
from instseg_pipeline.export import parity as onnx_parity
from instseg_pipeline.models import (
    build_model,
    check_eval_output,
    check_losses,
    family,
    load_model,
    model_config,
    solov2,
)
from instseg_pipeline.models.solov2_ops import (
    assign_targets,
    dice_loss,
    mass_centres,
    matrix_decay,
    matrix_nms,
    points_nms,
    tight_boxes,
)
from instseg_pipeline.predict.backends import OnnxBackend
from instseg_pipeline.predict.preprocess import to_chw, to_tensor

ROOT = Path(__file__).resolve().parents[2]
TINY = {"name": "solov2_tiny", "min_size": 96, "max_size": 128}
# an untrained network scores every cell near the focal prior 0.01: cut below it
EAGER = {**TINY, "score_threshold": 0.005, "update_threshold": 0.0}


# --- Matrix NMS by hand -----------------------------------------------------------------------

def strip_masks(spans: list[tuple[int, int]], length: int = 10) -> torch.Tensor:
    """bool [N, 1, length]: mask n covers pixels spans[n][0] .. spans[n][1] - 1."""
    masks = torch.zeros(len(spans), 1, length, dtype=torch.bool)
    for n, (start, stop) in enumerate(spans):
        masks[n, 0, start:stop] = True
    return masks


# m0 pixels 0-3, m1 2-5, m2 4-7 (each 4 pixels): IoU(m0, m1) = IoU(m1, m2) = 2 / 6 = 1/3,
# IoU(m0, m2) = 0; one class, scores 0.9 > 0.8 > 0.7
CHAIN = strip_masks([(0, 4), (2, 6), (4, 8)])
CHAIN_LABELS = torch.tensor([1, 1, 1])
CHAIN_SCORES = torch.tensor([0.9, 0.8, 0.7])


def test_matrix_nms_linear_by_hand():
    # m1: suppressed by m0 (compensate 0): 1 - 1/3 = 2/3. m2: by m1, whose own compensate
    # IoU is 1/3: (1 - 1/3) / (1 - 1/3) = 1, by m0 (IoU 0): 1 -> no decay: m1 was already
    # decayed, so it barely suppresses m2 (the compensation of Matrix NMS)
    decay = matrix_decay(CHAIN[:, 0], CHAIN_LABELS, kernel="linear")
    assert decay.tolist() == pytest.approx([1.0, 2 / 3, 1.0])
    scores, keep = matrix_nms(CHAIN, CHAIN_LABELS, CHAIN_SCORES, kernel="linear")
    assert keep.tolist() == [0, 2, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * 2 / 3])


def test_matrix_nms_gaussian_by_hand():
    # exp(-sigma (iou^2 - compensate^2)), sigma 2: m1 exp(-2 / 9); m2 min(exp(0) by m0,
    # exp(-2 (1/9 - 1/9)) by m1) = 1
    decay = matrix_decay(CHAIN[:, 0], CHAIN_LABELS, kernel="gaussian", sigma=2.0)
    assert decay.tolist() == pytest.approx([1.0, math.exp(-2 / 9), 1.0])
    scores, keep = matrix_nms(CHAIN, CHAIN_LABELS, CHAIN_SCORES, kernel="gaussian", sigma=2.0)
    assert keep.tolist() == [0, 2, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-2 / 9)])
    # sigma 0.5 decays less
    assert matrix_decay(CHAIN[:, 0], CHAIN_LABELS, sigma=0.5)[1] == pytest.approx(
        math.exp(-0.5 / 9))


@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
def test_matrix_nms_other_class_and_single_mask_class_are_not_decayed(kernel):
    # m3 equals m0 but is class 2, the only mask of its class: IoU 1 with m0 counts for
    # nothing, and m3 does not change anyone's compensation either
    masks = torch.cat([CHAIN, strip_masks([(0, 4)])])
    labels = torch.tensor([1, 1, 1, 2])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    decayed, keep = matrix_nms(masks, labels, scores, kernel=kernel)
    # m1: 0.8 * 2/3 = 0.533 (linear, below m3) or 0.8 * exp(-2/9) = 0.641 (gaussian, above)
    if kernel == "linear":
        assert keep.tolist() == [0, 2, 3, 1]
        assert decayed.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.8 * 2 / 3])
    else:
        assert keep.tolist() == [0, 2, 1, 3]
        assert decayed.tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-2 / 9), 0.6])


def test_matrix_nms_ties_keep_input_order():
    # two identical masks with equal scores: the first in input order suppresses the other
    twins = strip_masks([(3, 7), (3, 7)])
    labels, scores = torch.tensor([1, 1]), torch.tensor([0.5, 0.5])
    # gaussian: exp(-2 * 1) = 0.1353 -> 0.0677, above the update threshold 0.05
    decayed, keep = matrix_nms(twins, labels, scores, kernel="gaussian")
    assert keep.tolist() == [0, 1]
    assert decayed.tolist() == pytest.approx([0.5, 0.5 * math.exp(-2)])
    # linear: 1 - 1 = 0 -> dropped by the update threshold
    decayed, keep = matrix_nms(twins, labels, scores, kernel="linear")
    assert keep.tolist() == [0] and decayed.tolist() == pytest.approx([0.5])
    # a third twin (compensate IoU 1) divides by zero in the linear kernel; it must not
    # produce NaN, and it is dropped too
    triplets = strip_masks([(3, 7)] * 3)
    decayed, keep = matrix_nms(triplets, torch.tensor([1, 1, 1]), torch.tensor([0.4, 0.5, 0.5]),
                               kernel="linear")
    assert keep.tolist() == [1] and decayed.tolist() == pytest.approx([0.5])


def test_matrix_nms_caps_and_thresholds():
    scores, keep = matrix_nms(CHAIN, CHAIN_LABELS, CHAIN_SCORES, kernel="linear",
                              max_detections=2)
    assert keep.tolist() == [0, 2]
    scores, keep = matrix_nms(CHAIN, CHAIN_LABELS, CHAIN_SCORES, kernel="linear",
                              update_threshold=0.6)      # m1's 0.533 falls out
    assert keep.tolist() == [0, 2]
    # pre_top_k 2: m2 never enters, m1 is decayed by m0 only
    scores, keep = matrix_nms(CHAIN, CHAIN_LABELS, CHAIN_SCORES, kernel="linear", pre_top_k=2)
    assert keep.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.8 * 2 / 3])
    empty = matrix_nms(CHAIN[:0], CHAIN_LABELS[:0], CHAIN_SCORES[:0])
    assert [t.numel() for t in empty] == [0, 0]
    with pytest.raises(ValueError, match="kernel"):
        matrix_decay(CHAIN[:, 0], CHAIN_LABELS, kernel="box")


def test_points_nms_keeps_2x2_local_maxima():
    heat = torch.tensor([[0.1, 0.9, 0.2],
                         [0.3, 0.4, 0.2],
                         [0.1, 0.2, 0.8]])[None, None]
    # a cell survives when it is the max of the 2x2 window whose bottom-right corner it is
    kept = points_nms(heat)[0, 0]
    expected = torch.tensor([[0.1, 0.9, 0.0],
                             [0.3, 0.0, 0.0],
                             [0.0, 0.0, 0.8]])
    assert torch.equal(kept, expected)


# --- centre-region assignment by hand ---------------------------------------------------------

def box_mask(x1: int, y1: int, x2: int, y2: int, size: int = 64) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def l_shape() -> torch.Tensor:
    """Box [40, 0, 64, 16]: a 8x16 bar (cols 40-47, 128 px) and a 16x2 arm (cols 48-63,
    rows 0-1, 32 px). Mass centre: x = (44 * 128 + 56 * 32) / 160 = 46.4,
    y = (8 * 128 + 1 * 32) / 160 = 6.6; the box centre would be (8, 52)."""
    return box_mask(40, 0, 48, 16) | box_mask(48, 0, 64, 2)


def cells(level, instance: int) -> set[tuple[int, int]]:
    return {tuple(c) for c in torch.nonzero(level.owner == instance).tolist()}


def test_mass_centre_by_hand():
    centres = mass_centres(torch.stack([box_mask(8, 8, 26, 26), l_shape()]))
    assert centres.flatten().tolist() == pytest.approx([17.0, 17.0, 6.6, 46.4])


def test_centre_region_assignment_by_hand():
    # 64 x 64 input, level 0: 8 x 8 grid (8 px cells) for scales 0-20, level 1: 4 x 4 grid
    # (16 px cells) for scales 16-64
    boxes = torch.tensor([[8., 8., 26., 26.],     # A: scale 18, both levels
                          [0., 32., 64., 64.],    # B: scale sqrt(64 * 32) = 45.3, level 1
                          [40., 0., 64., 16.],    # C: scale sqrt(24 * 16) = 19.6, both
                          [0., 0., 10., 10.]])    # D: empty mask, nowhere
    masks = torch.stack([box_mask(8, 8, 26, 26), box_mask(0, 32, 64, 64), l_shape(),
                         torch.zeros(64, 64, dtype=torch.uint8)])
    labels = torch.tensor([1, 2, 3, 1])
    level0, level1 = assign_targets(boxes, labels, masks, [8, 4], [[0, 20], [16, 64]], 0.2)
    # A: centre 17 -> cell 2; half-size 0.1 * 18 = 1.8 -> [15.2, 18.8] -> cells 1-2
    assert cells(level0, 0) == {(r, c) for r in (1, 2) for c in (1, 2)}
    # C: mass centre (6.6, 46.4) -> row 0, col 5; y [5.0, 8.2] -> rows 0-1, x [44, 48.8]
    # -> cols 5-6 (the box centre 52 would give col 6 alone)
    assert cells(level0, 2) == {(0, 5), (0, 6), (1, 5), (1, 6)}
    assert cells(level0, 1) == cells(level0, 3) == set()
    # level 1: A [15.2, 18.8] / 16 -> cells 0-1; B centre (48, 32) -> (3, 2), y [44.8, 51.2]
    # -> rows 2-3, x [25.6, 38.4] -> cols 1-2; C rows 0, x [44, 48.8] -> cols 2-3
    assert cells(level1, 0) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert cells(level1, 1) == {(2, 1), (2, 2), (3, 1), (3, 2)}
    assert cells(level1, 2) == {(0, 2), (0, 3)}
    assert cells(level1, 3) == set()
    for level in (level0, level1):
        positive = level.owner >= 0
        assert torch.equal(level.labels[positive], labels[level.owner[positive]])
        assert int(level.labels[~positive].abs().sum()) == 0


def test_centre_region_is_at_most_3x3_and_later_instances_win():
    # sigma 1: B's region spans the whole width, but only the 3x3 cells around its
    # centre cell (3, 2) count: rows 2-3 (clipped at the edge), cols 1-3
    boxes = torch.tensor([[0., 32., 64., 64.], [16., 48., 48., 60.]])
    masks = torch.stack([box_mask(0, 32, 64, 64), box_mask(16, 48, 48, 60)])
    (level,) = assign_targets(boxes[:1], torch.tensor([2]), masks[:1], [4], [[16, 64]], 1.0)
    assert cells(level, 0) == {(r, c) for r in (2, 3) for c in (1, 2, 3)}
    # a second instance (scale sqrt(32 * 12) = 19.6: the same level) with the same centre
    # cell: centre (54, 32), y [52.8, 55.2] -> row 3, x [28.8, 35.2] -> cols 1-2; it
    # takes those cells over, B keeps row 2
    (level,) = assign_targets(boxes, torch.tensor([2, 1]), masks, [4], [[16, 64]], 0.2)
    assert cells(level, 1) == {(3, 1), (3, 2)}
    assert level.labels[3, 1] == 1 and cells(level, 0) == {(2, 1), (2, 2)}


def test_dice_and_tight_boxes_by_hand():
    # p = sigmoid(0) = 0.5 on two pixels, target (1, 0): 1 - 2 * 0.5 / (0.5 + 1 + eps)
    loss = dice_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(1 - 1 / 1.501)
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:7] = True
    assert tight_boxes(masks).tolist() == [[2, 1, 7, 3], [0, 0, 0, 0]]


# --- parameters and the contract --------------------------------------------------------------

def test_yaml_block_is_the_defaults():
    params = yaml.safe_load((ROOT / "conf/base/parameters_training.yml").read_text())
    assert params["training"]["families"]["solov2"] == solov2.DEFAULTS


def test_scale_ranges_follow_min_size():
    config = model_config({**TINY, "min_size": 400}, 3)
    network = build_model({**TINY, "min_size": 400}, 3)
    assert config["scale_ranges"] == solov2.DEFAULTS["scale_ranges"]
    assert network.cfg.scale_ranges[0] == pytest.approx((0.5, 48.0))   # 400 / 800 of 1, 96


@pytest.mark.parametrize(("key", "value"), [("kernel", "box"), ("num_grids", [40, 36]),
                                            ("scale_ranges", [[1, 96]] * 4 + [[9, 3]])])
def test_bad_settings_name_their_key(key, value):
    with pytest.raises(ValueError, match=f"training.model.{key}"):
        build_model({**TINY, key: value}, 3)


def images_and_targets() -> tuple[list[torch.Tensor], list[dict]]:
    rng = np.random.default_rng(0)
    scenes = [shapes_scene(rng, 96, 128), shapes_scene(rng, 120, 100)]
    return [to_tensor(image) for image, _ in scenes], [target for _, target in scenes]


def test_contract_in_eval_and_train_mode():
    torch.manual_seed(0)
    network = build_model(EAGER, 3)
    images, targets = images_and_targets()
    losses = network(images, targets)
    check_losses(losses, family("solov2_tiny").loss_names)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    network.eval()
    with torch.no_grad():
        outputs = network([*images, torch.zeros(3, 90, 110)])
    for output, image in zip(outputs, [*images, torch.zeros(3, 90, 110)]):
        n = check_eval_output(output, *image.shape[1:])
        assert 0 < n <= network.cfg.max_per_image
        assert torch.all(output["scores"][:-1] >= output["scores"][1:])
        # boxes are the tight boxes of the binary masks
        assert torch.equal(output["boxes"], tight_boxes(output["masks"][:, 0] >= 0.5))


def test_resnet50_sizes_build_with_the_papers_parameter_counts():
    counts = {name: sum(p.numel() for p in build_model({"name": name}, 81).parameters())
              for name in ("solov2_resnet50_fpn", "solov2_light_resnet50_fpn")}
    # mmdet's SOLOv2 R50: 46 M (our 46.6 M: torchvision's ResNet-50 with BatchNorm)
    assert 45.5e6 < counts["solov2_resnet50_fpn"] < 47.5e6
    assert 30e6 < counts["solov2_light_resnet50_fpn"] < 32.5e6
    assert build_model({"name": "solov2_resnet101_fpn", "head_convs": 1}, 3) is not None


def test_load_model_round_trip_gives_identical_outputs():
    torch.manual_seed(1)
    network = build_model(EAGER, 3).eval()
    config = model_config(EAGER, 3)
    restored = load_model(config, network.state_dict()).eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        before, after = network(images), restored(images)
    for a, b in zip(before, after):
        assert len(a["scores"]) > 0
        for key in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(a[key], b[key]), key


# --- ONNX -------------------------------------------------------------------------------------

ONNX_PARAMS = {**EAGER, "min_size": 128, "max_size": 160}
PARITY_SIZES = [(98, 131), (194, 96)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(network, path to model.onnx) of an untrained tiny SOLOv2 with low cuts, traced on
    a 144x176 scene."""
    torch.manual_seed(2)
    network = build_model(ONNX_PARAMS, 3).eval()
    path = tmp_path_factory.mktemp("solov2_onnx") / "model.onnx"
    example, _ = shapes_scene(np.random.default_rng(1), 144, 176)
    onnx_export.export_onnx(network, path, example=example, classes={1: "a", 2: "b"},
                            config=model_config(ONNX_PARAMS, 3))
    return network, path


def test_onnx_parity_on_two_sizes_and_a_blank_image(exported):
    network, path = exported
    rng = np.random.default_rng(3)
    images = [shapes_scene(rng, h, w)[0] for h, w in PARITY_SIZES]
    images, ids = onnx_parity.insert_blank(images, [f"{h}x{w}" for h, w in PARITY_SIZES])
    report = onnx_parity.check_parity(network, path, images, image_ids=ids)
    assert report["passed"], [r["failures"] for r in report["per_image"]]
    for record in report["per_image"]:
        assert record["eager_detections"] == record["onnx_detections"] > 0
    assert report["min_mask_iou"] >= onnx_parity.DEFAULT_PARITY["mask_iou_min"]


def test_onnx_graph_runs_the_empty_path(exported, tmp_path):
    """No category score above the cut: eager and the graph both return nothing (the graph
    was traced with detections, so this proves its ops accept zero candidates)."""
    network, path = exported
    model = onnx.load(str(path))
    (bias,) = [t for t in model.graph.initializer if t.name == "head.cate_out.bias"]
    bias.CopyFrom(onnx.numpy_helper.from_array(np.full(2, -50.0, np.float32), bias.name))
    silent = tmp_path / "silent.onnx"
    onnx.save(model, str(silent))
    image = to_chw(shapes_scene(np.random.default_rng(4), 100, 120)[0])
    raw = OnnxBackend(onnx_export.create_session(silent))(image)
    assert raw["scores"].shape == (0,) and raw["masks"].shape == (0, 1, 100, 120)
    bias = network.head.cate_out.bias
    original = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(-50.0)
        try:
            assert len(network([torch.from_numpy(image)])[0]["scores"]) == 0
        finally:
            bias.copy_(original)


# --- overfit ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_overfit_four_images(tmp_path):
    # Dice on masks upsampled to the input (mask_loss_stride 1): at 128 px the objects are
    # 20-40 px, a few pixels of the 1/4 mask feature
    model = {**TINY, "min_size": 128, "max_size": 128, "mask_loss_stride": 1}
    # lr 0.003 can saturate the dynamic kernels (logits far below zero, Dice stuck at 1)
    result = overfit(tmp_path, model, iters=200, lr=0.0015)
    assert result["segm"] >= 0.8, result["segm"]
