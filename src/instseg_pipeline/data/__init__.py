"""Data: every source becomes the canonical tables (images, instances, categories).

`sources/` holds one reader per raw format; `tables`, `masks` (COCO RLE), `images` (decoding
policy), `split`, `quality` (counted skips) and `statistics` work on the tables. Nothing here
imports torch.
"""
