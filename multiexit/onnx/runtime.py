"""Real early exit on ONNX Runtime: the segments of :mod:`multiexit.onnx.export`, run layer by layer.

:class:`OnnxMultiExitModel` answers as the torch model does (``early_exit`` -> :class:`EarlyExitOutput`, the
all-exits pass -> ``all_logits`` [L, B, C], torch tensors on the host), and decides as it does: the loop is
:func:`multiexit.modeling.run_layers` and the decisions :class:`multiexit.policies.ExitTracker`'s; only the driver
(:class:`_OrtLayerPass`) is ONNX Runtime's. A pass's state goes from one segment to the next in one of two ways:

* on the host (the CPU provider's default): numpy arrays, fed to ``session.run``. Its outputs already are host memory,
  so an IO binding has nothing to keep in place there, and costs each run more than it saves (BENCHMARKS.md, (f));
* through an IO binding (the CUDA provider's default, ``io_binding=True``): the state stays ORT values on the
  provider's device and never comes back to the host; only the exit logits are bound to host memory. Outputs are
  bound afresh at every run: ONNX Runtime reuses a bound output's buffer from run to run otherwise, and a layer group
  that runs at consecutive depths would overwrite its own input.

Either way the exit logits [B, C] are the one read per layer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from multiexit.errors import UserInputError
from multiexit.modeling import EarlyExitOutput, MultiExitOutput, run_layers
from multiexit.onnx import require
from multiexit.onnx.export import ATTENTION_MASK, EXIT_LOGITS, HIDDEN_STATES, INPUT_IDS, ROWS, TOKEN_TYPE_IDS, Manifest
from multiexit.policies import ExitPolicy, ExitTracker

__all__ = [
    "OnnxMultiExitModel",
    "share_thread_pool",
]

CUDA_PROVIDER = "CUDAExecutionProvider"


class _Session:
    """One ONNX file's session. Its inputs are taken by name from the pass's state (an exit that reads only [CLS]
    takes no token weights). Without an IO binding they are numpy arrays and so are its outputs; with one they are ORT
    values, the state on ``device``, the exit logits on the host."""

    def __init__(self, session, device: str, io_binding: bool) -> None:  # noqa: ANN001 - an InferenceSession
        self.session = session
        self.binding = session.io_binding() if io_binding else None
        self.input_names = [value.name for value in session.get_inputs()]
        self.outputs = [(value.name, "cpu" if value.name == EXIT_LOGITS else device)
                        for value in session.get_outputs()]
        self.output_names = [name for name, _ in self.outputs]

    def run(self, inputs: dict[str, object]) -> list:
        binding = self.binding
        if binding is None:
            return self.session.run(self.output_names, {name: inputs[name] for name in self.input_names})
        for name in self.input_names:
            binding.bind_ortvalue_input(name, inputs[name])
        for name, device in self.outputs:  # fresh output buffers (see the module docstring)
            binding.bind_output(name, device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


class _DepthSessions:
    """What runs at one depth: the layer's session, and the exit's when the layer's does not give its logits."""

    __slots__ = ("layer", "exit")

    def __init__(self, layer: _Session, exit: _Session | None) -> None:
        self.layer, self.exit = layer, exit


class _OrtLayerPass:
    """One batch's pass through the segments (:class:`multiexit.modeling.LayerPass`): the running rows' state
    (hidden states, layer mask, token weights) by name: numpy arrays, or ORT values with an IO binding."""

    __slots__ = ("depths", "select_rows", "state", "first_logits")

    def __init__(self, model: OnnxMultiExitModel, state: dict[str, object], first_logits: object = None) -> None:
        """``first_logits``: the first exit's, where the embeddings segment ran the first layer (``state`` is then
        the state after it)."""
        self.depths, self.select_rows, self.state = model._depths, model._select_rows, state
        self.first_logits = first_logits

    def layer(self, depth: int) -> None:
        if depth == 0 and self.first_logits is not None:
            return  # the embeddings segment ran it
        self.state[HIDDEN_STATES] = self.depths[depth].layer.run(self.state)[0]

    def layer_and_exit(self, depth: int) -> np.ndarray:
        if depth == 0 and self.first_logits is not None:
            logits = self.first_logits
        else:
            sessions, state = self.depths[depth], self.state
            outputs = sessions.layer.run(state)
            state[HIDDEN_STATES] = outputs[0]
            logits = outputs[1] if sessions.exit is None else sessions.exit.run(state)[0]
        # host memory either way, numpy (no torch tensor made per layer: at batch size 1 each torch call after a
        # segment's run costs far more than its warm time); the tracker's tolist() is the one read
        return logits if isinstance(logits, np.ndarray) else logits.numpy()

    def keep_rows(self, rows: torch.Tensor) -> None:
        select = self.select_rows
        if select.binding is None:  # the state is on the host: numpy takes the rows
            index = rows.numpy()
            self.state = {name: value[index] for name, value in self.state.items()}
            return
        from onnxruntime import OrtValue

        inputs = {f"{name}_in": value for name, value in self.state.items()}
        inputs[ROWS] = OrtValue.ortvalue_from_numpy(rows.numpy())
        self.state = dict(zip(select.output_names, select.run(inputs)))


class OnnxMultiExitModel:
    """A multi-exit model exported by :func:`multiexit.onnx.export_onnx`, run by ONNX Runtime.

    ``config`` is the model's transformers config (``num_labels``, ``id2label``, exit settings), ``num_exit_layers``
    its depth. ``early_exit(input_ids, attention_mask, token_type_ids, policy=...)`` and the all-exits pass
    (``model(input_ids, attention_mask, token_type_ids).all_logits``, [L, B, C]) take torch tensors and return torch
    tensors, like the torch model's; given numpy arrays (the tokenizer's ``return_tensors="np"``) they return numpy
    arrays, as an ONNX Runtime session does: at batch size 1 a call then makes no torch tensor at all."""

    def __init__(self, folder: str, manifest: Manifest, config: object, sessions: dict[str, _Session],
                 device: str, threads: int | None, io_binding: bool) -> None:
        self.folder, self.manifest, self.config = folder, manifest, config
        # a torch.device, as the torch model's (the pipeline puts its inputs there); ONNX Runtime takes its type
        self.device, self.threads, self.io_binding = torch.device(device), threads, io_binding
        self._embeddings = sessions[manifest.embeddings]
        self._select_rows = sessions[manifest.select_rows]
        self._depths = [_DepthSessions(sessions[d.layer], sessions[d.exit] if d.exit else None)
                        for d in manifest.depths]
        self.training = False
        self._validated_policy: tuple[ExitPolicy, int] | None = None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], threads: int | None = None,
                        providers: Sequence[str | tuple[str, dict]] | None = None, session_options: object = None,
                        manifest: Manifest | None = None, io_binding: bool | None = None) -> OnnxMultiExitModel:
        """Load an export folder. ``threads``: ONNX Runtime's intra-op threads per session (None: its default, one
        per physical core; with several, :func:`share_thread_pool` first is faster); ``providers``: execution
        providers (default CPU; ``["CUDAExecutionProvider"]`` keeps the hidden states on the GPU);
        ``session_options``: an ``onnxruntime.SessionOptions`` to use instead of this package's
        (:func:`make_session_options`; ``threads``, if given, is set on it); ``io_binding``: run the sessions through
        IO bindings, the state kept as ORT values on the provider's device (None: with CUDA only; see the module
        docstring)."""
        require("onnxruntime")
        import onnxruntime as ort
        from transformers import AutoConfig

        folder = os.fspath(folder)
        manifest = manifest or Manifest.load(folder)
        config = AutoConfig.from_pretrained(folder)
        providers = list(providers or ["CPUExecutionProvider"])
        names = [provider[0] if isinstance(provider, tuple) else provider for provider in providers]
        available = ort.get_available_providers()
        missing = [name for name in names if name not in available]
        if missing:
            raise UserInputError(f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)})"
                                 + ("; for CUDA install onnxruntime-gpu instead of onnxruntime"
                                    if CUDA_PROVIDER in missing else ""))
        device = "cuda" if names[0] == CUDA_PROVIDER else "cpu"
        io_binding = device != "cpu" if io_binding is None else io_binding
        files = {manifest.embeddings, manifest.select_rows}
        files |= {d.layer for d in manifest.depths} | {d.exit for d in manifest.depths if d.exit}
        sessions = {}
        for name in sorted(files):
            options = make_session_options(ort, session_options, threads)
            session = ort.InferenceSession(os.path.join(folder, name), options, providers=providers)
            sessions[name] = _Session(session, device, io_binding)
        return cls(folder, manifest, config, sessions, device, threads, io_binding)

    @property
    def num_exit_layers(self) -> int:
        return self.manifest.num_layers

    # torch-model manners, so that code written for the torch model (the runner's evaluation) runs this one too
    def eval(self) -> OnnxMultiExitModel:
        return self

    def to(self, *args: object, **kwargs: object) -> OnnxMultiExitModel:
        """A no-op: the execution provider chosen at load decides where this model runs."""
        return self

    # ---- inputs -----------------------------------------------------------------------------------------------------
    def _input(self, values: torch.Tensor | np.ndarray) -> object:
        """One [batch, tokens] input as the embeddings segment takes it: int64 numpy, or an ORT value on the
        provider's device with an IO binding."""
        if (not self.io_binding and type(values) is np.ndarray and values.dtype == np.int64 and values.ndim == 2
                and values.flags.c_contiguous):
            return values  # the tokenizer's arrays, as the segment takes them: no conversion at all
        if isinstance(values, torch.Tensor):  # one call where it can (see layer_and_exit)
            array = values.numpy() if values.is_cpu and not values.requires_grad else values.detach().cpu().numpy()
        else:
            array = np.asarray(values)
        array = np.ascontiguousarray(array, dtype=np.int64)
        if array.ndim != 2:
            raise ValueError(f"expected [batch, tokens] inputs, got shape {array.shape}")
        if not self.io_binding:
            return array
        from onnxruntime import OrtValue

        return OrtValue.ortvalue_from_numpy(array, self.device.type, 0)

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None) -> _OrtLayerPass:
        """Run the embeddings (and the first layer, where the export put it in the same segment): the pass that the
        layers then continue."""
        if input_ids is None:
            raise ValueError("the ONNX model takes input_ids (inputs_embeds cannot be fed to its embeddings segment)")
        ids = self._input(input_ids)
        shape = ids.shape() if self.io_binding else ids.shape
        mask = self._input(attention_mask if attention_mask is not None else np.ones(shape, dtype=np.int64))
        types = self._input(token_type_ids if token_type_ids is not None else np.zeros(shape, dtype=np.int64))
        embeddings = self._embeddings
        state = dict(zip(embeddings.output_names, embeddings.run({INPUT_IDS: ids, TOKEN_TYPE_IDS: types,
                                                                 ATTENTION_MASK: mask})))
        return _OrtLayerPass(self, state, state.pop(EXIT_LOGITS, None))

    # ---- the two ways to run it -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs: object) -> MultiExitOutput:
        """All exits in one pass: ``all_logits`` [L, B, C] and ``logits`` (the last exit's): torch tensors, or numpy
        arrays where ``input_ids`` is one."""
        unused = {key for key, value in kwargs.items() if value is not None and value is not False}
        if unused:
            raise ValueError(f"the ONNX model takes input_ids, attention_mask and token_type_ids; got {sorted(unused)}")
        layer_logits = run_layers(self._start(input_ids, attention_mask, token_type_ids), self.num_exit_layers)
        all_logits = np.stack(layer_logits)
        if not isinstance(input_ids, np.ndarray):
            all_logits = torch.from_numpy(all_logits)
        return MultiExitOutput(logits=all_logits[-1], all_logits=all_logits)

    __call__ = forward

    def early_exit(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None, policy: ExitPolicy | None = None) -> EarlyExitOutput:
        """Real early exit, as :meth:`MultiExitMixin.early_exit`: each row leaves the batch at the layer where
        ``policy`` lets it exit; ``logits`` [B, C] are each row's answer there, ``exit_layers`` [B] 1-indexed. Torch
        tensors, or numpy arrays where ``input_ids`` is one."""
        if policy is None:
            raise ValueError("early_exit needs an ExitPolicy")
        validated = self._validated_policy  # validated once for a sweep that calls this once per input
        if validated is None or validated[0] is not policy:
            policy.validate(self.config.num_labels, self.num_exit_layers)
            validated = self._validated_policy = (policy, self.num_exit_layers)
        tracker = ExitTracker(policy, input_ids.shape[0], validated[1], numpy=isinstance(input_ids, np.ndarray))
        run_layers(self._start(input_ids, attention_mask, token_type_ids), validated[1], tracker)
        return EarlyExitOutput(logits=tracker.answer, exit_layers=tracker.exit_layer)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.folder!r}, {self.manifest.model_type}, {self.num_exit_layers} layers, "
                f"{self.device}, threads={self.threads}, io_binding={self.io_binding})")


_SHARED_POOL: list[int] = []  # the size of this process's shared intra-op thread pool, once share_thread_pool made it


def share_thread_pool(threads: int) -> None:
    """Make every ONNX Runtime session of this process run on one shared pool of ``threads`` intra-op threads (ONNX
    Runtime's global thread pool) instead of a pool per session. Early exit runs a chain of sessions, one per
    segment: with a pool each, every run wakes its own workers while the last segment's go to sleep, so with several
    threads the segments at full depth cost clearly more than the stock model's one session, and a shared pool takes
    most of that back (the benchmark's ONNX Runtime section measures both). The pool belongs to the process: call
    this before the first session is made, once (again with the same size is a no-op). Every session made after it
    runs on that pool (:func:`make_session_options` says so; ONNX Runtime refuses a session with its own pool then),
    whatever its ``threads``."""
    require("onnxruntime")
    import onnxruntime as ort

    if threads < 1:
        raise UserInputError(f"threads must be >= 1, got {threads}")
    if _SHARED_POOL:
        if _SHARED_POOL[0] != threads:
            raise UserInputError(f"this process already shares a pool of {_SHARED_POOL[0]} ONNX Runtime threads; it "
                                 f"cannot change to {threads}")
        return
    ort.set_global_thread_pool_sizes(threads, 1)
    _SHARED_POOL.append(threads)


def make_session_options(ort, base: object, threads: int | None):  # noqa: ANN001, ANN202 - onnxruntime, options
    """The options of every session of :class:`OnnxMultiExitModel` (and of the benchmark's stock model), or ``base``
    as the caller made it, with ``threads`` set on it. Ours: every graph optimisation, sequential execution,
    ``threads`` intra-op threads and one inter-op thread (a segment is a chain of operators). Each session has its
    own intra-op thread pool, unless :func:`share_thread_pool` made one for the process; with several threads its
    workers stop spinning when a run ends (``session.force_spinning_stop``), or they would spin on the cores the next
    segment's run needs."""
    if threads is not None and threads < 1:
        raise UserInputError(f"threads must be >= 1, got {threads}")
    if base is not None:
        options = base
    else:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: not one warning per session about unused initializers
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if _SHARED_POOL:  # (share_thread_pool): every session of the process runs on it, whatever ``threads`` says
        options.use_per_session_threads = False
    elif threads is not None:
        options.intra_op_num_threads = threads
    return options
