"""Figures: overlays, dataset and training figures, evaluation dashboards and galleries."""
