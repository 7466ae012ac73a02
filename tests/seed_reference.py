"""The exit rules of PABEE, DeeBERT, PCEE-BERT and ELBERT, restated from their published code, one example at a time.

These functions are deliberately naive: one example, one layer at a time, the same torch operations in the same order
as the published code, so that they can be read side by side with it. They are the *reference* that
``tests/test_seed_fidelity.py`` compares our policies (:mod:`multiexit.policies`) against; nothing in the package
imports them.

Input: one example's per-layer logits ``row`` as a float tensor ``[L, C]`` (row ``L - 1`` is the final classifier;
``C == 1`` is regression). The published models run in float32, so ``row`` is converted to float32 first.
Output: ``(exit_layer, answer)`` with ``exit_layer`` 1-indexed and ``answer`` the logits of the answering layer, or,
for a PCEE-BERT ensemble (``do_ensemble`` 1 or 2), the averaged *probabilities* the code returns in their place.

Every published loop works on a batch, but every decision in it is a Python ``if`` on a tensor (or ``torch.all``, or
``.mean()`` over the batch, or sample 0 only): it is only a per-example rule at batch size 1, which is how each
paper's evaluation scripts run it (``--per_gpu_eval_batch_size 1``). The functions below are those loops at batch
size 1, written per example. Where this restatement departs from the literal code, the docstring says so.

Sources (bare mirrors under /work/.mirror, read at these commits):

* PABEE: JetRunner/PABEE @ 6080b3ee425e905f70a0bc47d4ddffa497851bf3
* DeeBERT: castorini/DeeBERT @ 563eac1c23dc274eceaf4309cae110012f6b7bb1 (after PR #18, "Update entropy calculation")
* PCEE-BERT: michael-wzhu/PCEE-BERT @ 68fe1cf88f2336309d252c6bd9ab062437a99a97
* ELBERT: shakeley/ELBERT @ 31ae8ed59b8b8dce18bb1b82865c4c7d40b901a1
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Result = tuple[int, torch.Tensor]


def _as_rows(row: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    row = torch.as_tensor(row)
    if row.dim() != 2:
        raise ValueError(f"row must be [L, C], got shape {tuple(row.shape)}")
    return row.to(dtype)


# --------------------------------------------------------------------------------------------------------------------
# PABEE
# --------------------------------------------------------------------------------------------------------------------


def pabee(row: torch.Tensor, patience: int, regression_threshold: float = 0.0) -> Result:
    """PABEE's patience rule.

    Source: JetRunner/PABEE, ``pabee/modeling_bert.py`` ``BertModel.forward`` (the ``else`` branch after
    ``elif self.patience == 0``, lines 835-873) and the identical loop in ``pabee/modeling_albert.py``
    ``AlbertModel.forward`` (lines 632-670). ``regression_threshold`` defaults to 0 as ``BertModel.__init__`` does
    (``self.regression_threshold = 0``); ``run_glue.py`` sets it from ``--regression_threshold``.

    The code, line by line:

    * ``patience == 0``: the whole encoder runs and the last classifier answers (``res = [output_layers[L-1](...)]``).
    * otherwise, for ``i`` in ``0..L-1``: ``logits = output_layers[i](pooled_output)``;
      classification: ``labels = logits.argmax(dim=1)``, and the counter goes up iff there is a previous result and
      ``torch.all(labels.eq(patient_labels))`` (argmax equal to the previous layer's), else it resets to 0;
      regression: the counter goes up iff ``torch.abs(patient_result - labels) < self.regression_threshold``
      (strict), else it resets;
      then ``patient_result = logits`` and the loop breaks when ``patient_counter == self.patience``.
    * the answer is ``patient_result``: the logits of the last layer computed (the exit layer, or layer L).

    Restated differently: ``torch.all`` over the batch is a batch-level decision (the whole batch waits for its
    slowest row); at batch size 1 it is this example's own decision, which is what is written here.
    ``torch.argmax`` returns the first maximal index, so ties go to the lower class, as in the code.
    """
    row = _as_rows(row)
    num_layers = row.shape[0]
    regression = row.shape[-1] == 1
    if patience == 0:  # "Use all layers for inference"
        return num_layers, row[num_layers - 1]
    patient_counter = 0
    patient_result = None
    calculated_layer_num = 0
    for i in range(num_layers):
        calculated_layer_num += 1
        logits = row[i : i + 1]  # [1, C]: a batch of one
        if regression:
            labels = logits.detach()
            if (patient_result is not None) and torch.abs(patient_result - labels) < regression_threshold:
                patient_counter += 1
            else:
                patient_counter = 0
        else:
            labels = logits.detach().argmax(dim=1)
            if patient_result is not None:
                patient_labels = patient_result.detach().argmax(dim=1)
            if (patient_result is not None) and torch.all(labels.eq(patient_labels)):
                patient_counter += 1
            else:
                patient_counter = 0
        patient_result = logits
        if patient_counter == patience:
            break
    return calculated_layer_num, patient_result[0]


# --------------------------------------------------------------------------------------------------------------------
# DeeBERT
# --------------------------------------------------------------------------------------------------------------------


def deebert_entropy(x: torch.Tensor) -> torch.Tensor:
    """DeeBERT's ``entropy(x)`` at HEAD (castorini/DeeBERT, ``transformers/modeling_highway_bert.py``, lines 8-11,
    as changed by PR #18): ``p = softmax(x); -sum(p * log p)``, in nats, not normalised.

    A probability that underflows to 0 (a logit gap beyond ~103 in float32) gives ``0 * log 0 = 0 * -inf = NaN``, so
    the entropy is NaN and ``NaN < threshold`` is False: that ramp never exits."""
    x = torch.softmax(x, dim=-1)
    return -torch.sum(x * torch.log(x), dim=-1)


def deebert_entropy_original(x: torch.Tensor) -> torch.Tensor:
    """DeeBERT's ``entropy(x)`` before PR #18 (commit a402575, the code the paper's numbers came from):
    ``log(sum exp x) - sum(x exp x) / sum(exp x)``, over ``dim=1``. ``exp`` overflows to inf for logits above ~88
    in float32 (~11 in fp16), which makes the entropy NaN. Kept only to document that overflow."""
    exp_x = torch.exp(x)
    a = torch.sum(exp_x, dim=1)
    b = torch.sum(x * exp_x, dim=1)
    return torch.log(a) - b / a


def deebert(row: torch.Tensor, entropy_threshold: float) -> Result:
    """DeeBERT's entropy rule for ramps 1..L-1; the final classifier answers at layer L.

    Source: castorini/DeeBERT, ``transformers/modeling_highway_bert.py``: ``BertEncoder.forward`` (lines 77-126),
    ``entropy`` (lines 8-11), ``HighwayException`` (line 303) and ``BertForSequenceClassification.forward``
    (lines 383-455); the threshold comes from ``examples/run_highway_glue.py`` ``--early_exit_entropy`` (default -1,
    i.e. never exit) through ``BertEncoder.set_early_exit_entropy``, which copies one float into every layer's
    ``early_exit_entropy[i]``.

    The code, line by line: after each layer ``i`` (0-indexed) in eval mode, ramp ``i`` computes its logits and
    ``highway_entropy = entropy(highway_logits)``; ``if highway_entropy < self.early_exit_entropy[i]`` (strict, in
    nats) it raises ``HighwayException(new_output, i + 1)`` whose first element is the ramp's logits, and
    ``BertForSequenceClassification.forward`` catches it and answers with those logits at exit layer ``i + 1``.
    If no ramp raised, ``exit_layer = self.num_layers`` and the final classifier answers.

    Restated differently:

    * The loop checks ramps 1..L, **including ramp L**, which is never trained (``train_highway`` sums
      ``highway_losses[:-1]``): if its entropy were below the threshold, the code would answer with that untrained
      ramp's logits. Our models have no separate L-th ramp (the final classifier *is* exit L), so this restatement
      checks ramps 1..L-1 exactly as the code does and at layer L answers with the final classifier's logits
      (``row[L-1]``), whatever its entropy. Layer L is deliberately never tested against the threshold.
    * ``if highway_entropy < ...`` on a tensor only works at batch size 1 (DeeBERT#8, #21); this is that case.
    * The entropy is the code's own formula (:func:`deebert_entropy`), NaN included: a ramp whose softmax underflows
      to an exact 0 never exits here, where our policy (0·log 0 = 0) does. The random tests stay below that range.
    """
    row = _as_rows(row)
    num_layers = row.shape[0]
    early_exit_entropy = [entropy_threshold for _ in range(num_layers)]  # set_early_exit_entropy(float)
    for i in range(num_layers - 1):  # ramps 1..L-1; ramp L is replaced by the final classifier (see above)
        highway_logits = row[i : i + 1]
        highway_entropy = deebert_entropy(highway_logits)
        if highway_entropy < early_exit_entropy[i]:
            return i + 1, highway_logits[0]  # raise HighwayException(new_output, i + 1)
    return num_layers, row[num_layers - 1]


# --------------------------------------------------------------------------------------------------------------------
# PCEE-BERT
# --------------------------------------------------------------------------------------------------------------------


def normal_shannon_entropy(p: torch.Tensor, labels_num: int) -> torch.Tensor:
    """PCEE-BERT's ``normal_shannon_entropy`` (``pabee/modeling_pabee_bert.py``, lines 41-44), verbatim:
    ``Categorical(probs=p).entropy() / -np.log(1.0 / labels_num)``.

    ``Categorical`` clamps probabilities to ``[eps, 1 - eps]`` inside the log (eps = 1.19e-7 in float32), so a
    zero probability contributes 0 (no NaN), but a one-hot distribution has entropy ~1.19e-7, not 0. With one label
    (regression) the divisor is ``-log 1 = -0.0`` and the result is NaN."""
    entropy = torch.distributions.Categorical(probs=p).entropy()
    normal = -np.log(1.0 / labels_num)
    return entropy / normal


def pcee(row: torch.Tensor, patience: int, tau: float, do_ensemble: int = 0) -> Result:
    """PCEE-BERT's patient-and-confident rule (``--ee_mechanism V1``), with its three answers.

    Source: michael-wzhu/PCEE-BERT, ``pabee/modeling_pabee_bert.py`` ``BertModelWithPabeeV1.forward`` (lines
    347-527; the early-exit loop is lines 455-522) and ``normal_shannon_entropy`` (lines 41-44). ``tau`` is
    ``exiting_threshold`` (``--exiting_threshold``, default 0.2) and ``do_ensemble`` is ``--do_ensemble`` (default 1;
    the shipped scripts use 0); both reach the model through ``config`` in ``BertForSequenceClassificationWithPabee``.

    The code, line by line:

    * ``patience == 0``: the whole encoder runs and the last classifier's logits answer, whatever ``do_ensemble``
      says (``-1`` is the all-layers evaluation, not an exit rule, and is not restated).
    * otherwise, for ``i`` in ``0..L-1``: ``cur_logits = output_layers[i](pooled)``,
      ``cur_probs = nn.Softmax(dim=-1)(cur_logits)``, ``cur_entropy = normal_shannon_entropy(cur_probs, C)``;
      ``if cur_entropy < exiting_threshold`` the counter goes up, else it resets to 0;
      ``all_prev_logits.append(cur_probs)`` (despite the name, probabilities);
      ``if patient_counter == 0: all_prev_logits_close = [cur_probs]`` else ``.append(cur_probs)``: the list
      *restarts with the current (unconfident) layer's probabilities* whenever the counter is 0, so at an exit it
      holds the layer just before the confident streak (unless the streak started at layer 1) plus the streak;
      ``if patient_counter == self.patience: break``.
    * the answer: ``do_ensemble == 0``: ``cur_logits`` (the exit layer's logits); ``== 1``: the mean of
      ``all_prev_logits_close``; otherwise (2): the mean of ``all_prev_logits``, every layer's probabilities so far.
      A row that reaches layer L without exiting gets the same treatment: the mean of whatever the list holds.

    The earliest exit is layer ``patience`` (PABEE's is ``patience + 1``). ``if cur_entropy < ...`` on a tensor only
    works at batch size 1 (``run_glue_with_pabee.py`` refuses other eval batch sizes); this is that case.
    ``Categorical`` is built with its default argument validation, as in the code.
    """
    row = _as_rows(row)
    num_layers, num_labels = row.shape
    if patience == 0:  # "Use all layers for inference"
        return num_layers, row[num_layers - 1]
    patient_counter = 0
    all_prev_logits = []
    all_prev_logits_close = []
    cur_logits = None
    calculated_layer_num = 0
    for i in range(num_layers):
        calculated_layer_num += 1
        cur_logits = row[i : i + 1]
        cur_probs = nn.Softmax(dim=-1)(cur_logits)
        cur_entropy = normal_shannon_entropy(cur_probs, cur_probs.shape[-1])
        if cur_entropy < tau:
            patient_counter += 1
        else:
            patient_counter = 0
        all_prev_logits.append(cur_probs)
        if patient_counter == 0:
            all_prev_logits_close = [cur_probs]
        else:
            all_prev_logits_close.append(cur_probs)
        if patient_counter == patience:
            break
    if do_ensemble == 0:
        answer = cur_logits
    elif do_ensemble == 1:
        answer = torch.mean(torch.stack(all_prev_logits_close, dim=0), dim=0, keepdim=False)
    else:
        answer = torch.mean(torch.stack(all_prev_logits, dim=0), dim=0, keepdim=False)
    assert answer.shape == (1, num_labels)
    return calculated_layer_num, answer[0]


# --------------------------------------------------------------------------------------------------------------------
# ELBERT
# --------------------------------------------------------------------------------------------------------------------


ELBERT_THRES_NAMES = ("entropy", "bias_1", "bias_2", "bias_3")


def elbert_normalised_entropy(logits: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``ExitLayer.forward`` (ELBERT ``test_ver/modeling_albert.py``, lines 622-629) with ``kd_enable`` false, as in
    its ``config.json``: ``tmp = softmax(logits, dim=1)``; ``entropy = (tmp * log tmp).sum(1) / np.log(1 / C)``.
    A probability that underflows to 0 makes it NaN (``0 * -inf``), and ``NaN < exit_thres`` is False."""
    tmp = F.softmax(logits, dim=1)
    return (tmp * torch.log(tmp)).sum(dim=1) / np.log(1 / num_labels)


def elbert(
    row: torch.Tensor,
    exit_thres: float,
    cnt_thres: int,
    thres_name: str,
    margin: float = 0.0,
    range_tmp: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Result:
    """ELBERT's two-stage rule, for binary tasks exactly as the code runs it at batch size 1.

    ``dtype`` float64 evaluates the same rule without float32 rounding: the code's float32 p(class 0) rounds towards
    1.0 when class 0 is confident (logit gap beyond ~10) and its ties then pass, which is rounding, not the rule
    (our policy judges both classes without it; the README lists the difference). The random comparisons use
    float64; the hand-built cases pin the float32 behaviour where it matters.

    Source: shakeley/ELBERT, ``test_ver/modeling_albert.py``: ``AlbertTransformer.forward`` (lines 780-855),
    ``ExitLayer.forward`` (lines 553-649: the normalised entropy) and ``ExitLayer.lower_than_thres`` (lines
    655-747). The knobs are keys of the checkpoint's ``config.json``: ``exit_thres`` (δ, 0.1 there), ``cnt_thres``
    (the window N, 8 there; ``change_config.py`` writes it back as a float, hence ``int(...)``), ``thres_name``
    (``bias_1`` there), ``margin`` (0.0 there) and ``range_tmp`` (read by ``bias_3`` but absent from every shipped
    config: AttributeError).

    ``AlbertTransformer.forward``, line by line: ``cnt = 0``; while ``cnt < L``: run layer group, ``exit_logits =
    exit_out_layer(...)`` (which also stores ``self.entropy``), ``cnt += 1``; in eval,
    ``x.append(softmax(exit_logits[0], dim=1)[0][0])`` -- **the probability of class 0 of sample 0** -- and
    ``if exit_out_layer.lower_than_thres(x): break``. The exit index is ``cnt - 1`` (0-indexed) and the answer is
    ``exit_logits``: the exit layer's logits, or layer L's when no break happened (layer L is tested too, but then
    the answer is layer L's either way).

    ``lower_than_thres(x)``, per ``thres_name`` (N = ``int(cnt_thres)``, m = ``margin``, all comparisons strict and in
    float32 against Python floats, as in the code):

    * ``entropy``: exit iff ``self.entropy.mean() < exit_thres``.
    * every ``bias_*`` first exits if ``self.entropy.mean() < exit_thres`` (stage 1), and otherwise returns False
      while ``len(x) < N`` (fewer than N layers so far);
    * ``bias_1``: over the last N values, count ``x < 0.5 - m`` and ``x > 0.5 + m``; exit iff all N are on one side.
    * ``bias_2``: ``x[-N] < 0.5 - m`` means class 1 (``is_larger = False``), ``> 0.5 + m`` class 0, anything else
      returns False; then each next value must not move against that side: with class 0, ``x[-i] < previous`` fails,
      with class 1, ``x[-i] > previous`` fails (ties pass); exit iff none failed.
    * ``bias_3``: ``max``/``min`` of the last N values; unless ``min > 0.5 + m`` or ``max < 0.5 - m`` it returns
      False; exit iff ``max - min <= range_tmp``.

    Restated differently: ``self.entropy.mean()`` is the mean over the batch and ``x`` follows sample 0 only; at
    batch size 1 both are this example's own values, which is what is written here. With more than two classes the
    code still tracks p(class 0) only: this function runs the code's rule as written for any C, but it is the
    published behaviour only for binary tasks (our multi-class rule is a generalisation, tested separately).
    ``thres_name == "logits"`` (``softm_logits.min() < exit_thres``) is not restated.
    """
    if thres_name not in ELBERT_THRES_NAMES:
        raise ValueError(f"thres_name must be one of {ELBERT_THRES_NAMES}, got {thres_name!r}")
    if thres_name == "bias_3" and range_tmp is None:
        raise ValueError("bias_3 reads config.range_tmp, which no shipped config defines: pass range_tmp")
    row = _as_rows(row, dtype)
    num_layers, num_labels = row.shape

    def lower_than_thres(entropy: torch.Tensor, x: list[torch.Tensor]) -> bool:
        if thres_name == "entropy":
            return bool(entropy.mean() < exit_thres)
        if entropy.mean() < exit_thres:
            return True
        cnt_bias = int(cnt_thres)
        if len(x) < cnt_bias:
            return False
        if thres_name == "bias_1":
            cnt_large = 0
            cnt_less = 0
            for i in range(cnt_bias, 0, -1):
                if x[-i] < 0.5 - margin:
                    cnt_less += 1
                elif x[-i] > 0.5 + margin:
                    cnt_large += 1
            return cnt_large == cnt_bias or cnt_less == cnt_bias
        if thres_name == "bias_2":
            if x[-cnt_bias] < 0.5 - margin:
                is_larger = False
            elif x[-cnt_bias] > 0.5 + margin:
                is_larger = True
            else:
                return False
            logit = x[-cnt_bias]
            for i in range(cnt_bias - 1, 0, -1):
                if is_larger and x[-i] < logit:
                    return False
                if not is_larger and x[-i] > logit:
                    return False
                logit = x[-i]
            return True
        # bias_3
        max_tmp = max(x[-cnt_bias:])
        min_tmp = min(x[-cnt_bias:])
        if not (min_tmp > 0.5 + margin or max_tmp < 0.5 - margin):
            return False
        return bool((max_tmp - min_tmp) <= range_tmp)

    exit_sm_logits_lst: list[torch.Tensor] = []
    cnt = 0
    exit_logits = None
    while cnt < num_layers:
        exit_logits = row[cnt : cnt + 1]
        entropy = elbert_normalised_entropy(exit_logits, num_labels)  # ExitLayer.forward stores self.entropy
        cnt += 1
        sm_logits = F.softmax(exit_logits, dim=1)
        exit_sm_logits_lst.append(sm_logits[0][0])
        if lower_than_thres(entropy, exit_sm_logits_lst):
            break
    return cnt, exit_logits[0]  # exit index cnt - 1, 0-indexed
