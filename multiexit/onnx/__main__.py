"""``python -m multiexit.onnx export CHECKPOINT OUTPUT_DIR``: see :mod:`multiexit.onnx.cli`."""

import sys

from multiexit.onnx.cli import cli

sys.exit(cli())
