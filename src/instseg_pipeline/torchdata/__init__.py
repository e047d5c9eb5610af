"""torch Datasets over the canonical tables: decoding RLE to targets, batching and
augmentation (albumentations 2.x)."""
