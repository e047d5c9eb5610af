"""`instseg-serve`: the HTTP service (`instseg_pipeline.serving.api`) under uvicorn."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

logger = logging.getLogger(__name__)


def add_model_options(parser: argparse.ArgumentParser, use: str) -> None:
    """The options `settings_from_args` reads (model, device, SAM, limits, threads, log
    level), shared by `instseg-serve` and `instseg-demo`; ``use`` ends the model options'
    help ("to serve with torch")."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="trained model file (model.pt saved by the "
                                             f"training pipeline) {use} with torch")
    source.add_argument("--onnx", help=f"exported model.onnx {use} with ONNX Runtime; its "
                                       "manifest's SHA-256 must match")
    parser.add_argument("--manifest", help="manifest json of --onnx when it is not beside it")
    parser.add_argument("--device", help="auto (CUDA when present), cpu or cuda[:N] "
                                         "(default: auto)")
    parser.add_argument("--sam-checkpoint", help="Segment Anything checkpoint that answers "
                                                 "point prompts (default: none, the trained "
                                                 "model and GrabCut answer)")
    parser.add_argument("--sam-model-type", help="vit_h, vit_l or vit_b for official SAM "
                                                 "checkpoints (default: vit_b)")
    parser.add_argument("--max-upload-bytes", type=int,
                        help="largest accepted upload; larger ones get 413 (default 20 MiB)")
    parser.add_argument("--max-pixels", type=int,
                        help="largest accepted width x height, read from the image header "
                             "before decoding; larger ones get 413 (default 40 million)")
    parser.add_argument("--threads", type=int,
                        help="intra-op threads of torch / ONNX Runtime (default: one per "
                             "core; use fewer where cores are shared)")
    parser.add_argument("--stuff-min-area", type=int,
                        help="semantic (panoptic) models: fewest free pixels a stuff category "
                             "needs to make a segment (env INSTSEG_STUFF_MIN_AREA; default: "
                             "the evaluation's, evaluation.panoptic.stuff_min_area)")
    parser.add_argument("--overlap-threshold", type=float,
                        help="semantic models: an instance more than this share of whose "
                             "mask better ones took leaves its pixels to stuff (env "
                             "INSTSEG_OVERLAP_THRESHOLD; default: the evaluation's, 0.5)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="log level (default: %(default)s)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instseg-serve",
        description="Serve the trained instance segmentation model over HTTP: POST /segment, "
                    "POST /segment_interactive, GET /health, GET /model (OpenAPI docs at "
                    "/docs). Options left out fall back to the INSTSEG_* environment "
                    "variables, then to the newest trained model under --root.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind; 0.0.0.0 exposes the service to the "
                             "network (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--root", help="project folder searched for "
                                       "data/06_models/<source>/model.pt/<version>/model.pt "
                                       "when no model is given (default: the working folder)")
    add_model_options(parser, "to serve")
    parser.add_argument("--max-queue", type=int,
                        help="requests that may wait for the model while it runs one; "
                             "further requests to /segment and /segment_interactive get 503 "
                             "with Retry-After at once, so memory and waiting stay bounded "
                             "(env INSTSEG_MAX_QUEUE; default 8; 0: no waiting)")
    parser.add_argument("--max-points", type=int,
                        help="most prompt points one /segment_interactive request may send; "
                             "more get 422 (env INSTSEG_MAX_POINTS; default 64)")
    return parser


def settings_from_args(args: argparse.Namespace):
    """`ServiceSettings` from the environment, overridden by the options given."""
    from instseg_pipeline.serving.api import ServiceSettings

    settings = ServiceSettings.from_env()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings)
             if getattr(args, f.name, None) is not None}
    if given.get("checkpoint") or given.get("onnx"):
        # a model named on the command line replaces one named in the environment
        settings = dataclasses.replace(settings, checkpoint=None, onnx=None)
    return dataclasses.replace(settings, **given)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from instseg_pipeline.serving.api import create_app

    try:
        settings = settings_from_args(args)
    except ValueError as exc:  # a limit out of range, from an option or the environment
        parser.error(str(exc))
    app = create_app(settings)
    logger.info("starting on http://%s:%d", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
