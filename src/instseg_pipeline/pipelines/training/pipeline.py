"""Tables (+ stuff segments for panoptic families) -> augmentation preview, trained model,
loss history, curves; tracked in MLflow."""
from kedro.pipeline import Node, Pipeline

from .nodes import plot_training_curves, preview_augmentation, track_training, train_model


def create_pipeline(**kwargs) -> Pipeline:
    tables = ["images", "instances", "categories", "stuff_segments", "params:source",
              "params:training"]
    return Pipeline([
        Node(preview_augmentation, tables, "augmentation_preview", name="preview_augmentation"),
        Node(train_model, tables, ["model", "training_history", "validation_history"],
             name="train_model"),
        Node(plot_training_curves, ["training_history", "validation_history"],
             "training_curves", name="plot_training_curves"),
        Node(track_training, ["model", "training_history", "validation_history",
                              "params:training"], None, name="track_training"),
    ])
