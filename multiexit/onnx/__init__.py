"""Early exit on ONNX Runtime: a multi-exit checkpoint exported as ONNX segments, run layer by layer.

* :func:`export_onnx` (``python -m multiexit.onnx export CHECKPOINT OUTPUT_DIR``, or ``multiexit-export-onnx``) writes
  a self-describing folder: the embeddings, every layer with its exit head, a manifest, the config and the tokenizer;
* :class:`OnnxMultiExitModel` loads it and runs real early exit with ONNX Runtime: the same
  :class:`multiexit.policies.ExitTracker` decides, the same loop skeleton (:func:`multiexit.modeling.run_layers`)
  drives the segments.

Both need the optional dependencies (``pip install .[onnx]``: onnx and onnxruntime); the rest of the package never
imports them. See docs/deploying.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from multiexit.errors import UserInputError

if TYPE_CHECKING:
    from multiexit.onnx.export import export_onnx
    from multiexit.onnx.runtime import OnnxMultiExitModel

__all__ = [
    "OnnxMultiExitModel",
    "export_onnx",
    "require",
]

INSTALL_HINT = "pip install .[onnx] (from the repository), or pip install onnx onnxruntime"


def require(module: str) -> None:
    """Import ``module`` (onnx, onnxruntime, onnxruntime.quantization) or say how to install it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as error:
        raise UserInputError(f"early exit on ONNX Runtime needs {module.split('.')[0]} ({error}): {INSTALL_HINT}"
                             ) from None


def __getattr__(name: str) -> object:
    # the public names load their modules (and onnx / onnxruntime) on first use, not with the package
    if name == "export_onnx":
        from multiexit.onnx.export import export_onnx

        return export_onnx
    if name == "OnnxMultiExitModel":
        from multiexit.onnx.runtime import OnnxMultiExitModel

        return OnnxMultiExitModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
