"""Cityscapes instance-level AP against the official script (cityscapesscripts), the RLE path
of the canonical tables against the gtFine path, edge cases and the `instseg-eval cityscapes`
command."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from instseg_pipeline.evaluation import MetricInputError
from instseg_pipeline.evaluation import cityscapes as cs

CITIES = ("aachen", "bonn")
HEIGHT, WIDTH = 72, 96


def _blob(rng: np.random.Generator, size: int, shape=(HEIGHT, WIDTH)) -> np.ndarray:
    """bool [H, W]: an axis-aligned ellipse of about ``size`` px at a random place."""
    h = max(2, int(np.sqrt(size) * rng.uniform(0.6, 1.4)))
    w = max(2, int(size / h * 4 / np.pi))
    cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1


def gt_map(rng: np.random.Generator) -> np.ndarray:
    """A gtFine-like instanceIds map: road / void background, instances of three evaluated
    classes (some under 100 px), group regions, caravan instances and groups (void)."""
    ids = np.where(rng.random((HEIGHT, WIDTH)) < 0.5, 7, 0).astype(np.int32)
    ids[: HEIGHT // 6] = rng.choice([4, 5, 23])
    for k in range(int(rng.integers(4, 9))):
        label = int(rng.choice([24, 26, 26, 33]))
        size = int(rng.choice([60, 150, 400, 900]))
        ids[_blob(rng, size)] = label * 1000 + k
    for value in rng.choice([24, 26, 26, 29, 29000, 29001], size=3, replace=False):
        ids[_blob(rng, int(rng.choice([40, 80, 300])))] = value
    return ids


def predictions(rng: np.random.Generator, ids: np.ndarray) -> list[tuple[np.ndarray, int, float]]:
    """Noisy copies of ground-truth regions (shifted, grown, shrunk, duplicated, relabelled),
    blobs on void and nowhere, an empty mask and an ignored class; some tied scores."""
    out = []
    for value in np.unique(ids):
        label = value // 1000 if value >= 1000 else value
        if label not in cs.CLASSES and label != 29:
            continue
        region = ids == value
        for _ in range(int(rng.integers(0, 3))):
            shift = rng.integers(-3, 4, size=2)
            mask = np.roll(region, tuple(shift), axis=(0, 1))
            if rng.random() < 0.3:
                mask = mask | np.roll(mask, 2, axis=1)
            if rng.random() < 0.2:
                mask = mask & np.roll(mask, 3, axis=0)
            wrong = rng.random() < 0.1
            out.append((mask, int(rng.choice([25, 32])) if wrong else int(label),
                        float(np.round(rng.random(), 1 if rng.random() < 0.3 else 6))))
    for _ in range(int(rng.integers(1, 4))):
        out.append((_blob(rng, int(rng.integers(50, 600))), int(rng.choice([24, 26, 33])),
                    float(rng.random())))
    out.append((np.zeros((HEIGHT, WIDTH), bool), 26, 0.9))
    rng.shuffle(out)
    return out


def write_dataset(root: Path, n_images: int, seed: int) -> tuple[Path, Path]:
    """gtFine/val/{city}/*_gtFine_instanceIds.png + results/*.txt with mask PNGs."""
    rng = np.random.default_rng(seed)
    gt_root, results = root / "gtFine" / "val", root / "results"
    (results / "masks").mkdir(parents=True)
    for index in range(n_images):
        city = CITIES[index % len(CITIES)]
        name = f"{city}_{index:06d}_000019"
        folder = gt_root / city
        folder.mkdir(parents=True, exist_ok=True)
        ids = gt_map(rng)
        Image.fromarray(ids.astype(np.uint16)).save(folder / f"{name}{cs.GT_SUFFIX}")
        lines = []
        for k, (mask, label, score) in enumerate(predictions(rng, ids)):
            Image.fromarray(mask.astype(np.uint8) * 255).save(results / "masks" / f"{name}_{k}.png")
            lines.append(f"masks/{name}_{k}.png {label} {score}")
        (results / f"{name}_pred.txt").write_text("\n".join(lines) + "\n")
    return gt_root, results


def official(gt_root: Path, results: Path, tmp_path: Path, monkeypatch) -> dict:
    """The official script's averages for the same files (its ``np.in1d`` left numpy 2.4;
    ``np.isin`` flattened is the same function)."""
    monkeypatch.setattr(np, "in1d", lambda a, b: np.isin(a, b).ravel(), raising=False)
    official_eval = pytest.importorskip(
        "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling",
        reason="cityscapesscripts (the reference) is not installed; `make test` installs it")
    args = official_eval.args
    args.quiet, args.JSONOutput = True, False
    args.gtInstancesFile = str(tmp_path / "gtInstances.json")
    args.predictionPath, args.predictionWalk = str(results.resolve()), None
    official_eval.setInstanceLabels(args)
    gt_files = sorted(str(p) for p in gt_root.rglob(f"*{cs.GT_SUFFIX}"))
    preds = [official_eval.getPrediction(p, args) for p in gt_files]
    gt_instances = official_eval.getGtInstances(gt_files, args)
    matches = official_eval.matchGtWithPreds(preds, gt_files, gt_instances, args)
    aps = official_eval.evaluateMatches(matches, args)
    return official_eval.computeAverages(aps, args)


def _same(ours, theirs) -> bool:
    if ours is None:
        return math.isnan(theirs)
    return abs(ours - theirs) <= 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_official_script(tmp_path, seed, monkeypatch):
    gt_root, results = write_dataset(tmp_path, n_images=6, seed=seed)
    ours = cs.evaluate_folders(gt_root, results)
    theirs = official(gt_root, results, tmp_path, monkeypatch)
    assert _same(ours["AP"], theirs["allAp"]), (ours["AP"], theirs["allAp"])
    assert _same(ours["AP50"], theirs["allAp50%"]), (ours["AP50"], theirs["allAp50%"])
    for row in ours["per_class"]:
        ref = theirs["classes"][row["name"]]
        assert _same(row["AP"], ref["ap"]) and _same(row["AP50"], ref["ap50%"]), (row, ref)
    assert 0 < ours["AP"] < 1 and ours["per_class"][0]["AP"] is not None  # person scored
    assert any(r["AP"] is None for r in ours["per_class"])  # bus: no ground truth


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_rle_path_equals_the_map_path(tmp_path):
    """Regions as RLEs (what the canonical tables hold) give the same matches and numbers."""
    rng = np.random.default_rng(5)
    by_map, by_rle = [], []
    for _ in range(5):
        ids = gt_map(rng)
        preds = predictions(rng, ids)
        masks, labels, scores = (np.array([p[0] for p in preds]), [p[1] for p in preds],
                                 [p[2] for p in preds])
        by_map.append(cs.match_id_map(ids, masks, labels, scores))
        values = [v for v in np.unique(ids) if (v // 1000 if v >= 1000 else v) in cs.CLASSES]
        void = _rle(np.isin(ids, cs.VOID_LABEL_IDS))
        by_rle.append(cs.match_rles(
            [_rle(ids == v) for v in values], [v // 1000 if v >= 1000 else v for v in values],
            [v < 1000 for v in values], [_rle(m) for m in masks], labels, scores, cs.CLASSES,
            void_rle=void))
    for a, b in zip(by_map, by_rle):
        for field in ("gt_labels", "gt_pixels", "gt_group", "pred_labels", "pred_pixels",
                      "pred_void", "intersection"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert cs.evaluate(by_map) == cs.evaluate(by_rle)


def _one(gt_ids, masks, labels, scores):
    return cs.evaluate([cs.match_id_map(gt_ids, np.asarray(masks), labels, scores)])


def test_rules_on_hand_made_cases():
    ids = np.full((20, 30), 7)
    ids[2:12, 2:12] = 26001  # 100 px: counted
    ids[14:17, 2:6] = 26002  # 12 px: too small, ignored
    ids[2:12, 15:25] = 26  # car group
    ids[15:20, 20:30] = 0  # void
    car = ids == 26001
    exact = _one(ids, [car], [26], [0.9])
    assert exact["per_class"][2]["AP"] == pytest.approx(1.0)  # car
    assert exact["AP"] == pytest.approx(1.0) and exact["AP50"] == pytest.approx(1.0)
    # predictions on the group, the small car and void are neither right nor wrong
    ignored = [ids == 26, ids == 26002, ids == 0]
    assert _one(ids, [car, *ignored], [26] * 4, [0.5, 0.99, 0.98, 0.97])["AP"] == \
        pytest.approx(1.0)
    # a blob on plain road is a false positive ranked first: points (p, r) = (0, 0) at 0.99,
    # (1/2, 1) at 0.5 and the artificial (1, 0); each precision weighs half the recall gap
    # to its neighbours: 1/2 * 1/2 + 0 * 1/2 + 1 * 0 = 1/4
    road = np.zeros_like(car)
    road[14:18, 8:14] = True
    assert _one(ids, [car, road], [26, 26], [0.5, 0.99])["AP"] == pytest.approx(0.25)
    # overlap must exceed the threshold: IoU exactly 0.5 is no match at 0.5
    doubled = car.copy()
    doubled[12:14, 0:30], doubled[18:20, 0:20] = True, True  # 100 px of road
    assert (doubled & car).sum() / doubled.sum() == 0.5
    assert _one(ids, [doubled], [26], [0.9])["AP50"] == 0.0
    # a duplicate of a matched car is a false positive with the lower score
    assert _one(ids, [car, car], [26, 26], [0.9, 0.8])["AP"] == pytest.approx(1.0)
    assert _one(ids, [car, car], [26, 26], [0.8, 0.9])["AP"] == pytest.approx(1.0)
    # no prediction of a class with ground truth: 0; none at all: 0 as well
    assert _one(ids, [car], [24], [0.9])["AP"] == 0.0
    assert _one(ids, np.zeros((0, 20, 30), bool), [], [])["AP"] == 0.0
    # no ground truth of any class: nothing to average
    assert _one(np.full((20, 30), 7), [car], [26], [0.9])["AP"] is None


def test_bad_inputs_name_the_file(tmp_path):
    gt_root, results = write_dataset(tmp_path, n_images=2, seed=3)
    first = min(results.glob("*.txt"))
    first.write_text("masks/missing.png 26 0.5\n")
    with pytest.raises(MetricInputError, match=r"missing\.png not found"):
        cs.evaluate_folders(gt_root, results)
    first.write_text("masks/x.png car 0.5\n")
    with pytest.raises(MetricInputError, match=rf"{first.name} line 1: label id and score"):
        cs.evaluate_folders(gt_root, results)
    first.unlink()
    with pytest.raises(MetricInputError, match="no prediction file for 1 ground-truth image"):
        cs.evaluate_folders(gt_root, results)
    assert cs.evaluate_folders(gt_root, results, allow_missing=True)["images"] == 2
    with pytest.raises(MetricInputError, match="prediction masks are"):
        cs.match_id_map(np.zeros((4, 4)), np.zeros((1, 5, 4), bool), [26], [0.5])
    with pytest.raises(MetricInputError, match="non-finite score"):
        cs.match_id_map(np.zeros((4, 4)), np.ones((1, 4, 4), bool), [26], [float("nan")])


def test_command_prints_json_and_fails_clearly(tmp_path):
    gt_root, results = write_dataset(tmp_path, n_images=3, seed=4)
    command = [sys.executable, "-m", "instseg_pipeline.commands.evaluate", "cityscapes",
               "--json", "--gt-folder", str(gt_root), "--results", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads(json.dumps(cs.evaluate_folders(gt_root, results)))
    assert set(printed) >= {"AP", "AP50", "per_class"}
    bad = subprocess.run([*command[:-1], str(tmp_path / "nowhere")], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and "results folder" in bad.stderr and not bad.stdout


def test_tables_use_crowd_as_group_regions():
    """`cityscapes_ap_from_tables` on canonical tables of a non-Cityscapes source."""
    from instseg_pipeline.evaluation.cityscapes import cityscapes_ap_from_tables

    car = np.zeros((20, 30), bool)
    car[2:12, 2:12] = True
    crowd = np.zeros_like(car)
    crowd[2:12, 15:25] = True
    rle = lambda m: _rle(m)["counts"].decode()
    images = pd.DataFrame({"image_id": [1], "file_name": ["a.png"], "height": [20],
                           "width": [30], "split": ["val"]})
    instances = pd.DataFrame({"instance_id": [1, 2], "image_id": [1, 1], "category_id": [3, 3],
                              "iscrowd": [False, True], "rle": [rle(car), rle(crowd)]})
    categories = pd.DataFrame({"category_id": [3], "name": ["car"]})
    predictions = pd.DataFrame({"image_id": [1, 1], "category_id": [3, 3],
                                "score": [0.5, 0.9], "rle": [rle(car), rle(crowd)]})
    result = cityscapes_ap_from_tables(images, instances, categories, predictions, [1])
    assert result["AP"] == pytest.approx(1.0) and result["ground_truth"] == "tables"
    # without the crowd region the 0.9 prediction is a false positive ranked first
    only_car = instances.iloc[:1]
    assert cityscapes_ap_from_tables(images, only_car, categories, predictions, [1])["AP"] \
        == pytest.approx(0.25)
    with pytest.raises(MetricInputError, match=r"image ids not in the images table: \[7\]"):
        cityscapes_ap_from_tables(images, instances, categories,
                                  predictions.assign(image_id=7), [1])


def test_evaluation_on_a_cityscapes_source_equals_the_official_script(tmp_path, monkeypatch):
    """Cityscapes tree -> canonical tables (the cityscapes source) -> predictions table ->
    `evaluation.cityscapes_metrics`: the same numbers as the official script reading the
    same predictions as files; the gtFine void and groups make the difference to the
    tables-only ground truth."""
    from instseg_pipeline.data.config import SourceConfig
    from instseg_pipeline.data.quality import QualityReport
    from instseg_pipeline.data.sources import cityscapes as source
    from instseg_pipeline.evaluation import metrics as evaluation

    gt_root, results = write_dataset(tmp_path, n_images=4, seed=7)
    root = tmp_path
    for gt_file in gt_root.rglob(f"*{cs.GT_SUFFIX}"):
        name = gt_file.name[: -len(cs.GT_SUFFIX)]
        image = root / "leftImg8bit" / "val" / gt_file.parent.name / f"{name}_leftImg8bit.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(image)
    tables = source.read(SourceConfig.from_params({"root": str(root), "splits": ["val"]}),
                         QualityReport("cityscapes"))
    rows = []
    for image in tables.images.itertuples():
        name = Path(image.file_name).name[: -len("_leftImg8bit.png")]
        for mask_path, label, score in cs.read_prediction_file(results / f"{name}_pred.txt"):
            mask = np.asarray(Image.open(mask_path)) != 0
            rows.append({"image_id": image.image_id, "category_id": label, "score": score,
                         "rle": _rle(mask)["counts"].decode()})
    predictions = pd.DataFrame(rows)
    ours = evaluation.cityscapes_metrics(tables.images, tables.instances, tables.categories,
                                         predictions, "val", gtfine_root=str(root))
    theirs = official(gt_root, results, tmp_path, monkeypatch)
    assert ours["ground_truth"] == "gtFine" and ours["images"] == 4
    assert _same(ours["AP"], theirs["allAp"]) and _same(ours["AP50"], theirs["allAp50%"])
    plain = evaluation.cityscapes_metrics(tables.images, tables.instances, tables.categories,
                                          predictions, "val")
    assert plain["ground_truth"] == "tables" and plain["AP"] != ours["AP"]
