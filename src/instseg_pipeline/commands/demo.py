"""`instseg-demo`: the Gradio demo (`instseg_pipeline.serving.demo`) in a browser.

The model comes from --checkpoint / --onnx, else the INSTSEG_* environment variables the
HTTP service reads ($INSTSEG_ONNX, $INSTSEG_CHECKPOINT, ...), else the newest trained model
under --root. Runs until interrupted (Ctrl-C or SIGTERM).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EXAMPLES_FOLDER = "data/01_raw/synthetic/images"


def _build_parser() -> argparse.ArgumentParser:
    from instseg_pipeline.commands.serve import add_model_options

    parser = argparse.ArgumentParser(
        prog="instseg-demo",
        description="Browser demo of the trained instance segmentation model (Gradio): "
                    "upload an image to see its instances, or click on objects to segment "
                    "them. Nothing leaves the machine: no share link, no analytics.")
    parser.add_argument("--root", help="project folder searched for "
                                       "data/06_models/<source>/model.pt/<version>/model.pt "
                                       "when no model is given, and for example images "
                                       "(default: the working folder)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind; 0.0.0.0 exposes the demo to the network "
                             "(default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860,
                        help="TCP port (default: %(default)s)")
    parser.add_argument("--examples", type=Path,
                        help=f"folder of example images offered in the demo (default: "
                             f"<root>/{EXAMPLES_FOLDER}; three synthetic images are generated "
                             "when it holds none)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="start value of the score threshold sliders (default: "
                             "%(default)s)")
    add_model_options(parser, "to run")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must lie in [0, 1], got {args.score_threshold}")
    if args.examples is not None and not args.examples.is_dir():
        parser.error(f"--examples {args.examples}: not a folder")


def _load(settings):
    """Predictor and interactive segmenter of ``settings`` (a `ServiceSettings`)."""
    from instseg_pipeline.predict.predictor import load_predictor
    from instseg_pipeline.serving.interactive import InteractiveSegmenter, load_sam

    predictor = load_predictor(settings.checkpoint, settings.onnx, settings.manifest,
                               settings.device, settings.root, settings.source_name,
                               settings.threads, settings.panoptic_options())
    sam = load_sam(settings.sam_checkpoint, settings.sam_model_type, settings.device) \
        if settings.sam_checkpoint else None
    return predictor, InteractiveSegmenter(predictor, sam)


def _stop_on_sigterm() -> None:
    """Let SIGTERM end the demo the way Ctrl-C does, so temporary examples are removed."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _serve(demo, args: argparse.Namespace, max_upload_bytes: int) -> None:
    from instseg_pipeline.serving.demo import launch_demo

    launch_demo(demo, args.host, args.port, max_upload_bytes)
    try:
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        logger.info("stopping the demo")
    finally:
        demo.close()


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # gradio polls its own server through httpx at start; one line per poll is noise
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.root.level))
    from instseg_pipeline.commands.serve import settings_from_args
    from instseg_pipeline.predict.predictor import ManifestError, ModelNotFoundError

    settings = settings_from_args(args)
    try:
        predictor, segmenter = _load(settings)
    except (ModelNotFoundError, ManifestError, ValueError) as exc:
        logger.error("cannot start the demo: %s", exc)
        return 2
    from instseg_pipeline.serving.demo import build_demo, example_images  # gradio: slow

    _stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="instseg-demo-") as scratch:
        folder = args.examples or Path(settings.root) / EXAMPLES_FOLDER
        demo = build_demo(predictor, segmenter, example_images(folder, scratch),
                          args.score_threshold, settings.max_pixels)
        _serve(demo, args, settings.max_upload_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
