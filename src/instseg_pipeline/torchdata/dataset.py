"""The torch Dataset over the canonical tables, collate, samplers and the train loader.

Determinism: the augmentation of sample ``i`` in epoch ``e`` is a pure function of
(seed, e, i) and the sample order of epoch ``e`` a pure function of (seed, e), so a resumed
run or a run with data-loader workers sees exactly the same batches. The loader draws its
workers' base seed from its own generator (seeded from (seed, epoch)), not from torch's
global RNG, and `seed_worker` seeds python's and numpy's global RNGs in each worker from
it: nothing a worker does depends on the process that started it.
"""
from __future__ import annotations

import bisect
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
)

from instseg_pipeline.data import images as image_io
from instseg_pipeline.data.masks import decode_strings
from instseg_pipeline.data.semantic import decode_semantic, group_segments
from instseg_pipeline.data.tables import (
    ANNOTATED,
    IGNORE_LABEL,
    label_mapping,
    select_split,
    stuff_mapping,
)
from instseg_pipeline.predict.preprocess import to_tensor
from instseg_pipeline.torchdata.augment import seed_augmentation

logger = logging.getLogger(__name__)


def derive_seed(*values: int) -> int:
    """A 63-bit seed that is a pure function of ``values`` (torch and numpy accept it)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


# the last value of derive_seed(seed, epoch, LOADER_STREAM): the loader's own stream, apart
# from the sampler's derive_seed(seed, epoch)
LOADER_STREAM = 1


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python's and numpy's global RNGs in this worker.

    torch seeds the worker's torch RNG with base_seed + worker_id, where base_seed comes
    from the loader's generator; python's and numpy's follow from that seed, so random work
    outside albumentations' own generators (which `seed_augmentation` reseeds per sample)
    repeats too.
    """
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(derive_seed(seed, worker_id) % 2**32)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """float32 [N, 4] tight xyxy boxes of uint8 [N, H, W] masks; x2/y2 are exclusive edges.

    An empty mask gets [0, 0, 0, 0].
    """
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if len(xs):
            boxes[k] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def _keep_visible(masks: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None):
    """Drop instances whose mask has no pixel or whose box is thinner than one pixel.

    Returns (masks, labels, boxes, area, weights or None): ``weights`` (float32 [N], the
    instances' mask-loss weights, optional) keeps the same instances.
    """
    boxes = masks_to_boxes(masks)
    area = masks.sum(axis=(1, 2), dtype=np.int64).astype(np.float32)
    keep = (area >= 1) & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    return (masks[keep], labels[keep], boxes[keep], area[keep],
            None if weights is None else weights[keep])


def _augment(augmentation, image: np.ndarray, masks: np.ndarray, labels: np.ndarray,
             semantic: np.ndarray | None = None, weights: np.ndarray | None = None):
    """Apply an albumentations Compose; masks whose box albumentations dropped go too.

    ``semantic`` (int64 [H, W], optional) goes through the same geometric transforms as
    the single ``mask`` target; returns (image, masks, labels, semantic or None, weights or
    None). It travels as uint8 label + 1, so the masks' fill value 0 (padding, affine
    borders) comes back as `IGNORE_LABEL`, never as `THINGS_LABEL`. ``weights`` (float32
    [N], optional) follows the instances albumentations keeps, as the labels do.
    """
    data = {"image": image}
    if len(masks):  # some 2.x transforms cannot stack an empty list of masks
        data["masks"] = masks
    if semantic is not None:
        data["mask"] = _shift_semantic(semantic)
    if "bboxes" in augmentation.processors:
        data.update(bboxes=masks_to_boxes(masks).reshape(-1, 4), labels=labels.tolist(),
                    instance_index=list(range(len(masks))))
    out = augmentation(**data)
    out_masks = np.asarray(out.get("masks", masks), dtype=np.uint8).reshape(
        -1, *out["image"].shape[:2])
    out_semantic = None if semantic is None else _unshift_semantic(out["mask"])
    if "bboxes" not in augmentation.processors:
        return out["image"], out_masks, labels, out_semantic, weights
    # albumentations returns label fields as floats
    kept = np.asarray(out["instance_index"], dtype=np.int64)
    return (out["image"], out_masks[kept], labels[kept], out_semantic,
            None if weights is None else weights[kept])


def _shift_semantic(semantic: np.ndarray) -> np.ndarray:
    """uint8 label + 1 (void -> 0) of an int64 semantic map: 0 is the masks' fill value."""
    return np.where(semantic == IGNORE_LABEL, 0, semantic + 1).astype(np.uint8)


def _unshift_semantic(shifted: np.ndarray) -> np.ndarray:
    """The int64 semantic map of `_shift_semantic`'s uint8 map (0 -> void)."""
    shifted = np.asarray(shifted).astype(np.int64)
    if shifted.ndim == 3:  # albumentations may hand a mask back as [H, W, 1]
        shifted = shifted[..., 0]
    return np.where(shifted == 0, IGNORE_LABEL, shifted - 1)


class InstanceDataset(Dataset):
    """Images of one split with their non-crowd instances as torchvision detection targets.

    ``dataset[i] -> (image float32 [3, H, W] in [0, 1], target)`` where target holds
    boxes float32 [N, 4] xyxy, labels int64 [N] (contiguous, 0 = background), masks uint8
    [N, H, W], image_id int, area float32 [N], iscrowd int64 [N] (all 0: crowd regions are
    left out of training targets). ``images`` (the split, in dataset order) and
    ``label_names`` ({label: category name}) are public attributes.

    With ``semantic`` (a panoptic family) the target also holds ``semantic`` int64 [H, W]
    (`data.semantic`): 0 on every thing pixel (crowd included), 1..S on the pixels of the
    ``stuff_segments`` rows (``stuff_mapping`` / ``stuff_names`` say which category), 255
    void, augmented with the image. Without it ``stuff_segments`` is not read.

    ``pseudo_mask_weight`` (``training.pseudo_mask_loss_weight``): the mask-loss weight of
    an instance whose ``mask_source`` is not ``annotated``. When ``instances`` has that
    column and some instance of the split gets a weight other than 1, every target also
    holds ``mask_weights`` float32 [N] (1.0 for annotated masks); otherwise the targets are
    exactly as without it. ``mask_weighted`` says which.
    """

    def __init__(self, images: pd.DataFrame, instances: pd.DataFrame,
                 categories: pd.DataFrame, root: str | Path, split: str | None = None,
                 augmentation=None, seed: int = 0, stuff_segments: pd.DataFrame | None = None,
                 semantic: bool = False, pseudo_mask_weight: float = 1.0):
        images, instances = select_split(images, instances, split)
        self.images = images.reset_index(drop=True)
        self.root = Path(root)
        self.augmentation = augmentation
        self.seed = int(seed)
        self.epoch = 0
        self.mapping = label_mapping(categories)
        self.label_names = {self.mapping[int(c)]: str(n) for c, n in
                            zip(categories["category_id"], categories["name"])
                            if int(c) in self.mapping}
        crowd = instances["iscrowd"].astype(bool)
        weights = _mask_weights(instances[~crowd], pseudo_mask_weight, split)
        self.mask_weighted = weights is not None
        self._instances = self._group_instances(instances[~crowd], weights)
        logger.info("dataset split=%s: %d images, %d instances (%d crowd regions left out)",
                    split, len(self.images), int((~crowd).sum()), int(crowd.sum()))
        self.semantic = bool(semantic)
        self.stuff_mapping = stuff_mapping(categories) if self.semantic else {}
        self.stuff_names = {self.stuff_mapping[int(c)]: str(n) for c, n in
                            zip(categories["category_id"], categories["name"])
                            if int(c) in self.stuff_mapping}
        self._segments = self._group_segments(instances, stuff_segments, categories)

    def _group_segments(self, instances: pd.DataFrame, stuff_segments: pd.DataFrame | None,
                        categories: pd.DataFrame) -> dict:
        """{image_id: `data.semantic.ImageSegments`} of this split (semantic only)."""
        if not self.semantic:
            return {}
        if stuff_segments is not None and len(stuff_segments):
            stuff_segments = stuff_segments[stuff_segments["image_id"].isin(
                self.images["image_id"])]
        else:
            stuff_segments = None
        grouped = group_segments(instances, stuff_segments, categories)
        logger.info("semantic targets: %d stuff classes, %d stuff segments",
                    len(self.stuff_mapping),
                    0 if stuff_segments is None else len(stuff_segments))
        return grouped

    def _group_instances(self, instances: pd.DataFrame, weights: np.ndarray | None = None
                         ) -> dict[int, tuple[list, list, list]]:
        """{image_id: (rle strings, contiguous labels, mask-loss weights)} of the non-crowd
        instances; ``weights`` float32 [len(instances)] or None (all 1)."""
        unknown = ~instances["category_id"].isin(list(self.mapping))
        if unknown.any():
            row = instances[unknown].iloc[0]
            raise ValueError(f"instance {int(row.instance_id)} (image {int(row.image_id)}) has "
                             f"category_id {int(row.category_id)} not in the categories table")
        if weights is None:
            weights = np.ones(len(instances), dtype=np.float32)
        grouped: dict[int, tuple[list, list, list]] = {}
        for row, weight in zip(instances.itertuples(index=False), weights):
            rles, labels, image_weights = grouped.setdefault(int(row.image_id), ([], [], []))
            rles.append(str(row.rle))
            labels.append(self.mapping[int(row.category_id)])
            image_weights.append(weight)
        return grouped

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before building the loader)."""
        self.epoch = int(epoch)

    def _raw(self, index: int):
        """uint8 [H, W, 3] image, uint8 [N, H, W] masks, int64 [N] labels, image id,
        float32 [N] mask-loss weights (None unless `mask_weighted`)."""
        row = self.images.iloc[index]
        image_id, width, height = int(row["image_id"]), int(row["width"]), int(row["height"])
        image, _ = image_io.load_image(self.root / str(row["file_name"]),
                                       expected_size=(width, height))
        rles, labels, weights = self._instances.get(image_id, ([], [], []))
        masks = decode_strings(rles, height, width)
        weights = np.asarray(weights, dtype=np.float32) if self.mask_weighted else None
        return image, masks, np.asarray(labels, dtype=np.int64), image_id, weights

    def semantic_target(self, index: int) -> np.ndarray:
        """int64 [H, W] semantic map of sample ``index`` before augmentation."""
        row = self.images.iloc[index]
        return decode_semantic(self._segments.get(int(row["image_id"])), int(row["height"]),
                               int(row["width"]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, masks, labels, image_id, weights = self._raw(index)
        semantic = self.semantic_target(index) if self.semantic else None
        masks, labels, _, _, weights = _keep_visible(masks, labels, weights)
        if self.augmentation is not None:
            seed_augmentation(self.augmentation, derive_seed(self.seed, self.epoch, index))
            image, masks, labels, semantic, weights = _augment(
                self.augmentation, image, masks, labels, semantic, weights)
        masks, labels, boxes, area, weights = _keep_visible(masks, labels, weights)
        image, target = _to_tensors(image, masks, labels, boxes, area, image_id)
        if semantic is not None:
            target["semantic"] = torch.from_numpy(np.ascontiguousarray(semantic,
                                                                       dtype=np.int64))
        if weights is not None:
            target["mask_weights"] = torch.from_numpy(np.ascontiguousarray(weights,
                                                                           dtype=np.float32))
        return image, target


def _mask_weights(instances: pd.DataFrame, pseudo_mask_weight: float,
                  split: str | None) -> np.ndarray | None:
    """float32 [len(instances)]: 1.0 for annotated masks, ``pseudo_mask_weight`` for the
    others (``mask_source`` grabcut, box, sam); None when ``instances`` has no
    ``mask_source`` column or every weight would be 1. Logs the sources counted."""
    if "mask_source" not in instances.columns:
        if pseudo_mask_weight != 1.0:
            logger.info("pseudo_mask_loss_weight %g has no effect: the instances table has no "
                        "mask_source column (every mask counts as annotated)",
                        pseudo_mask_weight)
        return None
    sources = instances["mask_source"].astype(str)
    pseudo = (sources != ANNOTATED).to_numpy()
    if pseudo.any():
        counts = ", ".join(f"{name} {count}" for name, count in
                           sources.value_counts().sort_index().items())
        logger.info("dataset split=%s mask sources: %s; pseudo-masks weigh %g in the mask "
                    "loss", split, counts, pseudo_mask_weight)
    if pseudo_mask_weight == 1.0 or not pseudo.any():
        return None
    if pseudo.all() and pseudo_mask_weight == 0.0:
        logger.warning("dataset split=%s: every mask is a pseudo-mask and "
                       "pseudo_mask_loss_weight is 0: the mask loss is 0 throughout", split)
    return np.where(pseudo, np.float32(pseudo_mask_weight), np.float32(1.0))


def _to_tensors(image, masks, labels, boxes, area, image_id) -> tuple[torch.Tensor, dict]:
    target = {"boxes": torch.from_numpy(boxes).reshape(-1, 4),
              "labels": torch.from_numpy(labels.astype(np.int64)),
              "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)),
              "image_id": int(image_id),
              "area": torch.from_numpy(area),
              "iscrowd": torch.zeros(len(labels), dtype=torch.int64)}
    # the preprocessing of every inference entry point, so training sees the same input
    return to_tensor(image), target


def collate(batch: Sequence[tuple]) -> tuple[list[torch.Tensor], list[dict]]:
    """(list of images, list of targets): detection models take lists of any-size images."""
    return [item[0] for item in batch], [item[1] for item in batch]


def default_ratio_bins(factor: int = 3) -> list[float]:
    """Aspect-ratio (w / h) bin edges 2**linspace(-1, 1, 2 * factor + 1) (torchvision's)."""
    return [float(2.0 ** x) for x in np.linspace(-1, 1, 2 * factor + 1)]


def aspect_ratio_group_ids(images_df: pd.DataFrame, bins: int | Sequence[float] = 3
                           ) -> list[int]:
    """Group id per row of ``images_df`` from its width / height ratio.

    ``bins`` is either a factor for `default_ratio_bins` or the sorted bin edges.
    """
    edges = default_ratio_bins(bins) if isinstance(bins, int) else sorted(float(b) for b in bins)
    ratios = images_df["width"].to_numpy(float) / images_df["height"].to_numpy(float)
    return [bisect.bisect_right(edges, r) for r in ratios]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices that share a group id (e.g. aspect-ratio bin).

    Indices come from ``sampler`` in its order; each epoch yields every index once. What is
    left in the group buffers at the end is pooled (in group order) into final batches, so
    there are exactly ceil(N / batch_size) batches (floor with ``drop_last``).
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = {}
        for index in self.sampler:
            buffer = buffers.setdefault(self.group_ids[index], [])
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer.copy()
                buffer.clear()
        leftovers = [i for group in sorted(buffers) for i in buffers[group]]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start:start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        count = len(self.sampler) / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)


def build_train_loader(dataset: InstanceDataset, batch_size: int, num_workers: int, seed: int,
                       epoch: int, distributed: bool, group_ids: Sequence[int] | None = None,
                       drop_last: bool = False) -> DataLoader:
    """The loader of one epoch; its order and augmentations depend only on (seed, epoch).

    Build a new loader every epoch (workers are not persistent, so they see `set_epoch`).
    ``group_ids`` (e.g. `aspect_ratio_group_ids(dataset.images)`) turns on grouped batches.
    """
    dataset.set_epoch(epoch)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    else:
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
        sampler = RandomSampler(dataset, generator=generator)
    if group_ids is not None:
        batches = GroupedBatchSampler(sampler, group_ids, batch_size, drop_last)
    else:
        batches = BatchSampler(sampler, batch_size, drop_last)
    # its own generator: the workers' base seed must not come from (nor move) the global RNG
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, LOADER_STREAM))
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      collate_fn=collate, persistent_workers=False,
                      worker_init_fn=seed_worker, generator=generator)


class MultiScale:
    """Training image size (the model's ``min_size``) drawn per iteration from ``sizes``."""

    def __init__(self, sizes: Sequence[int], seed: int = 0):
        if not sizes:
            raise ValueError("MultiScale needs at least one size")
        self.sizes = [int(s) for s in sizes]
        self.seed = int(seed)

    def choose(self, iteration: int) -> int:
        """The size for ``iteration``: a pure function of (seed, iteration)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return self.sizes[derive_seed(self.seed, iteration) % len(self.sizes)]
