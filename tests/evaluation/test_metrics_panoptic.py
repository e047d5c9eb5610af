"""Panoptic quality: self-consistency on coco128, agreement with torchmetrics on perturbed
predictions, hand-computed void / crowd cases, the instance -> panoptic path and errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from instseg_pipeline.data.masks import rle_to_string, segmentation_to_rle
from instseg_pipeline.data.tables import make_categories, make_images, make_instances
from instseg_pipeline.evaluation import MetricInputError
from instseg_pipeline.evaluation.panoptic import (
    PanopticSample,
    instances_to_panoptic,
    instances_to_panoptic_gt,
    pq_compute,
    pq_from_arrays,
    pq_from_files,
    pq_from_tables,
    read_id_map,
    write_id_map,
)

HOLE = -1
TOL = 1e-6  # torchmetrics divides int tensors, so its IoUs are float32 (errors near 3e-8)


def _panoptic(coco128_dir: Path, split: str) -> tuple[dict, Path]:
    annotations = coco128_dir / "annotations"
    gt_json = json.loads((annotations / f"panoptic_{split}2017.json").read_text())
    return gt_json, annotations / f"panoptic_{split}2017"


def _crowd_free(gt_json: dict) -> list[dict]:
    return [a for a in gt_json["annotations"]
            if not any(s["iscrowd"] for s in a["segments_info"])]


def _subset_json(gt_json: dict, annotations: list[dict]) -> dict:
    ids = {a["image_id"] for a in annotations}
    return {**gt_json, "annotations": annotations,
            "images": [i for i in gt_json["images"] if i["id"] in ids]}


# ------------------------------------------------------------------- (a) GT against itself
@pytest.mark.parametrize("split", ["train", "val"])
def test_ground_truth_against_itself_is_perfect(coco128_dir, split):
    annotations = coco128_dir / "annotations"
    gt_json = annotations / f"panoptic_{split}2017.json"
    folder = annotations / f"panoptic_{split}2017"
    result = pq_from_files(gt_json, folder, gt_json, folder)
    assert set(result) == {"all", "things", "stuff"}
    for group in result.values():
        assert group["n"] > 0
        assert group["pq"] == group["sq"] == group["rq"] == 1.0
    assert result["all"]["n"] == result["things"]["n"] + result["stuff"]["n"]


# ------------------------------------------------------------------- (b) against torchmetrics
def _prune(ids: np.ndarray, segments: list[dict]) -> list[dict]:
    present = set(np.unique(ids).tolist())
    return [s for s in segments if s["id"] in present]


def _small_gt(gt_folder: Path, ann: dict) -> tuple[np.ndarray, list[dict]]:
    # Every 4th pixel: torchmetrics' torch.unique over pixel pairs takes ~2 s per full image.
    ids = read_id_map(gt_folder / ann["file_name"])[::4, ::4].copy()
    segments = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": 0}
                for s in ann["segments_info"]]
    return ids, _prune(ids, segments)


def _things(segments, isthing):
    return [s for s in segments if isthing[s["category_id"]]]


def _drop(ids, segments, isthing, rng):
    dropped = rng.choice(len(segments), size=max(1, len(segments) // 3), replace=False)
    for index in dropped:
        ids[ids == segments[index]["id"]] = HOLE
    return ids, [s for i, s in enumerate(segments) if i not in set(dropped.tolist())]


def _shift(ids, segments, isthing, rng):
    for segment in _things(segments, isthing)[:3]:
        mask = ids == segment["id"]
        ids[mask] = HOLE
        moved = np.roll(mask, (int(rng.integers(2, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
        moved[:4] = False  # no wrap-around from the bottom rows
        ids[moved] = segment["id"]
    return ids, segments


def _merge(ids, segments, isthing, rng):
    things = _things(segments, isthing)
    for a in things:
        twins = [b for b in things if b["category_id"] == a["category_id"] and b is not a]
        if twins:
            ids[ids == twins[0]["id"]] = a["id"]
            return ids, [s for s in segments if s is not twins[0]]
    return ids, segments


def _split(ids, segments, isthing, rng):
    biggest = max(_things(segments, isthing), key=lambda s: int((ids == s["id"]).sum()))
    rows, cols = np.nonzero(ids == biggest["id"])
    right = cols >= np.median(cols)
    new_id = int(ids.max()) + 1
    ids[rows[right], cols[right]] = new_id
    return ids, segments + [{**biggest, "id": new_id}]


def _relabel(ids, segments, isthing, rng):
    thing_ids = sorted(c for c, t in isthing.items() if t)
    chosen = _things(segments, isthing)[0]
    other = thing_ids[(thing_ids.index(chosen["category_id"]) + 1) % len(thing_ids)]
    return ids, [{**s, "category_id": other} if s is chosen else s for s in segments]


PERTURBATIONS = {"drop": _drop, "shift": _shift, "merge": _merge, "split": _split,
                 "relabel": _relabel}


def _fill_holes(gt_ids, ids, segments, isthing):
    """Holes become void where the GT is void and a filler segment elsewhere.

    torchmetrics differs from the COCO rules only where a prediction is void on labelled GT
    (it also leaves those pixels out of unions and skips false negatives mostly predicted
    void) and on crowd; crowd-free GT and predictions void only on GT void make the two agree.
    The filler is a stuff category absent from the image: torchmetrics merges same-category
    stuff, so each stuff category keeps a single segment."""
    used = {s["category_id"] for s in segments}
    filler = next(c for c, t in sorted(isthing.items()) if not t and c not in used)
    holes = ids == HOLE
    ids[holes & (gt_ids == 0)] = 0
    filler_id = int(ids.max()) + 1
    ids[holes & (gt_ids != 0)] = filler_id
    segments = segments + [{"id": filler_id, "category_id": filler, "iscrowd": 0}]
    return ids, _prune(ids, segments)


def _perturbed_samples(gt_json, gt_folder, kinds, count, seed):
    isthing = {c["id"]: bool(c["isthing"]) for c in gt_json["categories"]}
    rng, samples = np.random.default_rng(seed), []
    for ann in _crowd_free(gt_json)[:count]:
        gt_ids, gt_segments = _small_gt(gt_folder, ann)
        ids, segments = gt_ids.copy(), [dict(s) for s in gt_segments]
        for kind in kinds:
            ids, segments = PERTURBATIONS[kind](ids, _prune(ids, segments), isthing, rng)
        ids, segments = _fill_holes(gt_ids, ids, segments, isthing)
        samples.append(PanopticSample(ann["image_id"], gt_ids, gt_segments, ids, segments))
    return samples


def _pairs_tensor(ids, segments):
    """int64 [1, H, W, 2] (category, instance) pixels; void becomes category 0, which is
    neither thing nor stuff and so void for torchmetrics."""
    lookup = {s["id"]: s["category_id"] for s in segments}
    categories = np.vectorize(lambda v: lookup.get(v, 0), otypes=[np.int64])(ids)
    return np.stack([categories, ids.astype(np.int64)], axis=-1)[None]


def _torchmetrics_pq(samples, categories):
    torch = pytest.importorskip("torch")
    detection = pytest.importorskip("torchmetrics.detection")
    things = sorted(c["id"] for c in categories if c["isthing"])
    stuffs = sorted(c["id"] for c in categories if not c["isthing"])
    metric = detection.PanopticQuality(things=set(things), stuffs=set(stuffs),
                                       allow_unknown_preds_category=True,
                                       return_sq_and_rq=True, return_per_class=True)
    for s in samples:
        metric.update(torch.from_numpy(_pairs_tensor(s.pred_ids, s.pred_segments)),
                      torch.from_numpy(_pairs_tensor(s.gt_ids, s.gt_segments)))
    per_class = metric.compute().numpy()  # [C, 3] pq, sq, rq; things first, then stuff
    counted = (metric.true_positives + metric.false_positives + metric.false_negatives) > 0
    order = things + stuffs
    groups = {"all": order, "things": things, "stuff": stuffs}
    result = {}
    for name, members in groups.items():
        rows = [i for i, c in enumerate(order) if c in set(members) and counted[i]]
        result[name] = {**dict(zip(("pq", "sq", "rq"), per_class[rows].mean(axis=0))),
                        "n": len(rows)}
    result["per_category"] = {c: dict(zip(("pq", "sq", "rq"), per_class[i]))
                              for i, c in enumerate(order)}
    return result


def _max_difference(ours, reference) -> float:
    worst = 0.0
    for name in ("all", "things", "stuff"):
        assert ours[name]["n"] == reference[name]["n"], name
        worst = max(worst, *(abs(ours[name][k] - reference[name][k]) for k in ("pq", "sq", "rq")))
    for cat, scores in reference["per_category"].items():
        worst = max(worst, *(abs(ours["per_category"][cat][k] - scores[k])
                             for k in ("pq", "sq", "rq")))
    return worst


CASES = [("val", ("drop",)), ("val", ("shift",)), ("val", ("merge",)), ("val", ("split",)),
         ("val", ("relabel",)), ("train", ("drop", "shift", "merge", "split", "relabel"))]


@pytest.mark.parametrize(("split", "kinds"), CASES, ids=["+".join(k) for _, k in CASES])
def test_perturbed_predictions_agree_with_torchmetrics(coco128_dir, split, kinds):
    gt_json, gt_folder = _panoptic(coco128_dir, split)
    samples = _perturbed_samples(gt_json, gt_folder, kinds, count=3, seed=len(kinds))
    ours = pq_from_arrays(samples, gt_json["categories"])
    assert ours["all"]["pq"] < 1.0  # the perturbation did change something
    assert _max_difference(ours, _torchmetrics_pq(samples, gt_json["categories"])) <= TOL


# ------------------------------------------------------------------- (c) hand-computed cases
CATEGORIES = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 1}, {"id": 3, "isthing": 0},
              {"id": 4, "isthing": 0}]


def _seg(seg_id, category_id, iscrowd=0):
    return {"id": seg_id, "category_id": category_id, "iscrowd": iscrowd}


def _row(*values):
    return np.array([values], dtype=np.int32)


def _one(gt, gt_segments, pred, pred_segments, image_id=1):
    return PanopticSample(image_id, gt, gt_segments, pred, pred_segments)


def test_union_leaves_out_prediction_pixels_on_void_only():
    gt = _row(1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3)
    pred = _row(5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 0, 0, 0, 0, 0, 0)
    result = pq_from_arrays([_one(gt, [_seg(1, 1), _seg(2, 2), _seg(3, 2)],
                                  pred, [_seg(5, 1), _seg(6, 2)])], CATEGORIES)
    cats = result["per_category"]
    # segment 5 doubles its GT with void pixels: IoU 4 / (8 + 4 - 4 - 4) = 1.
    assert (cats[1]["tp"], cats[1]["sq"]) == (1, 1.0)
    # GT pixels predicted void stay in the union: IoU 4 / 6; segment 3 is a false negative.
    assert (cats[2]["tp"], cats[2]["fn"], cats[2]["fp"]) == (1, 1, 0)
    assert cats[2]["sq"] == pytest.approx(2 / 3)
    assert cats[2]["pq"] == pytest.approx((2 / 3) / 1.5)
    assert result["things"]["pq"] == pytest.approx((1 + 4 / 9) / 2)


def test_iou_of_exactly_one_half_is_no_match():
    result = pq_from_arrays([_one(_row(1, 1, 1, 1, 2, 2), [_seg(1, 1), _seg(2, 2)],
                                  _row(7, 7, 8, 8, 8, 8), [_seg(7, 1), _seg(8, 2)])],
                            CATEGORIES)
    cat1 = result["per_category"][1]
    assert (cat1["tp"], cat1["fp"], cat1["fn"]) == (0, 1, 1)


def test_crowd_is_never_matched_nor_missed_and_excuses_its_own_category():
    gt = _row(7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9)
    pred = _row(10, 10, 10, 10, 11, 11, 11, 12, 12, 12, 13, 13, 13, 13)
    gt_segments = [_seg(7, 1, iscrowd=1), _seg(8, 3), _seg(9, 1)]
    pred_segments = [_seg(10, 1), _seg(11, 2), _seg(12, 3), _seg(13, 1)]
    result = pq_from_arrays([_one(gt, gt_segments, pred, pred_segments)], CATEGORIES)
    cats = result["per_category"]
    # 10 lies on its own category's crowd: ignored; 11 on another category's crowd: FP.
    assert (cats[1]["tp"], cats[1]["fp"], cats[1]["fn"]) == (1, 0, 0)
    assert (cats[2]["tp"], cats[2]["fp"], cats[2]["fn"]) == (0, 1, 0)
    assert (cats[3]["tp"], cats[3]["sq"]) == (1, pytest.approx(0.75))


def test_void_and_crowd_add_up_to_excuse_a_prediction():
    # One pixel on void and one on crowd of the same category: 2 / 3 > 0.5, no FP.
    result = pq_from_arrays([_one(_row(0, 7, 8), [_seg(7, 1, iscrowd=1), _seg(8, 3)],
                                  _row(14, 14, 14), [_seg(14, 1)])], CATEGORIES)
    assert result["per_category"][1]["fp"] == 0
    assert result["per_category"][3]["fn"] == 1


def test_category_without_tp_has_zero_sq_and_absent_categories_are_left_out():
    gt = _row(7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9)
    pred = _row(10, 10, 10, 10, 11, 11, 11, 12, 12, 12, 13, 13, 13, 13)
    gt_segments = [_seg(7, 1, iscrowd=1), _seg(8, 3), _seg(9, 1)]
    pred_segments = [_seg(10, 1), _seg(11, 2), _seg(12, 3), _seg(13, 1)]
    result = pq_from_arrays([_one(gt, gt_segments, pred, pred_segments)], CATEGORIES)
    assert result["per_category"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 1,
                                         "fn": 0}
    assert result["things"] == {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2}
    assert result["stuff"] == {"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1}  # category 4 absent
    assert result["all"]["n"] == 3
    assert result["all"]["pq"] == pytest.approx(1.75 / 3)
    assert result["all"]["rq"] == pytest.approx(2 / 3)


def test_no_segments_at_all_gives_zero_and_n_zero():
    empty = np.zeros((2, 2), dtype=np.int32)
    result = pq_from_arrays([_one(empty, [], empty, [])], CATEGORIES)
    assert result["all"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


# ------------------------------------------------------------------- (d) instances -> panoptic
def _box_mask(y0, y1, x0, x1, shape=(10, 10)):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def test_instances_resolved_by_score():
    masks = np.stack([_box_mask(0, 4, 0, 4), _box_mask(2, 6, 2, 6), _box_mask(0, 4, 0, 3),
                      _box_mask(8, 10, 8, 10)])
    scores = np.array([0.6, 0.9, 0.7, 0.2])
    id_map, segments = instances_to_panoptic(masks, scores, np.array([1, 2, 1, 1]))
    assert id_map.dtype == np.int32 and id_map.shape == (10, 10)
    # 0.9 paints all 16 pixels; 0.7 loses 2 of 12; 0.6 finds 14 of 16 taken and is dropped.
    assert [s["category_id"] for s in segments] == [2, 1]
    assert [s["score"] for s in segments] == [0.9, 0.7]
    assert (id_map == 1).sum() == 16 and (id_map == 2).sum() == 10
    assert (id_map[0:2, 0:3] == 2).all() and (id_map[2:4, 2] == 1).all()
    assert [s["area"] for s in segments] == [16, 10]
    assert (id_map[8:, 8:] == 0).all()  # below the score threshold


def test_lower_score_keeps_its_free_pixels_when_little_is_taken():
    masks = np.stack([_box_mask(0, 10, 0, 10), _box_mask(0, 2, 0, 10)])
    id_map, segments = instances_to_panoptic(masks, np.array([0.8, 0.9]), np.array([1, 1]))
    assert (id_map[:2] == 1).all() and (id_map[2:] == 2).all()
    assert segments[1]["bbox"] == [0, 2, 10, 8]


def test_gt_from_overlapping_instances_voids_shared_pixels():
    masks = np.stack([_box_mask(0, 4, 0, 4), _box_mask(2, 6, 2, 6), _box_mask(0, 10, 0, 10)])
    id_map, segments = instances_to_panoptic_gt(masks, [1, 1, 2], [False, False, True],
                                                instance_ids=[11, 12, 13])
    assert (id_map[2:4, 2:4] == 0).all()
    assert [(s["id"], s["instance_id"], s["iscrowd"]) for s in segments] == [
        (1, 11, 0), (2, 12, 0), (3, 13, 1)]
    assert (id_map == 1).sum() == (id_map == 2).sum() == 12
    assert (id_map == 3).sum() == 100 - 28  # crowd fills what no plain instance covers


def _coco128_tables(coco128_dir: Path, count: int):
    data = json.loads((coco128_dir / "annotations" / "instances_train2017.json").read_text())
    with_crowd = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    chosen = sorted(with_crowd)[:2] + [i["id"] for i in data["images"]
                                        if i["id"] not in with_crowd][:count - 2]
    images = [dict(i, image_id=i["id"], split="val", source="coco")
              for i in data["images"] if i["id"] in chosen]
    sizes = {i["id"]: (i["height"], i["width"]) for i in data["images"]}
    instances = []
    for a in data["annotations"]:
        if a["image_id"] in chosen:
            rle = segmentation_to_rle(a["segmentation"], *sizes[a["image_id"]])
            instances.append({**a, "instance_id": a["id"], "rle": rle_to_string(rle),
                              "area": int(a["area"])})
    categories = [dict(c, category_id=c["id"], isthing=True) for c in data["categories"]]
    return make_images(images), make_instances(instances), make_categories(categories)


def test_gt_instances_through_the_prediction_path_score_perfectly(coco128_dir):
    images, instances, categories = _coco128_tables(coco128_dir, count=5)
    plain = instances[~instances["iscrowd"]]
    predictions = plain.assign(score=np.linspace(0.99, 0.6, len(plain)))
    # overlap_threshold 1: a GT instance another one covers by half still owns its pixels.
    result = pq_from_tables(images, instances, categories, predictions, overlap_threshold=1.0)
    assert result["all"]["n"] > 3
    assert result["things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": result["all"]["n"]}
    assert result["stuff"]["n"] == 0
    dropped = pq_from_tables(images, instances, categories, predictions.iloc[1:],
                             overlap_threshold=1.0)
    assert dropped["things"]["rq"] < 1.0


# ------------------------------------------------------------------- (e) input errors
@pytest.fixture()
def one_image(coco128_dir, tmp_path):
    """(gt_json, gt_folder, pred_json, pred_folder): one val image predicted perfectly."""
    gt_json, gt_folder = _panoptic(coco128_dir, "val")
    gt_json = _subset_json(gt_json, gt_json["annotations"][:1])
    pred_folder = tmp_path / "pred"
    pred_folder.mkdir()
    name = gt_json["annotations"][0]["file_name"]
    shutil.copy(gt_folder / name, pred_folder / name)
    pred_json = {"annotations": json.loads(json.dumps(gt_json["annotations"]))}
    return gt_json, gt_folder, pred_json, pred_folder


def _raises(match, gt_json, gt_folder, pred_json, pred_folder):
    with pytest.raises(MetricInputError, match=match):
        pq_compute(gt_json, gt_folder, pred_json, pred_folder)


def test_perfect_single_image_is_one(one_image):
    assert pq_compute(*one_image)["all"]["pq"] == 1.0


def test_json_segment_missing_from_png(one_image):
    _gt_json, _gt_folder, pred_json, _pred_folder = one_image
    pred_json["annotations"][0]["segments_info"].append(_seg(12345, 1))
    _raises(r"12345\].*segments_info but not in the PNG", *one_image)


def test_png_segment_missing_from_json(one_image):
    _gt_json, _gt_folder, pred_json, _pred_folder = one_image
    removed = pred_json["annotations"][0]["segments_info"].pop(0)
    name = pred_json["annotations"][0]["file_name"]
    _raises(rf"prediction PNG .*{name}.*\[{removed['id']}\] are in the PNG", *one_image)


def test_png_of_other_size(one_image):
    _gt_json, _gt_folder, pred_json, pred_folder = one_image
    name = pred_json["annotations"][0]["file_name"]
    write_id_map(pred_folder / name, read_id_map(pred_folder / name)[:-1])
    _raises(rf"image 139: prediction PNG .*{name} is 640x425", *one_image)


def test_unknown_category(one_image):
    _gt_json, _gt_folder, pred_json, _pred_folder = one_image
    pred_json["annotations"][0]["segments_info"][0]["category_id"] = 999
    _raises(r"image 139: .*unknown category id 999", *one_image)


def test_prediction_for_image_not_in_ground_truth(one_image):
    _gt_json, _gt_folder, pred_json, _pred_folder = one_image
    pred_json["annotations"].append({**pred_json["annotations"][0], "image_id": 424242})
    _raises(r"images \[424242\] that are not in the ground truth", *one_image)


def test_ground_truth_image_without_prediction(one_image):
    _gt_json, _gt_folder, pred_json, _pred_folder = one_image
    pred_json["annotations"].clear()
    _raises(r"no annotation for images \[139\]", *one_image)


def test_missing_png_and_missing_folder(one_image, tmp_path):
    gt_json, gt_folder, pred_json, pred_folder = one_image
    (pred_folder / pred_json["annotations"][0]["file_name"]).unlink()
    _raises(r"panoptic PNG .*000000000139.png not found", *one_image)
    _raises(r"prediction PNG folder .*nowhere not found", gt_json, gt_folder, pred_json,
            tmp_path / "nowhere")


def test_bad_and_missing_json_files(one_image, tmp_path):
    gt_json, gt_folder, _pred_json, pred_folder = one_image
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt_json))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MetricInputError, match=r"cannot read json file .*bad.json"):
        pq_from_files(gt_path, gt_folder, bad, pred_folder)
    with pytest.raises(MetricInputError, match=r"json file .*absent.json not found"):
        pq_from_files(gt_path, gt_folder, tmp_path / "absent.json", pred_folder)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(MetricInputError, match=r"bad.json lacks keys \['annotations'\]"):
        pq_from_files(gt_path, gt_folder, bad, pred_folder)
