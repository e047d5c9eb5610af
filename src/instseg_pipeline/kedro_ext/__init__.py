"""The only Kedro-aware code outside pipelines/: catalog datasets, hooks, MLflow tracking."""
