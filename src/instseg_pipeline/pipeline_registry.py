"""Project pipelines. `kedro run` runs `__default__`: every pipeline found but those in
`RUN_ALONE`, in data order, with the export waiting for the evaluation (see
`pipelines/export/pipeline.py`): a failing export then ends the run with the metrics
already saved."""
from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from instseg_pipeline.pipelines import export

# run by name only (`kedro run --pipelines model_comparison`): they train one model per
# family (model_comparison) or per mask variant (weak_supervision)
RUN_ALONE = ("model_comparison", "weak_supervision")


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    stages = [pipeline for name, pipeline in pipelines.items()
              if name not in ("export", *RUN_ALONE)]
    pipelines["__default__"] = sum(stages, export.create_pipeline(after_evaluation=True))
    return pipelines
