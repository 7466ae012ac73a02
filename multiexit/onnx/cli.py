"""``python -m multiexit.onnx export CHECKPOINT OUTPUT_DIR`` (also ``multiexit-export-onnx CHECKPOINT OUTPUT_DIR``):
export a trained multi-exit checkpoint, with its tokenizer, as ONNX segments for :class:`OnnxMultiExitModel`."""

from __future__ import annotations

import argparse
import logging
import sys

from multiexit.errors import UserInputError

__all__ = [
    "cli",
    "main",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m multiexit.onnx", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export a multi-exit checkpoint as ONNX segments")
    export.add_argument("checkpoint", help="a folder saved by run_glue_with_exits.py (or save_pretrained)")
    export.add_argument("output_dir", help="the export folder (new, empty, or an earlier export, which is replaced)")
    export.add_argument("--int8", action="store_true",
                        help="dynamic int8 quantisation of the embeddings and layers (exit heads stay fp32)")
    export.add_argument("--no_check", action="store_true",
                        help="skip the check of every exit's logits against the torch model on a padded batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Export; returns the export folder. Raises UserInputError on bad input."""
    from transformers import AutoConfig, AutoTokenizer

    from multiexit.modeling import backbone_model_type
    from multiexit.models import MODEL_CLASSES
    from multiexit.onnx.export import export_onnx
    from multiexit.runner.loading import check_weights_file, resolve_model_path

    args = parse_args(argv)
    path = resolve_model_path(args.checkpoint)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserInputError(f"{args.checkpoint}: no readable config.json ({str(error).strip().splitlines()[0]})"
                             ) from None
    if getattr(config, "exit_head_type", None) is None:
        raise UserInputError(f"{args.checkpoint} is not a multi-exit checkpoint (its config has no exit_head_type): "
                             f"fine-tune it with run_glue_with_exits.py --do_train first")
    backbone = backbone_model_type(config)  # bert, roberta, albert: a multi-exit config or an older stock-typed one
    if backbone not in MODEL_CLASSES:
        raise UserInputError(f"{args.checkpoint} is a {backbone!r} model; the multi-exit models are "
                             f"{', '.join(MODEL_CLASSES)}")
    check_weights_file(path)
    model = MODEL_CLASSES[backbone].from_pretrained(path).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
        logging.getLogger(__name__).warning("%s has no tokenizer: the export will not have one either", path)
    folder = export_onnx(model, args.output_dir, tokenizer, int8=args.int8, check=not args.no_check)
    print(f"exported {args.checkpoint} to {folder}: load it with "
          f"multiexit.onnx.OnnxMultiExitModel.from_pretrained({folder!r})")
    return folder


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    try:
        main(argv)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
