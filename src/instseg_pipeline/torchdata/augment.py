"""Training augmentation: an albumentations 2.x ``Compose`` built from parameters.

``config`` (the ``augmentation`` block of the training parameters, typed as
`engine.config.AugmentationConfig`)::

    preset: none | light | strong
    size: [height, width]          # output size of the crop in ``strong``
    min_visibility: 0.0            # drop instances with less of their box left after a crop
    transforms:                    # optional; replaces the preset
      - {name: HorizontalFlip, p: 0.5}
      - {name: OneOf, p: 0.2, transforms: [{name: GaussNoise}, {name: ISONoise}]}

Every Compose carries pascal_voc boxes with the label fields ``labels`` and
``instance_index``: albumentations 2.x drops boxes but never masks, so the index says which
masks survived. No ``Normalize``: torchvision detection models normalize internally.

Randomness: albumentations 2.x draws from each transform's own ``random_generator`` (numpy)
and ``py_random`` (python), never from the global RNGs; a transform built without a seed
seeds them from OS entropy. It also seeds every transform of a Compose with the *same*
seed, so two transforms with equal ``p`` always fire together. `seed_augmentation` gives
each transform its own seed derived from the sample seed instead; the Dataset calls it
before every sample, and `build_augmentation` once, so no draw ever comes from entropy.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

import numpy as np

# the import below otherwise asks the network for a newer release
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

if TYPE_CHECKING:
    from instseg_pipeline.engine.config import AugmentationConfig

logger = logging.getLogger(__name__)

LABEL_FIELDS = ["labels", "instance_index"]
PRESETS = ("none", "light", "strong")


class AugmentationConfigError(ValueError):
    """The augmentation parameters name an unknown preset, transform or argument."""


def _light() -> list:
    return [A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.75, 1.25), keep_ratio=True, p=0.5)]


def _crop_size(config: AugmentationConfig) -> tuple[int, int]:
    if config.size is None:
        raise AugmentationConfigError(
            "augmentation preset 'strong' needs size: [height, width], got None")
    return config.size


def _strong(config: AugmentationConfig) -> list:
    # std_range is a fraction of 255; 1.x's default var_limit=(10, 50) was a variance in 0..255
    noise = A.OneOf([A.GaussNoise(std_range=(0.012, 0.028)), A.ISONoise(),
                     A.MultiplicativeNoise(multiplier=(0.9, 1.1))], p=0.2)
    distortion = A.OneOf([A.ElasticTransform(alpha=120, sigma=6), A.GridDistortion(),
                          A.OpticalDistortion(distort_limit=0.1)], p=0.3)
    return [A.RandomResizedCrop(size=_crop_size(config), scale=(0.5, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.Affine(translate_percent=0.1, scale=(0.8, 1.2), rotate=(-30, 30), p=0.5),
            noise, distortion]


def _build_transform(spec: dict):
    """One albumentations transform from ``{"name": ..., **kwargs}`` (nested ``transforms``)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    cls = getattr(A, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose))):
        raise AugmentationConfigError(f"unknown albumentations transform {name!r}")
    if "transforms" in spec:
        spec["transforms"] = [_build_transform(child) for child in spec["transforms"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transform = cls(**spec)
    for warning in caught:
        if "not valid for transform" in str(warning.message):
            raise AugmentationConfigError(f"transform {name}: {warning.message} "
                                          "(albumentations 2.x argument names)")
        logger.warning("augmentation transform %s: %s", name, warning.message)
    return transform


def _transforms(config: AugmentationConfig) -> list:
    if config.transforms:
        return [_build_transform(spec) for spec in config.transforms]
    if config.preset not in PRESETS:
        raise AugmentationConfigError(
            f"unknown augmentation preset {config.preset!r}; use {PRESETS}")
    return {"none": list, "light": _light, "strong": lambda: _strong(config)}[config.preset]()


def build_augmentation(config: AugmentationConfig | None) -> A.Compose | None:
    """The training Compose for ``config``, or None when there is nothing to apply."""
    if config is None:
        return None
    transforms = _transforms(config)
    if not transforms:
        return None
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=LABEL_FIELDS,
                               min_visibility=config.min_visibility)
    compose = A.Compose(transforms, bbox_params=bbox_params)
    seed_augmentation(compose, 0)  # until the Dataset reseeds it per sample
    return compose


def _walk(transform):
    """Every transform below ``transform`` in pre-order (parents before their children)."""
    for child in getattr(transform, "transforms", []):
        yield child
        yield from _walk(child)


def seed_augmentation(compose: A.Compose, seed: int) -> None:
    """Reseed ``compose`` so its next call is a pure function of ``seed``.

    Each nested transform gets a distinct seed derived from (seed, position); a parent's
    `set_random_seed` resets its children, hence the pre-order walk.
    """
    compose.set_random_seed(int(seed))
    for position, transform in enumerate(_walk(compose), start=1):
        child_seed = np.random.SeedSequence([int(seed), position]).generate_state(1)[0]
        transform.set_random_seed(int(child_seed))
