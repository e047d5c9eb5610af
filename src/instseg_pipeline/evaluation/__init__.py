"""Kedro-free metrics: COCO mask/box AP, panoptic quality, mask IoU."""


class MetricInputError(ValueError):
    """An input file or table that evaluation cannot use; the message names it and says why."""
