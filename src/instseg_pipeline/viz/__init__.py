"""Figures, one module per job; each figure is a matplotlib `Figure` built without pyplot.

overlays   masks tinted over an image (numpy only)
training   augmentation preview, training curves
suite      original | ground truth | predictions, per chosen image
dashboard  the evaluation at a glance (AP, PR curves, IoU, confusions, loss)
galleries  worst / best images, false-positive and false-negative crops
draw       the colours, masks, outlines and captions the evaluation figures share

The error tables the evaluation figures show are computed in `evaluation.errors`.
"""
