"""Early-exit inference for BERT, RoBERTa and ALBERT: PABEE, DeeBERT, PCEE-BERT and ELBERT in one code base.

Where things are (each module has one job):

* :mod:`multiexit.policies` — the exit policies, the two backends their rules run on, and ``ExitTracker``, the one
  place where exit decisions are applied (online, batched and in replay);
* :mod:`multiexit.modeling` — the one layer loop (training, all-exits evaluation, real early exit), exit heads,
  losses and training stages; :mod:`multiexit.bert` and :mod:`multiexit.albert` — the model classes;
* :mod:`multiexit.replay` — offline replay, sweeps, per-layer scores, calibration, the score-vs-speed-up plot;
* :mod:`multiexit.cuda_graphs` — batch-size-1 early exit replayed from CUDA graphs;
* :mod:`multiexit.onnx` — export as ONNX segments and early exit on ONNX Runtime (the optional ``[onnx]`` extra);
* :mod:`multiexit.data` — GLUE / AG News / BBC News readers, official metrics, cached tokenisation;
* :mod:`multiexit.io` — atomic checkpoints, locked JSONL appends, exact resume state, the one place that
  recognises a failed write; :mod:`multiexit.errors` — the errors the runner reports in one line (user input,
  failed write, training stopped by SIGTERM);
* :mod:`multiexit.tiny` — tiny random configs and models for tests, benchmarks and examples;
* :mod:`multiexit.runner` — the command-line runner (``run_glue_with_exits.py``).

* :mod:`multiexit.hf` — the early-exit pipeline task and a ``Trainer`` metric for every exit.

The design card's top-level files (``run_glue_with_exits.py``, ``modeling_multiexit_bert.py``,
``modeling_multiexit_albert.py``, ``exit_policies.py``) are this package's public faces: each names what it exports.

Importing the package (any module of it) registers the multi-exit configs and models with HF's ``AutoConfig`` and
``AutoModelForSequenceClassification`` and the pipeline task ``early-exit-text-classification``, so that a saved
multi-exit checkpoint loads through HF's own entry points.
"""

from multiexit import albert, bert, hf  # noqa: F401 - imported for their registrations with transformers
