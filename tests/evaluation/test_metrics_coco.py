"""COCO evaluation: published reference numbers, both backends against pycocotools run
directly on seeded random data, and the edge cases (no predictions, crowd-only images,
categories without GT, unknown ids)."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pandas as pd
import pytest
from coco_fixtures import REFERENCE, fake_paths
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instseg_pipeline.evaluation import MetricInputError
from instseg_pipeline.evaluation.coco import (
    BACKENDS,
    STAT_NAMES,
    coco_eval_details,
    coco_stats,
    evaluate_files,
)

IOU_TYPES = ("segm", "bbox")


def _as_vector(stats: dict) -> np.ndarray:
    assert list(stats) == list(STAT_NAMES)
    assert all(isinstance(v, float) for v in stats.values())
    return np.array(list(stats.values()))


def _direct_pycocotools(gt: dict, results: list, iou_type: str, cat_ids=None) -> np.ndarray:
    """pycocotools COCOeval run by hand, the way its own demo does."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[:12])


# ---------------------------------------------------------------- seeded random data

def _ellipse(rng, height, width) -> np.ndarray:
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(2, height / 2), rng.uniform(2, width / 2)
    yy, xx = np.mgrid[:height, :width]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if not mask.any():
        mask[int(min(cy, height - 1)), int(min(cx, width - 1))] = True
    return mask.astype(np.uint8)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _gt_annotation(rng, ann_id, image_id, height, width, crowd) -> tuple[dict, np.ndarray]:
    if crowd:
        mask = np.zeros((height, width), np.uint8)
        mask[: height // 2, : width // 2] = 1
        segmentation = _rle(mask)
    elif rng.random() < 0.2:  # some GT as polygons, which both libraries rasterize
        x0, y0 = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        x1, y1 = rng.uniform(x0 + 2, width), rng.uniform(y0 + 2, height)
        segmentation = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        polygon = mask_utils.frPyObjects(segmentation, height, width)
        mask = mask_utils.decode(mask_utils.merge(polygon))
    else:
        mask = _ellipse(rng, height, width)
        segmentation = _rle(mask)
    rle = mask_utils.encode(np.asfortranarray(mask))
    ann = {"id": ann_id, "image_id": image_id, "category_id": int(rng.integers(1, 4)),
           "segmentation": segmentation, "area": float(mask_utils.area(rle)),
           "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(crowd)}
    return ann, mask


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The mask moved by (dy, dx) pixels, cut at the image border (no wrap-around)."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        mask[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def _prediction(rng, image_id, category_id, mask, iou_type) -> dict:
    dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
    jittered = _shifted(mask, dy, dx)
    if not jittered.any():
        jittered = mask
    result = {"image_id": image_id, "category_id": category_id, "score": float(rng.random())}
    rle = mask_utils.encode(np.asfortranarray(jittered))
    if iou_type == "segm":
        result["segmentation"] = _rle(jittered)
    else:
        box = mask_utils.toBbox(rle) + rng.normal(0, 1.5, size=4)
        result["bbox"] = [float(box[0]), float(box[1]),
                          float(max(box[2], 1)), float(max(box[3], 1))]
    return result


def _image_predictions(rng, image_id, pairs, height, width, iou_type) -> list[dict]:
    results = []
    for category_id, mask in pairs:
        if rng.random() < 0.8:
            wrong = rng.random() < 0.1
            results.append(_prediction(rng, image_id, 4 if wrong else category_id, mask, iou_type))
    for _ in range(int(rng.integers(0, 4))):  # false positives, some of category 4 (no GT)
        fp = _ellipse(rng, height, width)
        results.append(_prediction(rng, image_id, int(rng.integers(1, 5)), fp, iou_type))
    return results


def random_coco(seed: int, iou_type: str, n_images: int = 200) -> tuple[dict, list[dict]]:
    """GT (crowd regions, empty images, polygons, a category without GT) and jittered
    predictions (none at all on some images with GT)."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, n_images + 1):
        height, width = (int(v) for v in rng.integers(24, 160, size=2))
        images.append({"id": image_id, "height": height, "width": width,
                       "file_name": f"{image_id}.png"})
        n_gt = 0 if rng.random() < 0.1 else int(rng.integers(1, 6))
        pairs = []
        for k in range(n_gt):
            crowd = k == 0 and rng.random() < 0.15
            ann, mask = _gt_annotation(rng, len(annotations) + 1, image_id, height, width, crowd)
            annotations.append(ann)
            pairs.append((ann["category_id"], mask))
        if rng.random() >= 0.1:
            results += _image_predictions(rng, image_id, pairs, height, width, iou_type)
    categories = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in range(1, 5)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.fixture(scope="module", params=IOU_TYPES)
def random_data(request):
    gt, results = random_coco(seed=7, iou_type=request.param)
    return request.param, gt, results


# ---------------------------------------------------------------- reference numbers

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_reference_numbers_from_files(fake_results_dir, iou_type, backend):
    gt_path, results_path = fake_paths(fake_results_dir, iou_type)
    stats = evaluate_files(gt_path, results_path, iou_type=iou_type, backend=backend)
    np.testing.assert_allclose(_as_vector(stats), REFERENCE[iou_type], rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_numbers_from_coco_object(fake_results_dir, backend):
    gt_path, results_path = fake_paths(fake_results_dir, "segm")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
    results = json.loads(results_path.read_text())
    stats = coco_stats(gt, results, iou_type="segm", backend=backend)
    np.testing.assert_allclose(_as_vector(stats), REFERENCE["segm"], rtol=0, atol=1e-10)


# ---------------------------------------------------------------- differential

def test_random_data_has_the_cases_it_claims(random_data):
    _, gt, results = random_data
    with_gt = {a["image_id"] for a in gt["annotations"]}
    with_results = {r["image_id"] for r in results}
    assert len(gt["images"]) - len(with_gt) >= 5, "expected empty images"
    assert len(with_gt - with_results) >= 5, "expected images with GT but no predictions"
    assert sum(a["iscrowd"] for a in gt["annotations"]) >= 5, "expected crowd regions"
    assert any(r["category_id"] == 4 for r in results), "expected a category without GT"


def test_backends_equal_pycocotools_direct(random_data):
    iou_type, gt, results = random_data
    direct = _direct_pycocotools(gt, results, iou_type)
    assert direct[0] > 0.1, "random data should give a non-trivial mAP"
    for backend in BACKENDS:
        ours = _as_vector(coco_stats(gt, results, iou_type=iou_type, backend=backend))
        np.testing.assert_allclose(ours, direct, rtol=0, atol=1e-12, err_msg=backend)


def test_details_agree_across_backends(random_data):
    iou_type, gt, results = random_data
    ref, fast = (coco_eval_details(gt, results, iou_type, backend=b) for b in BACKENDS)
    assert ref["precision"].shape == (10, 101, 4, 4, 3)
    assert ref["recall"].shape == (10, 4, 4, 3)
    np.testing.assert_allclose(fast["precision"], ref["precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast["recall"], ref["recall"], rtol=0, atol=1e-12)
    ref_ap = [row["ap"] for row in ref["per_class_ap"]]
    fast_ap = [row["ap"] for row in fast["per_class_ap"]]
    assert fast_ap[:3] == pytest.approx(ref_ap[:3], abs=1e-12)
    assert fast_ap[3] is None and ref_ap[3] is None
    assert ref["category_ids"] == [1, 2, 3, 4]
    np.testing.assert_allclose(ref["iou_thresholds"], np.linspace(0.5, 0.95, 10))


def test_per_class_ap_equals_single_category_eval(random_data):
    iou_type, gt, results = random_data
    details = coco_eval_details(gt, results, iou_type)
    by_id = {row["category_id"]: row for row in details["per_class_ap"]}
    for category_id in (1, 3):
        single = _direct_pycocotools(gt, results, iou_type, cat_ids=[category_id])[0]
        assert by_id[category_id]["ap"] == pytest.approx(single, abs=1e-12)
        assert by_id[category_id]["name"] == f"class{category_id}"
    assert by_id[4]["ap"] is None, "a category without GT has no AP"


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_no_predictions_at_all(iou_type):
    gt, _ = random_coco(seed=3, iou_type=iou_type, n_images=30)
    areas = np.array([a["area"] for a in gt["annotations"] if not a["iscrowd"]])
    has = {"small": (areas < 32 ** 2).any(),
           "medium": ((areas >= 32 ** 2) & (areas < 96 ** 2)).any(),
           "large": (areas >= 96 ** 2).any()}
    for backend in BACKENDS:
        stats = coco_stats(gt, [], iou_type=iou_type, backend=backend)
        for name, value in stats.items():
            size = name.split("_")[-1]
            assert value == (-1.0 if size in has and not has[size] else 0.0), (backend, name)


def test_category_without_gt_does_not_change_stats(random_data):
    iou_type, gt, results = random_data
    kept = [r for r in results if r["category_id"] != 4]
    without = {**gt, "categories": gt["categories"][:3]}
    for backend in BACKENDS:
        expected = coco_stats(without, kept, iou_type, backend)
        assert coco_stats(gt, results, iou_type, backend) == expected


def _crowd_only_case(iou_type: str):
    """Image 1: one person; image 2: only a crowd region (left half)."""
    person = np.zeros((40, 40), np.uint8)
    person[5:25, 5:25] = 1
    crowd = np.zeros((40, 40), np.uint8)
    crowd[:, :20] = 1
    gt = {"images": [{"id": 1, "height": 40, "width": 40}, {"id": 2, "height": 40, "width": 40}],
          "categories": [{"id": 1, "name": "person"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 400.0,
               "bbox": [5.0, 5.0, 20.0, 20.0], "segmentation": _rle(person)},
              {"id": 2, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 800.0,
               "bbox": [0.0, 0.0, 20.0, 40.0], "segmentation": _rle(crowd)}]}
    inside = np.zeros((40, 40), np.uint8)
    inside[10:20, 2:12] = 1
    outside = np.zeros((40, 40), np.uint8)
    outside[10:20, 25:35] = 1

    def result(image_id, mask, score):
        box = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))
        geometry = ({"segmentation": _rle(mask)} if iou_type == "segm"
                    else {"bbox": [float(v) for v in box]})
        return {"image_id": image_id, "category_id": 1, "score": score, **geometry}

    return gt, result(1, person, 0.5), result(2, inside, 0.9), result(2, outside, 0.8)


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_image_with_only_crowd_gt(iou_type):
    gt, hit, on_crowd, off_crowd = _crowd_only_case(iou_type)
    for backend in BACKENDS:
        alone = coco_stats(gt, [hit], iou_type, backend)
        assert alone["mAP"] == pytest.approx(1.0)
        # a detection inside the crowd region is ignored, not a false positive
        assert coco_stats(gt, [hit, on_crowd], iou_type, backend) == alone
        # one outside it is a false positive that outranks the true positive
        with_fp = coco_stats(gt, [hit, on_crowd, off_crowd], iou_type, backend)
        assert with_fp["mAP"] < 0.6
        np.testing.assert_allclose(
            _as_vector(with_fp), _direct_pycocotools(gt, [hit, on_crowd, off_crowd], iou_type),
            rtol=0, atol=1e-12)


def test_unknown_image_ids_are_named():
    gt, hit, _, _ = _crowd_only_case("segm")
    stray = [dict(hit, image_id=77), dict(hit, image_id=78), hit]
    for backend in BACKENDS:
        with pytest.raises(MetricInputError,
                           match=r"2 image id\(s\) not in the ground truth: 77, 78"):
            coco_stats(gt, stray, "segm", backend)


def test_unknown_category_ids_are_named():
    gt, hit, _, _ = _crowd_only_case("bbox")
    with pytest.raises(MetricInputError, match=r"category id\(s\) not in the ground truth: 9"):
        coco_stats(gt, [dict(hit, category_id=9)], "bbox")


@pytest.mark.parametrize("bad, message", [
    ({"score": float("nan")}, "score nan is not finite"),
    ({"score": "high"}, "score 'high' is not a number"),
    ({"segmentation": {"size": [10, 10], "counts": "PP4"}}, "differs from the image size"),
    ({"segmentation": None}, "no segmentation"),
])
def test_bad_results_are_rejected(bad, message):
    gt, hit, _, _ = _crowd_only_case("segm")
    with pytest.raises(MetricInputError, match=message):
        coco_stats(gt, [hit, {**hit, **bad}], "segm")


@pytest.mark.parametrize("change, message", [
    (lambda gt: gt["annotations"][0].update(image_id=5), "annotation 1: refers to image id 5"),
    (lambda gt: gt["annotations"][1].update(area="big"),
     "annotation 2: area 'big' is not a number"),
    (lambda gt: gt["annotations"][0].update(category_id=3), "category id 3, not in categories"),
    (lambda gt: gt["annotations"][0].update(segmentation=[[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]]),
     "non-finite coordinate"),
    (lambda gt: gt["images"].append({"id": 1, "height": 40, "width": 40}),
     "image 1: appears twice"),
    (lambda gt: gt.pop("categories"), "'categories' is missing"),
])
def test_bad_ground_truth_is_rejected(change, message):
    gt, hit, _, _ = _crowd_only_case("segm")
    change(gt)
    with pytest.raises(MetricInputError, match=message):
        coco_stats(gt, [hit], "segm")


def test_bad_iou_type_and_backend():
    gt, hit, _, _ = _crowd_only_case("segm")
    with pytest.raises(MetricInputError, match="iou_type"):
        coco_stats(gt, [hit], "keypoints")
    with pytest.raises(MetricInputError, match="backend"):
        coco_stats(gt, [hit], "segm", backend="detectron")


def test_segm_results_are_sized_by_mask_not_box():
    gt, results = random_coco(seed=5, iou_type="segm", n_images=40)
    boxed = [{**r, "bbox": [0.0, 0.0, 150.0, 150.0]} for r in results]  # all "large" boxes
    assert coco_stats(gt, boxed, "segm") == coco_stats(gt, results, "segm")


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_dataframe_results_equal_list_results(iou_type):
    gt, results = random_coco(seed=11, iou_type="segm", n_images=40)
    sizes = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    frame = pd.DataFrame({
        "image_id": [r["image_id"] for r in results],
        "category_id": [r["category_id"] for r in results],
        "score": [r["score"] for r in results],
        "bbox": [list(mask_utils.toBbox(r["segmentation"])) for r in results],
        "rle": [r["segmentation"]["counts"] for r in results],
        "height": [sizes[r["image_id"]][0] for r in results],
        "width": [sizes[r["image_id"]][1] for r in results]})
    as_list = results if iou_type == "segm" else [
        {k: v for k, v in r.items() if k != "segmentation"} | {"bbox": b}
        for r, b in zip(results, frame["bbox"], strict=True)]
    assert coco_stats(gt, frame, iou_type) == coco_stats(gt, as_list, iou_type)
    with pytest.raises(MetricInputError, match="lacks column"):
        coco_stats(gt, frame.drop(columns=["rle"]), "segm")


def test_inputs_untouched_and_nothing_printed(random_data, capsys):
    iou_type, gt, results = random_data
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    for backend in BACKENDS:
        coco_eval_details(gt, results, iou_type, backend=backend)
    assert gt == gt_before and results == results_before
    assert capsys.readouterr().out == ""


def test_zero_annotation_ids_are_handled():
    # Both libraries take GT id 0 for "unmatched"; we renumber so it is matched once only.
    gt, hit, _, _ = _crowd_only_case("segm")
    gt["annotations"][0]["id"] = 0
    duplicate = {**hit, "score": 0.4}
    for backend in BACKENDS:
        stats = coco_stats(gt, [hit, duplicate], "segm", backend)
        assert stats["mAP"] == pytest.approx(1.0)
        assert stats["AR_1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- files

def test_evaluate_files_errors_name_the_file(tmp_path, fake_results_dir):
    gt_path, results_path = fake_paths(fake_results_dir, "bbox")
    missing = tmp_path / "missing.json"
    with pytest.raises(MetricInputError, match=f"{missing}.*does not exist"):
        evaluate_files(missing, results_path, "bbox")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MetricInputError, match=f"{broken}.*not valid JSON"):
        evaluate_files(gt_path, broken, "bbox")
    shaped = tmp_path / "shaped.json"
    shaped.write_text(json.dumps({"images": []}))
    with pytest.raises(MetricInputError, match=f"{shaped}.*'annotations' is missing"):
        evaluate_files(shaped, results_path, "bbox")
    with pytest.raises(MetricInputError, match=f"{gt_path}.*list of result objects"):
        evaluate_files(gt_path, gt_path, "bbox")
