"""The Kedro pipelines: one package per pipeline (nodes.py + pipeline.py), found by
`pipeline_registry.register_pipelines`."""
