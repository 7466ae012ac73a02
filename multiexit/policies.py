"""Exit policies of PABEE, DeeBERT, PCEE-BERT, ELBERT and the two baselines, written once for every use.

A policy is one small frozen dataclass that declares everything the rest of the toolkit needs:

* its **rule**, two pure methods. ``init_state(batch_size, num_labels)`` returns the per-sample state, a dict of
  tensors whose first dimension is the batch. Because the state is per sample, a batch can drop the rows that have
  exited (``compact_state``) and the rest carry on: this is what makes batched early exit give the same answers as
  batch size 1. ``step(state, logits, layer)`` looks at the logits of the layer just computed (``layer`` is
  1-indexed) and returns which rows exit now, what every row would answer if it exited now, and the new state;
* its **command-line flags** (:class:`PolicyFlag`): the runner builds its flag group and the settings a command line
  sweeps from them (:meth:`ExitPolicy.from_flag_values`);
* its **calibration knob** (:class:`Knob`: the field, its range, and which way is faster), used to pick a setting
  for a target speed-up or metric drop;
* its **default grid**, spanning its speed-ups, for sweeps and plots; and the **templates** calibration starts
  from when the user names no setting.

Adding a policy is one subclass (registered by subclassing, see :data:`POLICIES`) and its tests.

:class:`ExitTracker` drives a policy across layers and is the *only* place where exit decisions are applied. The
model's layer loop calls it online (one layer at a time, rows leaving the batch as they exit) and :func:`replay`
calls it offline over cached per-layer logits ``[N, L, C]``. Same code, same decisions; the tests prove it.

Conventions shared by all policies (the README has the table):

* Layers are 1-indexed; ``L`` is the number of layers. A row that reaches layer ``L`` exits there, with the answer
  the policy gives at ``L`` (the exit layer's own head, except for a PCEE ensemble).
* Decisions are computed in float64 from the logits as they are (float32, fp16 or bf16 values are exact in
  float64), so that they follow each rule as written rather than the rounding of float32 probabilities near 0 or 1.
  Entropy is in nats and computed from ``log_softmax``, so huge or infinite logits cannot overflow and probabilities
  that underflow to 0 contribute 0, never NaN. "Normalised entropy" is ``H / ln C``.
* Policies that have no meaning for regression (``num_labels == 1``) refuse it in :meth:`ExitPolicy.validate`
  instead of silently exiting at layer 1.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np
import torch

from multiexit.errors import UserInputError

State = dict[str, object]  # per-row state: tensors with a first dimension of rows (TensorOps) or Python values
logger = logging.getLogger(__name__)

__all__ = [
    "ExitPolicy",
    "BudgetExit",
    "PatienceExit",
    "EntropyExit",
    "MaxProbExit",
    "PCEEExit",
    "ELBERTExit",
    "POLICIES",
    "PCEE_ENSEMBLES",
    "ELBERT_CRITERIA",
    "make_policy",
    "ExitTracker",
    "replay",
    "ReplayResult",
    "PolicyFlag",
    "Knob",
    "Ops",
    "RowOps",
    "TensorOps",
    "State",
    "compact_state",
    "softmax",
    "entropy",
    "normalized_entropy",
    "max_prob",
    "parse_list",
]


# --------------------------------------------------------------------------------------------------------------------
# The two backends a rule runs on: rows of a batch as tensors, or one row as Python floats
# --------------------------------------------------------------------------------------------------------------------
#
# Each rule (a policy's ``init_state`` and ``step``) is written once against the small vocabulary below and runs on
# either backend: ``TensorOps`` for a batch of rows (replay, batched early exit) and ``RowOps`` for the one row of
# batch size 1, in plain Python floats, so that a decision costs a few float operations instead of a dozen tiny
# tensor operations, each of which has a fixed dispatch cost. Python's arithmetic and comparison operators (``+``,
# ``<``, ``==``, ``&``, ``|``, ``abs``) work the same on both. Both backends compute in float64 with the same
# operations in the same order, and with the same exp and log (Python's ``math``, element by element, also for
# tensors): so they give bit-identical numbers and identical decisions, which the tests check on random logits.

_LOGIT_BOUND = 1e30  # far beyond any real logit, yet differences of two bounded logits stay finite


def _elementwise(function: Callable[[float], float], values: torch.Tensor) -> torch.Tensor:
    """``function`` (math.exp or math.log) applied to every element, as RowOps applies it."""
    flat = [function(value) for value in values.reshape(-1).tolist()]
    return torch.tensor(flat, dtype=torch.float64).reshape(values.shape)


def _ordered_sum(columns: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension, class by class in order (RowOps adds in the same order)."""
    total = columns[..., 0]
    for column in range(1, columns.shape[-1]):
        total = total + columns[..., column]
    return total


class TensorOps:
    """Rows of a batch as CPU tensors: logits [b, C], per-row values [b], class rows [b, C], windows [b, N, C]."""

    @staticmethod
    def _shifted_exp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, e, s): z = x − max x with ±inf clamped (so e = exp z <= 1 never overflows), e, and s = Σ e."""
        x = logits.double().clamp(-_LOGIT_BOUND, _LOGIT_BOUND)
        z = x - x.amax(dim=-1, keepdim=True)
        e = _elementwise(math.exp, z)
        return z, e, _ordered_sum(e)

    @staticmethod
    def probs(logits: torch.Tensor) -> torch.Tensor:
        _, e, total = TensorOps._shifted_exp(logits)
        return e / total[..., None]

    @staticmethod
    def entropy(logits: torch.Tensor) -> torch.Tensor:
        z, e, total = TensorOps._shifted_exp(logits)
        return _elementwise(math.log, total) - _ordered_sum(e * z) / total

    @staticmethod
    def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
        return TensorOps.entropy(logits) / math.log(logits.shape[-1])

    @staticmethod
    def probs_and_normalized_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs(logits), normalized_entropy(logits))``, which RowOps computes in one pass."""
        return TensorOps.probs(logits), TensorOps.normalized_entropy(logits)

    @staticmethod
    def max_prob(logits: torch.Tensor) -> torch.Tensor:
        return 1.0 / TensorOps._shifted_exp(logits)[2]

    @staticmethod
    def argmax(rows: torch.Tensor) -> torch.Tensor:
        return rows.argmax(dim=-1)

    @staticmethod
    def value(logits: torch.Tensor) -> torch.Tensor:
        """The prediction of a regression head (one output)."""
        return logits[:, 0].double()

    @staticmethod
    def take(rows: torch.Tensor, column: int) -> torch.Tensor:
        return rows[:, column]

    @staticmethod
    def where(condition: torch.Tensor, yes: object, no: object) -> torch.Tensor:
        return torch.where(condition, yes, no)

    @staticmethod
    def where_rows(condition: torch.Tensor, yes: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
        return torch.where(condition[:, None], yes, no)

    @staticmethod
    def constant(logits: torch.Tensor, flag: bool) -> torch.Tensor:
        return torch.full((logits.shape[0],), flag, dtype=torch.bool)

    @staticmethod
    def counters(batch_size: int, value: int = 0) -> torch.Tensor:
        return torch.full((batch_size,), value, dtype=torch.long)

    @staticmethod
    def values(batch_size: int, value: float) -> torch.Tensor:
        return torch.full((batch_size,), value, dtype=torch.float64)

    @staticmethod
    def zero_rows(batch_size: int, width: int) -> torch.Tensor:
        return torch.zeros(batch_size, width, dtype=torch.float64)

    @staticmethod
    def zeros_like(rows: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rows)

    @staticmethod
    def add_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    @staticmethod
    def log_mean_rows(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """log(total / count) per row, floored at log(1e-30): the log keeps argmax and softmax of the mean."""
        return _elementwise(math.log, (total / count.clamp(min=1)[:, None]).clamp(min=1e-30))

    @staticmethod
    def empty_window(batch_size: int, size: int, width: int) -> torch.Tensor:
        return torch.full((batch_size, size, width), math.nan, dtype=torch.float64)

    @staticmethod
    def push(window: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
        """The window (of ``size`` entries) with ``rows`` appended and its oldest entry dropped."""
        return torch.cat([window[:, 1:], rows[:, None]], dim=1)

    @staticmethod
    def start_class_window(window: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For c, the argmax of the window's first entry (the first of equal maxima), and 1 − p_c at every entry,
        summed over the other classes (no cancellation): (every entry below ``bound``, never rising, max − min)."""
        start_class = window[:, 0].argmax(dim=-1)
        is_start_class = torch.nn.functional.one_hot(start_class, window.shape[-1]).bool()[:, None, :]
        others = _ordered_sum(window.masked_fill(is_start_class, 0.0))
        return ((others < bound).all(dim=1), (others[:, 1:] <= others[:, :-1]).all(dim=1),
                others.amax(dim=1) - others.amin(dim=1))


class RowOps:
    """The one row of batch size 1 as Python floats: logits and class rows are lists, values are floats.

    Written for speed right after a layer, when the CPU's caches hold the layer's code and data and every distinct
    function, builtin or object a decision touches is a cache miss. So each measure is one loop of plain float
    arithmetic: no builtin calls (max, min, len, range), no temporary lists where a running total will do, and no
    cache of the last row's exponentials (keeping one costs more than computing the exponentials twice)."""

    @staticmethod
    def _top(logits: list[float]) -> tuple[float, list[float]]:
        """(max of the logits, the logits), with ±inf (fp16 overflow) clamped to ±_LOGIT_BOUND as TensorOps does. A
        NaN logit makes every measure NaN, as in TensorOps, whichever maximum is taken."""
        top = low = logits[0]
        for value in logits:
            if value > top:
                top = value
            elif value < low:
                low = value
        if -_LOGIT_BOUND < top < _LOGIT_BOUND and low > -_LOGIT_BOUND:
            return top, logits
        bounded = [min(max(value, -_LOGIT_BOUND), _LOGIT_BOUND) for value in logits]
        return max(bounded), bounded

    # The totals below add in class order, as TensorOps' _ordered_sum does (not sum(): it compensates from Python 3.12
    # on). They start at 0.0, and 0.0 + x is exactly x (0.0 + -0.0 is 0.0, which changes no result below).
    @staticmethod
    def probs(logits: list[float]) -> list[float]:
        top, logits = RowOps._top(logits)
        exponentials = [_exp(value - top) for value in logits]
        total = 0.0
        for exponential in exponentials:
            total += exponential
        return [exponential / total for exponential in exponentials]

    @staticmethod
    def entropy(logits: list[float]) -> float:
        top, logits = RowOps._top(logits)
        total = weighted = 0.0
        for value in logits:
            shifted = value - top
            exponential = _exp(shifted)
            total += exponential
            weighted += exponential * shifted
        return _log(total) - weighted / total

    @staticmethod
    def normalized_entropy(logits: list[float]) -> float:
        return RowOps.entropy(logits) / _log(len(logits))

    @staticmethod
    def probs_and_normalized_entropy(logits: list[float]) -> tuple[list[float], float]:
        # probs' and entropy's loops fused: the same operations in the same order, so the same numbers
        # RowOps._top's scan written out, and _top called only for ±inf or NaN: ELBERT runs this at every layer, right
        # after the layer, where a call and its tuple are cache misses
        top = low = logits[0]
        for value in logits:
            if value > top:
                top = value
            elif value < low:
                low = value
        if not (-_LOGIT_BOUND < top < _LOGIT_BOUND and low > -_LOGIT_BOUND):
            top, logits = RowOps._top(logits)
        probs = []
        total = weighted = 0.0
        for value in logits:
            shifted = value - top
            exponential = _exp(shifted)
            probs.append(exponential)
            total += exponential
            weighted += exponential * shifted
        index = 0
        for exponential in probs:  # divided in place: a comprehension is one more function call on Python 3.11
            probs[index] = exponential / total
            index += 1
        return probs, (_log(total) - weighted / total) / _log(index)

    @staticmethod
    def max_prob(logits: list[float]) -> float:
        top, logits = RowOps._top(logits)
        total = 0.0
        for value in logits:
            total += _exp(value - top)
        return 1.0 / total

    @staticmethod
    def argmax(row: list[float]) -> int:
        best, best_value, index = 0, row[0], 0  # the first of equal maxima, as torch.argmax
        for value in row:
            if value > best_value:
                best, best_value = index, value
            elif value != value:  # NaN: torch.argmax takes the first NaN as the maximum
                return index
            index += 1
        return best

    @staticmethod
    def value(logits: list[float]) -> float:
        return logits[0]

    @staticmethod
    def take(row: list[float], column: int) -> float:
        return row[column]

    @staticmethod
    def where(condition: bool, yes: object, no: object) -> object:
        return yes if condition else no

    where_rows = where

    @staticmethod
    def constant(logits: list[float], flag: bool) -> bool:
        return flag

    @staticmethod
    def counters(batch_size: int, value: int = 0) -> int:
        return value

    @staticmethod
    def values(batch_size: int, value: float) -> float:
        return value

    @staticmethod
    def zero_rows(batch_size: int, width: int) -> list[float]:
        return [0.0] * width

    @staticmethod
    def zeros_like(row: list[float]) -> list[float]:
        return [0.0] * len(row)

    @staticmethod
    def add_rows(a: list[float], b: list[float]) -> list[float]:
        return list(map(operator.add, a, b))  # map runs the loop in C: about half a comprehension's time

    @staticmethod
    def log_mean_rows(total: list[float], count: int) -> list[float]:
        if count < 1:
            count = 1
        # max(mean, 1e-30) as TensorOps clamps (a NaN mean stays NaN), without a call to max() per class
        return [_LOG_TINY if (mean := value / count) < 1e-30 else _log(mean) for value in total]

    @staticmethod
    def empty_window(batch_size: int, size: int, width: int) -> tuple:
        # ``size`` placeholders, as TensorOps' NaN rows: a rule reads a window only once it is full
        return (None,) * size

    @staticmethod
    def push(window: tuple, row: list[float], size: int) -> tuple:
        return window[1:] + (row,)

    @staticmethod
    def start_class_window(window: Sequence[list[float]], bound: float) -> tuple[bool, bool, float]:
        # one pass over the window (this runs at every layer of ELBERT): 1 − p_c of each entry as the other classes'
        # total in class order, as TensorOps adds (its masked-out class adds 0.0, which changes no total)
        start_class = RowOps.argmax(window[0])
        below = never_rising = True
        previous = highest = lowest = None
        for row in window:
            total, index = 0.0, 0
            for value in row:
                if index != start_class:
                    total += value
                index += 1
            if not total < bound:
                below = False
            if previous is None:
                highest = lowest = total
            elif not total <= previous:
                never_rising = False
            if total > highest:
                highest = total
            elif total < lowest:
                lowest = total
            elif total != total:  # NaN: max − min is NaN, as TensorOps' amax and amin give
                highest = total
            previous = total
        return below, never_rising, highest - lowest


_exp, _log = math.exp, math.log
_LOG_TINY = math.log(1e-30)


Ops = type[TensorOps] | type[RowOps]


# the public confidence measures, on tensors of logits [..., C] (float64 results)
def softmax(logits: torch.Tensor) -> torch.Tensor:
    return TensorOps.probs(logits)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension, overflow- and NaN-safe.

    H = log s − Σ e·z / s with z = x − max x, e = exp z, s = Σ e: exact for a uniform row (z = 0: H = log C), and
    a class whose probability underflows to 0 adds 0·z = 0, never 0·log 0 = NaN."""
    return TensorOps.entropy(logits)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy divided by ln C, in [0, 1]: comparable across tasks with different numbers of classes."""
    return TensorOps.normalized_entropy(logits)


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability, 1 / Σ exp(x − max x); a +inf logit (fp16 overflow) gives 1, not NaN."""
    return TensorOps.max_prob(logits)


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers (user mistakes raise UserInputError with the flag's meaning in the message)
# --------------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserInputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UserInputError(f"{name} must be >= {minimum}, got {value}")


def _check_float(
    name: str, value: object, low: float = 0.0, high: float = math.inf, high_inclusive: bool = True
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserInputError(f"{name} must be a number, got {value!r}")
    if math.isnan(value):
        raise UserInputError(f"{name} must be a number, got NaN")
    upper_ok = value <= high if high_inclusive else value < high
    if value < low or not upper_ok:
        bracket = "]" if high_inclusive else ")"
        raise UserInputError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def parse_list(flag: str, text: str | None, kind: type) -> list:
    """Parse a seed-style comma list such as ``--patience 3,4,5`` into typed values, with a clear error."""
    if text is None or str(text).strip() == "":
        return []
    values = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            if kind is int:
                number = float(item)
                if not number.is_integer():
                    raise ValueError
                values.append(int(number))
            else:
                values.append(kind(item))
        except ValueError:
            raise UserInputError(f"{flag}: {item!r} is not a valid {kind.__name__} (expected a comma list)") from None
    return values


# --------------------------------------------------------------------------------------------------------------------
# What a policy declares besides its rule
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyFlag:
    """One command-line flag of a policy: ``--patience 3,4,5`` sets the field ``patience`` to 3, 4 and 5 in turn.

    A flag of ``type`` bool is a switch (present: True). Otherwise ``sweep`` flags take the seeds' comma lists (several
    values sweep several settings) and the others one value; ``const`` is the value of a one-value flag given without
    one (``--pcee_ensemble`` alone), ``choices`` its allowed values."""

    flag: str
    field: str
    type: type
    help: str
    sweep: bool = True
    default: str | None = None
    const: str | None = None
    choices: tuple[str, ...] | None = None

    def parse(self, raw: object) -> list:
        """The flag's values as a list, from what argparse stored (empty when the flag is absent)."""
        if raw is None or raw is False:
            return []
        if self.type is bool:
            return [True]
        if self.sweep:
            return parse_list(self.flag, raw, self.type)
        return [self.type(raw)]


@dataclass(frozen=True)
class Knob:
    """The one field calibration moves: its range and whether raising it makes exits earlier (``faster_when``
    "higher") or later ("lower"). Integer knobs are scanned, continuous ones bisected."""

    field: str
    low: float
    high: float
    faster_when: str
    integer: bool = False


# --------------------------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------------------------

# grid points: 5 %, 10 %, ..., 100 % of a threshold's range; and 10 thresholds from 0.05 to 0.95
_FRACTIONS = np.linspace(0.0, 1.0, 21)[1:]
_SPREAD = np.linspace(0.05, 0.95, 10)


_WARNED_NEVER_EARLY: set[tuple[object, int]] = set()

POLICIES: dict[str, type[ExitPolicy]] = {}
"""Every policy class by name, in definition order; a subclass with a ``name`` registers itself."""


@dataclass(frozen=True)
class ExitPolicy:
    """Base class. A subclass sets ``name``, ``title``, ``flags``, implements ``step`` (and ``init_state`` if it
    keeps state), ``knob`` and ``default_grid``, and states its earliest exit."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # for tables and plots, e.g. "PABEE (patience)"
    supports_regression: ClassVar[bool] = False
    flags: ClassVar[tuple[PolicyFlag, ...]] = ()
    label_omits: ClassVar[dict[str, object]] = {}  # fields left out of the label at these (default) values

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            POLICIES[cls.name] = cls

    def __post_init__(self) -> None:
        self._validate_params()

    # ---- checks ------------------------------------------------------------------------------------------------------
    def _validate_params(self) -> None:
        """Checks that need no task information. Raises UserInputError."""

    def validate(self, num_labels: int, num_layers: int) -> None:
        """Checks against the task and the model. Raises UserInputError."""
        if num_labels == 1 and not self.supports_regression:
            raise UserInputError(
                f"policy '{self.name}' needs class probabilities and does not support regression tasks "
                f"(num_labels == 1); use 'pabee' with --regression_threshold or 'budget' instead"
            )
        earliest = self.earliest_exit()
        if earliest > num_layers:
            raise UserInputError(
                f"{self.label()} can first exit at layer {earliest}, but the model has only {num_layers} layers"
            )

    def _warn_if_never_early(self, num_layers: int) -> None:
        """Patience policies: a patience too long for the model is legal (PABEE's own sweep runs patience 3..8 on
        any depth) and simply means full depth, so it warns (once per setting and depth) instead of failing."""
        if self.earliest_exit() > num_layers and (self, num_layers) not in _WARNED_NEVER_EARLY:
            _WARNED_NEVER_EARLY.add((self, num_layers))
            logger.warning("%s can first exit at layer %d but the model has %d layers: every example runs to the "
                           "last layer", self.label(), self.earliest_exit(), num_layers)

    def earliest_exit(self) -> int:
        """The first (1-indexed) layer at which this policy can exit by its own rule."""
        return 1

    def first_read_layer(self) -> int:
        """The first (1-indexed) layer whose exit logits the rule reads. Early exit computes no exit head (and reads
        nothing from the device) below it; 1 for every rule that keeps state from the first layer on."""
        return 1

    # ---- naming ------------------------------------------------------------------------------------------------------
    def params(self) -> dict[str, object]:
        return asdict(self)

    def shown_params(self) -> list[tuple[str, object]]:
        """The (field, value) pairs a label shows: set ones, without the defaults ``label_omits`` leaves out."""
        shown = [(f.name, getattr(self, f.name)) for f in fields(self)]
        return [(name, value) for name, value in shown
                if value is not None and not (name in self.label_omits and value == self.label_omits[name])]

    def label(self) -> str:
        """Compact, stable text for tables and file names, e.g. ``pabee(patience=3)``."""
        return f"{self.name}({','.join(f'{name}={value}' for name, value in self.shown_params())})"

    def replace(self, **changes: object) -> ExitPolicy:
        """The same policy with some fields changed (validated like a new one)."""
        return type(self)(**{**self.params(), **changes})

    # ---- the rule ----------------------------------------------------------------------------------------------------
    def init_state(self, ops: Ops, batch_size: int, num_labels: int) -> State:
        return {}

    def step(self, ops: Ops, state: State, logits: object, layer: int) -> tuple[object, State]:
        """Decide for each row after ``layer`` (1-indexed), on the backend ``ops`` (TensorOps: logits [b, C];
        RowOps: one row of floats). Returns (exits, new state): whether each row exits now, and the state for the
        next layer."""
        raise NotImplementedError

    def answer(self, ops: Ops, state: State, logits: object, exits: object) -> object:
        """What each row answers if it leaves after this layer (at the last layer every row does), given the
        ``state`` and ``exits`` that :meth:`step` just returned: the layer's own logits unless a rule says otherwise.
        Asked only at a layer where some row leaves, so that a rule's answer (an ensemble's log-mean) costs nothing
        at the layers where every row runs on."""
        return logits

    # ---- flags, calibration, grids -----------------------------------------------------------------------------------
    @classmethod
    def flag_names(cls) -> str:
        """The policy's flags for error messages, e.g. ``--patience/--regression_threshold``."""
        return "/".join(flag.flag for flag in cls.flags)

    @classmethod
    def from_flag_values(cls, values: dict[str, list]) -> list[ExitPolicy]:
        """The settings a command line asks for, from each flag's parsed values (field -> list). By default the
        first flag turns the policy on and every flag with values takes part in a product of settings."""
        if not cls.flags or not values.get(cls.flags[0].field):
            return []
        given = {flag.field: values[flag.field] for flag in cls.flags if values.get(flag.field)}
        names = list(given)
        return [cls.from_flags_checked(**dict(zip(names, combo))) for combo in itertools.product(*given.values())]

    @classmethod
    def from_flags_checked(cls, **params: object) -> ExitPolicy:
        """``cls(**params)``, with a UserInputError naming the flags the bad value came from."""
        try:
            return cls(**params)
        except UserInputError as error:
            raise UserInputError(f"{cls.flag_names()}: {error}") from None

    def knob(self, num_layers: int, num_labels: int) -> Knob | None:
        """The field calibration moves for this setting (None: nothing to calibrate)."""
        return None

    @classmethod
    def default_grid(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        """Settings spanning the policy's range of speed-ups, for sweeps and plots ([] where it cannot apply)."""
        raise NotImplementedError(f"{cls.__name__} declares no default grid")

    @classmethod
    def calibration_templates(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        """Settings whose knob calibration moves when the user names none: by default the grid's first setting."""
        return cls.default_grid(num_layers, num_labels)[:1]


@dataclass(frozen=True)
class BudgetExit(ExitPolicy):
    """Static budget: every example exits at layer ``layer``. The baseline curve for every plot."""

    layer: int = 1
    name: ClassVar[str] = "budget"
    title: ClassVar[str] = "Budgeted exit (static layer)"
    supports_regression: ClassVar[bool] = True
    flags: ClassVar[tuple[PolicyFlag, ...]] = (
        PolicyFlag("--budget_layer", "layer", int, "static exit layers, list"),
    )

    def _validate_params(self) -> None:
        _check_int("budget layer", self.layer, 1)

    def earliest_exit(self) -> int:
        return self.layer

    def first_read_layer(self) -> int:
        return self.layer  # the layers below are run without their exits, as a model cut to ``layer`` would be

    def step(self, ops: Ops, state: State, logits: object, layer: int) -> tuple[object, State]:
        return ops.constant(logits, layer >= self.layer), state

    def knob(self, num_layers: int, num_labels: int) -> Knob:
        return Knob("layer", 1, num_layers, faster_when="lower", integer=True)

    @classmethod
    def default_grid(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        return [cls(layer=k) for k in range(1, num_layers + 1)]


@dataclass(frozen=True)
class PatienceExit(ExitPolicy):
    """PABEE. From layer 2 on, a counter goes up when this layer's argmax equals the previous layer's (regression:
    when |ŷ_i − ŷ_{i−1}| < ``regression_threshold``) and resets to 0 otherwise. Exits when the counter reaches
    ``patience``, so the earliest exit is layer ``patience + 1``. ``patience = 0`` runs the full model."""

    patience: int = 1
    regression_threshold: float | None = None
    name: ClassVar[str] = "pabee"
    title: ClassVar[str] = "PABEE (patience)"
    supports_regression: ClassVar[bool] = True
    flags: ClassVar[tuple[PolicyFlag, ...]] = (
        PolicyFlag("--patience", "patience", int, "PABEE patience list, e.g. 3,4,5 (0 = full depth)"),
        PolicyFlag("--regression_threshold", "regression_threshold", float,
                   "PABEE on regression: predictions 'agree' when closer than this (list allowed)"),
    )

    def _validate_params(self) -> None:
        _check_int("patience", self.patience, 0)
        if self.regression_threshold is not None:
            _check_float("regression_threshold", self.regression_threshold)

    def validate(self, num_labels: int, num_layers: int) -> None:
        if self.patience == 0:  # full depth: always valid
            return
        if num_labels == 1 and not self.regression_threshold:
            raise UserInputError(
                "pabee on a regression task needs --regression_threshold > 0: two predictions only 'agree' when "
                "they differ by less than it, so with 0 every example would run to the last layer"
            )
        self._warn_if_never_early(num_layers)

    def earliest_exit(self) -> int:
        return self.patience + 1 if self.patience > 0 else 1

    def init_state(self, ops: Ops, batch_size: int, num_labels: int) -> State:
        # classification compares argmaxes (the previous one is kept), regression compares values; the start values
        # (class -1, NaN) agree with nothing, so the counter starts at layer 2
        if num_labels == 1:
            return {"counter": ops.counters(batch_size), "previous": ops.values(batch_size, math.nan)}
        return {"counter": ops.counters(batch_size), "previous_class": ops.counters(batch_size, -1)}

    def step(self, ops: Ops, state: State, logits: object, layer: int) -> tuple[object, State]:
        if "previous" in state:  # regression, in float64, where the difference of two float32 predictions is exact
            current = ops.value(logits)
            agrees = abs(current - state["previous"]) < (self.regression_threshold or 0.0)
            new_state = {"previous": current}
        else:
            current = ops.argmax(logits)
            agrees = current == state["previous_class"]
            new_state = {"previous_class": current}
        counter = ops.where(agrees, state["counter"] + 1, 0)
        exits = (counter == self.patience) if self.patience > 0 else ops.constant(logits, False)
        return exits, {"counter": counter, **new_state}

    def knob(self, num_layers: int, num_labels: int) -> Knob:
        return Knob("patience", 1, max(num_layers - 1, 1), faster_when="lower", integer=True)

    @classmethod
    def default_grid(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        if num_labels == 1:
            thresholds = (0.05, 0.1, 0.2, 0.5)
            return [cls(patience=p, regression_threshold=t) for p in range(1, num_layers) for t in thresholds]
        return [cls(patience=p) for p in range(1, num_layers)]

    @classmethod
    def calibration_templates(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        # calibration scans the patience; on regression, once per threshold of the grid
        return [policy for policy in cls.default_grid(num_layers, num_labels) if policy.patience == 1]


@dataclass(frozen=True)
class EntropyExit(ExitPolicy):
    """DeeBERT. Exits at the first layer whose prediction entropy (nats, not normalised) is below ``threshold``.
    Layer L is never *tested* (its head answers anyway): DeeBERT's untrained L-th ramp bug cannot happen here."""

    threshold: float = 0.0
    name: ClassVar[str] = "deebert"
    title: ClassVar[str] = "DeeBERT (entropy)"
    flags: ClassVar[tuple[PolicyFlag, ...]] = (
        PolicyFlag("--early_exit_entropy", "threshold", float, "DeeBERT entropy thresholds (nats), list"),
    )

    def _validate_params(self) -> None:
        # a negative threshold never exits: DeeBERT's own default, --early_exit_entropy -1
        _check_float("entropy threshold", self.threshold, low=-math.inf)

    def step(self, ops: Ops, state: State, logits: object, layer: int) -> tuple[object, State]:
        return ops.entropy(logits) < self.threshold, state

    def knob(self, num_layers: int, num_labels: int) -> Knob:
        return Knob("threshold", 0.0, math.log(num_labels) + 1e-6, faster_when="higher")  # entropy <= ln C

    @classmethod
    def default_grid(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        if num_labels == 1:
            return []
        return [cls(threshold=round(float(f * math.log(num_labels)), 4)) for f in _FRACTIONS]


@dataclass(frozen=True)
class MaxProbExit(ExitPolicy):
    """Shallow-Deep. Exits at the first layer whose max softmax probability is >= ``threshold``."""

    threshold: float = 1.0
    name: ClassVar[str] = "maxprob"
    title: ClassVar[str] = "Max-prob (Shallow-Deep)"
    flags: ClassVar[tuple[PolicyFlag, ...]] = (
        PolicyFlag("--maxprob_threshold", "threshold", float, "Shallow-Deep max-probability thresholds"),
    )

    def _validate_params(self) -> None:
        _check_float("max-prob threshold", self.threshold, 0.0, 1.0)

    def step(self, ops: Ops, state: State, logits: object, layer: int) -> tuple[object, State]:
        return ops.max_prob(logits) >= self.threshold, state

    def knob(self, num_layers: int, num_labels: int) -> Knob:
        return Knob("threshold", 0.0, 1.0, faster_when="lower")

    @classmethod
    def default_grid(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        if num_labels == 1:
            return []
        floor = 1.0 / num_labels
        return [cls(threshold=round(float(1.0 - f * (1.0 - floor)), 4)) for f in _FRACTIONS[:-1]]


PCEE_ENSEMBLES = ("none", "pcee", "all", "streak")


@dataclass(frozen=True)
class PCEEExit(ExitPolicy):
    """PCEE-BERT (patient and confident), as ``BertModelWithPabeeV1.forward`` in michael-wzhu/PCEE-BERT
    (pabee/modeling_pabee_bert.py; its ``--ee_mechanism V1``). A counter goes up at every *confident* layer and resets
    at an unconfident one; the row exits when the counter reaches ``patience``, so the earliest exit is layer
    ``patience`` (one earlier than PABEE). Confidence is normalised entropy < ``tau`` (PCEE) or, if ``maxprob`` is
    given instead, max softmax >= ``maxprob`` (our variant: max-prob confidence, not in PCEE's code).
    ``patience = 0`` runs the full model and answers with the last layer (PCEE's code does not ensemble then).

    ``ensemble`` chooses the answer:

    * ``none``: the exit layer's own head (PCEE's ``--do_ensemble 0``);
    * ``pcee``: PCEE's ``--do_ensemble 1``: the mean of the probabilities in its list ``all_prev_logits_close``, which
      restarts with the current layer's probabilities whenever the counter is 0 (an unconfident layer) and grows by
      one per confident layer. So at an exit it holds the confident streak *and* the unconfident layer before it (the
      streak alone if it began at layer 1), and a row reaching layer L without exiting averages what the list holds;
    * ``all``: PCEE's ``--do_ensemble 2``: the mean of every layer's probabilities so far;
    * ``streak``: the mean over the confident streak only, answering with the last layer's head at L (our own
      variant; no published counterpart)."""

    patience: int = 1
    tau: float | None = None
    maxprob: float | None = None
    ensemble: str = "none"
    name: ClassVar[str] = "pcee"
    title: ClassVar[str] = "PCEE-BERT (patience + confidence)"
    label_omits: ClassVar[dict[str, object]] = {"ensemble": "none"}
    flags: ClassVar[tuple[PolicyFlag, ...]] = (
        PolicyFlag("--pcee_patience", "patience", int, "PCEE patience list"),
        PolicyFlag("--pcee_tau", "tau", float, "PCEE normalised-entropy thresholds τ (list)"),
        PolicyFlag("--pcee_maxprob", "maxprob", float,
                   "PCEE with max-probability confidence instead of τ (our variant), thresholds (list)"),
        PolicyFlag("--pcee_ensemble", "ensemble", str,
                   "PCEE's answer: none (the exit layer's head, default), pcee (PCEE's --do_ensemble 1; the flag "
                   "alone), all (--do_ensemble 2), streak (mean over the confident streak only)",
                   sweep=False, const="pcee", choices=PCEE_ENSEMBLES),
    )

    def _validate_params(self) -> None:
        _check_int("patience", self.patience, 0)
        if (self.tau is None) == (self.maxprob is None):
            raise UserInputError("pcee needs exactly one confidence threshold: tau (normalised entropy) or maxprob")
        if self.tau is not None:
            _check_float("pcee tau", self.tau, 0.0, 1.0)
        if self.maxprob is not None:
            _check_float("pcee maxprob", self.maxprob, 0.0, 1.0)
        if self.ensemble not in PCEE_ENSEMBLES:
            raise UserInputError(f"pcee ensemble must be one of {', '.join(PCEE_ENSEMBLES)}, got {self.ensemble!r}")

    def validate(self, num_labels: int, num_layers: int) -> None:
        if num_labels == 1:
            super().validate(num_labels, num_layers)  # raises: PCEE needs class probabilities
        self._warn_if_never_early(num_layers)

    def earliest_exit(self) -> int:
        return max(self.patience, 1)

    def init_state(self, ops: Ops, batch_size: int, num_labels: int) -> State:
        state = {"counter": ops.counters(batch_size)}
        if self.ensemble != "none":  # the summed probabilities of the ensemble's members, and how many there are
            state["member_probs"] = ops.zero_rows(batch_size, num_labels)
            state["members"] = ops.counters(batch_size)
        return state

    def step(self, ops: Ops, state: State, logits: object, layer: int) -> tuple[object, State]:
        if self.tau is not None:
            confident = ops.normalized_entropy(logits) < self.tau
        else:
            confident = ops.max_prob(logits) >= self.maxprob
        counter = ops.where(confident, state["counter"] + 1, 0)
        exits = (counter == self.patience) if self.patience > 0 else ops.constant(logits, False)
        if self.ensemble == "none":
            return exits, {"counter": counter}
        if self.patience == 0:
            return exits, {**state, "counter": counter}
        probs = ops.probs(logits)
        if self.ensemble == "pcee":  # the list restarts with this layer's probabilities at an unconfident layer
            member_probs = ops.where_rows(confident, ops.add_rows(state["member_probs"], probs), probs)
            members = ops.where(confident, state["members"] + 1, 1)
        elif self.ensemble == "all":
            member_probs, members = ops.add_rows(state["member_probs"], probs), state["members"] + 1
        else:  # streak: the confident layers only
            member_probs = ops.where_rows(confident, ops.add_rows(state["member_probs"], probs), ops.zeros_like(probs))
            members = counter
        return exits, {"counter": counter, "member_probs": member_probs, "members": members}

    def answer(self, ops: Ops, state: State, logits: object, exits: object) -> object:
        if self.ensemble == "none" or self.patience == 0:
            return logits
        mean = ops.log_mean_rows(state["member_probs"], state["members"])
        # streak: a row that reaches the last layer without exiting answers with that layer's head
        return ops.where_rows(exits, mean, logits) if self.ensemble == "streak" else mean

    @classmethod
    def from_flag_values(cls, values: dict[str, list]) -> list[ExitPolicy]:
        # τ and the max-probability threshold are alternatives: patience × (the τ list, then the max-prob list)
        patiences, taus, maxprobs = values.get("patience"), values.get("tau"), values.get("maxprob")
        if (taus or maxprobs) and not patiences:
            raise UserInputError("PCEE needs --pcee_patience together with --pcee_tau or --pcee_maxprob")
        if patiences and not (taus or maxprobs):
            raise UserInputError("--pcee_patience needs --pcee_tau (normalised entropy) or --pcee_maxprob")
        ensemble = (values.get("ensemble") or ["none"])[0]
        confidences = [{"tau": t} for t in taus or []] + [{"maxprob": m} for m in maxprobs or []]
        return [cls.from_flags_checked(patience=p, ensemble=ensemble, **confidence)
                for p in patiences or [] for confidence in confidences]

    def knob(self, num_layers: int, num_labels: int) -> Knob:
        if self.maxprob is not None:  # confident when max-prob >= knob
            return Knob("maxprob", 0.0, 1.0, faster_when="lower")
        return Knob("tau", 0.0, 1.0, faster_when="higher")

    @classmethod
    def default_grid(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        if num_labels == 1:
            return []
        return [cls(patience=p, tau=round(float(t), 3)) for p in range(1, min(num_layers, 4)) for t in _SPREAD]

    @classmethod
    def calibration_templates(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        # calibration bisects τ; the patience is chosen among these templates
        return [cls(patience=p, tau=0.5) for p in range(1, min(num_layers, 4))] if num_labels > 1 else []


ELBERT_CRITERIA = ("monotonic", "range", "same")


@dataclass(frozen=True)
class ELBERTExit(ExitPolicy):
    """ELBERT, as ``ExitLayer.lower_than_thres`` in shakeley/ELBERT (test_ver/modeling_albert.py).

    Stage 1 exits when the normalised entropy is below ``delta`` (its ``exit_thres``). Otherwise, from layer
    ``window`` on (its ``cnt_thres`` N), stage 2 looks at the window of the last N layers, i−N+1..i. The class c is
    fixed at the window *start* (its argmax there), and a layer of the window is on c's side when p_c > 0.5 +
    ``margin``. The row exits if:

    * ``same`` (its ``bias_1``): every layer of the window is on c's side;
    * ``monotonic`` (``bias_2``): the window start is on c's side and p_c never falls across the window (ties pass);
    * ``range`` (``bias_3``): every layer is on c's side and max − min of p_c over the window <= ``range_threshold``
      (its ``range_tmp``).

    For two classes this is the code's rule: it follows x = p(class 0) of the first sample, with the side set by
    x at the window start (> 0.5 + margin: class 0, x must not fall; < 0.5 − margin: class 1, x must not rise).
    For more classes it is our generalisation in the same spirit: p_c > 0.5 + margin means c holds most of the
    probability, so the c fixed at the start is still the prediction at every layer the rule accepts. Each row
    decides on its own (the code followed sample 0 of the batch). p_c is compared through the probability of the
    other classes, 1 − p_c, summed without cancellation, so that a confident window is judged on the numbers the
    code sees for class 1 (for class 0 the code's float32 p0 rounds to 1.0 beyond a logit gap of ~17, where ties
    then pass: the README lists this difference)."""

    delta: float = 0.0
    window: int = 2
    criterion: str = "monotonic"
    range_threshold: float | None = None
    margin: float = 0.0
    name: ClassVar[str] = "elbert"
    title: ClassVar[str] = "ELBERT (entropy + window)"
    label_omits: ClassVar[dict[str, object]] = {"margin": 0.0}
    flags: ClassVar[tuple[PolicyFlag, ...]] = (
        PolicyFlag("--elbert_delta", "delta", float, "ELBERT stage-1 normalised-entropy thresholds δ"),
        PolicyFlag("--elbert_window", "window", int, "ELBERT window sizes N (list)", default="2"),
        PolicyFlag("--elbert_criterion", "criterion", str,
                   "monotonic (ELBERT's bias_2), range (bias_3) or same (bias_1); list", default="monotonic"),
        PolicyFlag("--elbert_range", "range_threshold", float, "ELBERT 'range' criterion threshold (range_tmp)"),
        PolicyFlag("--elbert_margin", "margin", float,
                   "ELBERT margin m: a window layer counts for class c when p_c > 0.5 + m (list)", default="0"),
    )

    def _validate_params(self) -> None:
        _check_float("elbert delta", self.delta, 0.0, 1.0)
        _check_int("elbert window", self.window, 1)
        _check_float("elbert margin", self.margin, 0.0, 0.5)
        if self.criterion not in ELBERT_CRITERIA:
            choices = ", ".join(ELBERT_CRITERIA)
            raise UserInputError(f"elbert criterion must be one of {choices}, got {self.criterion!r}")
        if self.criterion == "range":
            if self.range_threshold is None:
                raise UserInputError("elbert criterion 'range' needs a range threshold (--elbert_range)")
            _check_float("elbert range threshold", self.range_threshold, 0.0, 1.0)

    def init_state(self, ops: Ops, batch_size: int, num_labels: int) -> State:
        return {"window": ops.empty_window(batch_size, self.window, num_labels)}

    def step(self, ops: Ops, state: State, logits: object, layer: int) -> tuple[object, State]:
        probs, normalized_entropy = ops.probs_and_normalized_entropy(logits)
        window = ops.push(state["window"], probs, self.window)
        exits = normalized_entropy < self.delta
        if layer >= self.window:
            # c is the argmax at the window's start; a layer is on c's side when p_c > 0.5 + margin, i.e. when
            # 1 − p_c < 0.5 − margin. Monotonic asks that the start be on c's side and p_c never fall, which is
            # every layer on c's side and p_c never falling
            on_side, never_falls, spread = ops.start_class_window(window, 0.5 - self.margin)
            if self.criterion == "same":
                window_ok = on_side
            elif self.criterion == "monotonic":
                window_ok = on_side & never_falls
            else:
                window_ok = on_side & (spread <= self.range_threshold)
            exits = exits | window_ok
        return exits, {"window": window}

    @classmethod
    def from_flag_values(cls, values: dict[str, list]) -> list[ExitPolicy]:
        # the range threshold belongs to the 'range' criterion only: δ × N × margin × (criterion, its thresholds)
        ranges = values.get("range_threshold") or [None]
        if ranges != [None] and values.get("delta") and "range" not in (values.get("criterion") or []):
            raise UserInputError("--elbert_range is the 'range' criterion's threshold: add range to --elbert_criterion")
        return [
            cls.from_flags_checked(delta=delta, window=window, criterion=criterion, range_threshold=range_threshold,
                                   margin=margin)
            for delta in values.get("delta") or []
            for window in values.get("window") or []
            for margin in values.get("margin") or [0.0]
            for criterion in values.get("criterion") or []
            for range_threshold in (ranges if criterion == "range" else [None])
        ]

    def knob(self, num_layers: int, num_labels: int) -> Knob:
        return Knob("delta", 0.0, 1.0, faster_when="higher")

    @classmethod
    def default_grid(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        if num_labels == 1:
            return []
        return [cls(delta=round(float(d), 3), window=w) for w in (2, 3) if w <= num_layers for d in _SPREAD]

    @classmethod
    def calibration_templates(cls, num_layers: int, num_labels: int) -> list[ExitPolicy]:
        # calibration bisects δ; the window is chosen among these templates
        return [cls(delta=0.5, window=w) for w in (2, 3) if w <= num_layers] if num_labels > 1 else []


def compact_state(state: State, keep: torch.Tensor) -> State:
    """Keep only the rows in ``keep`` (a bool mask over the current batch) of every per-sample tensor."""
    return {key: value[keep] for key, value in state.items()}


def make_policy(name: str, **params: object) -> ExitPolicy:
    """Build a policy by name, with UserInputError for an unknown name or parameter."""
    if name not in POLICIES:
        raise UserInputError(f"unknown exit policy {name!r}; choose from {', '.join(POLICIES)}")
    cls = POLICIES[name]
    try:
        return cls(**params)
    except TypeError as error:
        raise UserInputError(f"bad parameters for policy {name!r}: {error}") from None


# --------------------------------------------------------------------------------------------------------------------
# The tracker: the one place where decisions are applied, online and offline
# --------------------------------------------------------------------------------------------------------------------


class ExitTracker:
    """Applies ``policy`` layer by layer to a batch whose exited rows leave it.

    Call :meth:`update` once per layer with the logits of the rows still running (in the order of ``active``: a
    tensor, or a numpy array, which is host memory; ONNX Runtime's pass gives those). It
    returns the bool mask of rows that keep running, or ``None`` when no row exited (so the caller skips the
    compaction). When :attr:`done`, :attr:`exit_layer` (1-indexed, per original row) and :attr:`answer` hold the
    results.

    The decision runs on the host: the logits are read from the device once per layer, which is the one
    device-to-host transfer (and the one synchronisation) per layer of early exit. A batch of one row is decided on
    Python floats (:class:`RowOps`): one ``tolist()`` and a few float operations. A larger batch is decided
    on CPU tensors (:class:`TensorOps`), row by row in effect. Both run the policy's one rule, with the same numbers.

    ``numpy``: when done, :attr:`exit_layer` and :attr:`answer` are numpy arrays instead of torch tensors (same
    values), for a caller that answers in numpy (ONNX Runtime given numpy inputs). One row's are made as numpy arrays,
    so that such a call makes no torch tensor; a batch is decided on torch tensors and its results converted once.
    """

    def __init__(self, policy: ExitPolicy, batch_size: int, num_layers: int, numpy: bool = False) -> None:
        self.policy = policy
        self.numpy = numpy
        self.num_layers = num_layers
        # the loop runs layers below this one without their exit heads and does not call update() there
        self.first_read_layer = min(policy.first_read_layer(), num_layers)
        self.one_row = batch_size == 1
        if self.one_row:
            # shared constants until the row exits, then fresh tensors: batch-size-1 early exit makes a tracker per
            # input, right after a pass of layers, where every tensor construction is slow (cold caches)
            self.active, self.exit_layer = _ONE_ROW, _ONE_ROW_NOT_EXITED
        else:
            self.active = torch.arange(batch_size)
            self.exit_layer = torch.zeros(batch_size, dtype=torch.long)
        self.answer: torch.Tensor | np.ndarray | None = None
        self.state: State | None = None
        self._running = batch_size

    @property
    def done(self) -> bool:
        return self._running == 0

    def update(self, logits: torch.Tensor | np.ndarray, layer: int) -> torch.Tensor | None:
        if self.one_row:  # here, not in a method of its own: batch size 1 pays every call right after a layer
            # the exit logits [1, C] as Python floats: the one device-to-host transfer (and synchronisation) of the
            # layer
            row = logits.tolist()[0]
            if self.state is None:
                self.state = self.policy.init_state(RowOps, 1, len(row))
            exits, self.state = self.policy.step(RowOps, self.state, row, layer)
            if not (exits or layer >= self.num_layers):
                return None
            # made by numpy (and wrapped for torch): right after a layer's run (cold caches) torch.from_numpy costs
            # less than torch.full / torch.tensor, and batch size 1 pays this per input (the same values: both round
            # the Python floats to float32 to nearest)
            exit_layer = np.array([layer], dtype=np.int64)
            answer = np.array([self.policy.answer(RowOps, self.state, row, exits)], dtype=np.float32)
            if self.numpy:
                self.exit_layer, self.answer = exit_layer, answer
            else:
                self.exit_layer, self.answer = torch.from_numpy(exit_layer), torch.from_numpy(answer)
            self.active = _NO_ROWS
            self._running = 0
            return _NO_ROW_LEFT
        return self._update_batch(logits, layer)

    def _update_batch(self, logits: torch.Tensor | np.ndarray, layer: int) -> torch.Tensor | None:
        # This runs after every layer, so it is kept to few tensor operations: one copy to the host, one host read
        # of the number of exits, and no compaction when nobody or everybody leaves.
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        elif logits.requires_grad or not logits.is_cpu:
            logits = logits.detach().cpu()
        if self.state is None:
            self.state = self.policy.init_state(TensorOps, logits.shape[0], logits.shape[-1])
            self.answer = torch.empty(self.active.numel(), logits.shape[-1])
        exits, self.state = self.policy.step(TensorOps, self.state, logits, layer)
        running = self.active.numel()
        if layer >= self.num_layers:  # everyone still running exits at the last layer, with the policy's answer there
            num_exits = running
        else:
            num_exits = int(exits.sum())
        if num_exits == 0:
            return None
        answer = self.policy.answer(TensorOps, self.state, logits, exits)
        if num_exits == running:  # everyone left: nothing to compact
            self.exit_layer.index_fill_(0, self.active, layer)
            self.answer.index_copy_(0, self.active, answer.float())
            if self.numpy:  # (the one place a batch finishes: every row left by now)
                self.exit_layer, self.answer = self.exit_layer.numpy(), self.answer.numpy()
            self.active = self.active[:0]
            self.state = {key: value[:0] for key, value in self.state.items()}
            self._running = 0
            return torch.zeros(running, dtype=torch.bool)
        leaving = self.active[exits]
        self.exit_layer[leaving] = layer
        self.answer[leaving] = answer[exits].float()
        keep = ~exits
        self.active = self.active[keep]
        self.state = compact_state(self.state, keep)
        self._running = self.active.numel()
        return keep


# a one-row tracker's tensors before its row exits, shared (never written in place: they are only ever replaced)
_ONE_ROW = torch.zeros(1, dtype=torch.long)  # active: row 0
_ONE_ROW_NOT_EXITED = torch.zeros(1, dtype=torch.long)  # exit_layer: 0 until the row exits
_NO_ROWS = torch.zeros(0, dtype=torch.long)  # active once it has exited
_NO_ROW_LEFT = torch.zeros(1, dtype=torch.bool)


@dataclass
class ReplayResult:
    exit_layer: torch.Tensor  # [N] long, 1-indexed
    answer: torch.Tensor  # [N, C] float32 logits (or log-probabilities for an ensemble)


def replay(policy: ExitPolicy, layer_logits: torch.Tensor) -> ReplayResult:
    """Score ``policy`` offline from cached per-layer logits ``[N, L, C]`` with the same tracker as real early exit."""
    if layer_logits.dim() != 3:
        raise ValueError(f"layer_logits must be [N, L, C], got shape {tuple(layer_logits.shape)}")
    layer_logits = torch.as_tensor(layer_logits).cpu()
    num_examples, num_layers, _ = layer_logits.shape
    tracker = ExitTracker(policy, num_examples, num_layers)
    for depth in range(tracker.first_read_layer - 1, num_layers):
        tracker.update(layer_logits[tracker.active, depth], depth + 1)
        if tracker.done:
            break
    return ReplayResult(exit_layer=tracker.exit_layer, answer=tracker.answer)
