"""Exit policies of PABEE, DeeBERT, PCEE-BERT, ELBERT and the two baselines, written once for every use.

Every policy is a small frozen dataclass with two pure methods:

* ``init_state(batch_size, num_labels)`` returns the per-sample state, a dict of tensors whose first dimension is
  the batch. Because the state is per sample, a batch can drop the rows that have exited (``compact_state``) and the
  rest carry on: this is what makes batched early exit give the same answers as batch size 1.
* ``step(state, logits, layer)`` looks at the logits of the layer just computed (``layer`` is 1-indexed) and returns
  which rows exit now, what they answer with, and the new state.

:class:`ExitTracker` drives a policy across layers and is the *only* place where exit decisions are applied. The
model's layer loop calls it online (one layer at a time, rows leaving the batch as they exit) and :func:`replay`
calls it offline over cached per-layer logits ``[N, L, C]``. Same code, same decisions; the tests prove it.

Conventions shared by all policies (the README has the table):

* Layers are 1-indexed; ``L`` is the number of layers. A row that reaches layer ``L`` exits there, answering with
  layer ``L``'s head, whatever the policy says (unless the policy itself exits at ``L`` with its own answer, e.g. a
  PCEE ensemble).
* Each policy answers with the exit layer's own head, except the optional PCEE ensemble.
* Entropy is in nats and computed from ``log_softmax`` in float32, so fp16 logits or huge logits cannot overflow
  and probabilities that underflow to 0 contribute 0, never NaN. "Normalised entropy" is ``H / ln C``.
* Policies that have no meaning for regression (``num_labels == 1``) refuse it in :meth:`ExitPolicy.validate`
  instead of silently exiting at layer 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch

from errors import UserInputError

State = dict[str, torch.Tensor]
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Confidence measures
# --------------------------------------------------------------------------------------------------------------------


_LOGIT_BOUND = 1e30  # far beyond any real logit, yet differences of two bounded logits stay finite in float32


def _finite_float(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with ±inf (fp16 overflow) clamped, so softmax gives 1/0 instead of inf − inf = NaN."""
    return logits.float().clamp(-_LOGIT_BOUND, _LOGIT_BOUND)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(_finite_float(logits), dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension, overflow- and NaN-safe (float32 result)."""
    log_probs = torch.log_softmax(_finite_float(logits), dim=-1)
    probs = log_probs.exp()
    # where p == 0 (log p may be -inf for -inf logits), p·log p is 0 by continuity
    plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    return -plogp.sum(dim=-1)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy divided by ln C, in [0, 1]: comparable across tasks with different numbers of classes."""
    num_classes = logits.shape[-1]
    return entropy(logits) / math.log(num_classes)


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability; a +inf logit (fp16 overflow) gives 1, not NaN."""
    return softmax(logits).amax(dim=-1)


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


# --------------------------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitPolicy:
    """Base class. Subclasses set ``name`` and implement ``init_state``, ``step`` and ``earliest_exit``."""

    name: ClassVar[str] = ""
    supports_regression: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self._validate_params()

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
        any depth) and simply means full depth, so it warns instead of failing."""
        if self.earliest_exit() > num_layers:
            logger.warning("%s can first exit at layer %d but the model has %d layers: every example runs to the "
                           "last layer", self.label(), self.earliest_exit(), num_layers)

    def earliest_exit(self) -> int:
        """The first (1-indexed) layer at which this policy can exit by its own rule."""
        return 1

    def params(self) -> dict[str, object]:
        return asdict(self)

    def label(self) -> str:
        """Compact, stable text for tables and file names, e.g. ``pabee(patience=3)``."""
        args = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) is not None)
        return f"{self.name}({args})"

    def init_state(self, batch_size: int, num_labels: int) -> State:
        return {}

    def step(self, state: State, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Decide for each row after ``layer`` (1-indexed). Returns (exits [b] bool, answer [b, C], new state)."""
        raise NotImplementedError


@dataclass(frozen=True)
class BudgetExit(ExitPolicy):
    """Static budget: every example exits at layer ``layer``. The baseline curve for every plot."""

    layer: int = 1
    name: ClassVar[str] = "budget"
    supports_regression: ClassVar[bool] = True

    def _validate_params(self) -> None:
        _check_int("budget layer", self.layer, 1)

    def earliest_exit(self) -> int:
        return self.layer

    def step(self, state: State, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, State]:
        exits = torch.full((logits.shape[0],), layer >= self.layer, dtype=torch.bool)
        return exits, logits, state


@dataclass(frozen=True)
class PatienceExit(ExitPolicy):
    """PABEE. From layer 2 on, a counter goes up when this layer's argmax equals the previous layer's (regression:
    when |ŷ_i − ŷ_{i−1}| < ``regression_threshold``) and resets to 0 otherwise. Exits when the counter reaches
    ``patience``, so the earliest exit is layer ``patience + 1``. ``patience = 0`` runs the full model."""

    patience: int = 1
    regression_threshold: float | None = None
    name: ClassVar[str] = "pabee"
    supports_regression: ClassVar[bool] = True

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

    def init_state(self, batch_size: int, num_labels: int) -> State:
        # classification compares argmaxes, so only the previous layer's argmax is kept (computed once per layer);
        # regression compares values, so the previous prediction is kept
        counter = torch.zeros(batch_size, dtype=torch.long)
        if num_labels == 1:
            return {"counter": counter, "previous": torch.full((batch_size, 1), math.nan)}
        return {"counter": counter, "previous_class": torch.full((batch_size,), -1)}

    def step(self, state: State, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, State]:
        logits = logits.float()
        if logits.shape[-1] == 1:
            if layer == 1:
                agrees = torch.zeros(logits.shape[0], dtype=torch.bool)
            else:
                agrees = (logits[:, 0] - state["previous"][:, 0]).abs() < (self.regression_threshold or 0.0)
            new_state = {"previous": logits}
        else:
            current_class = logits.argmax(dim=-1)
            if layer == 1:
                agrees = torch.zeros(logits.shape[0], dtype=torch.bool)
            else:
                agrees = current_class == state["previous_class"]
            new_state = {"previous_class": current_class}
        counter = torch.where(agrees, state["counter"] + 1, 0)
        exits = (counter == self.patience) if self.patience > 0 else torch.zeros_like(agrees)
        return exits, logits, {"counter": counter, **new_state}


@dataclass(frozen=True)
class EntropyExit(ExitPolicy):
    """DeeBERT. Exits at the first layer whose prediction entropy (nats, not normalised) is below ``threshold``.
    Layer L is never *tested* (its head answers anyway): DeeBERT's untrained L-th ramp bug cannot happen here."""

    threshold: float = 0.0
    name: ClassVar[str] = "deebert"

    def _validate_params(self) -> None:
        _check_float("entropy threshold", self.threshold)

    def step(self, state: State, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, State]:
        return entropy(logits) < self.threshold, logits, state


@dataclass(frozen=True)
class MaxProbExit(ExitPolicy):
    """Shallow-Deep. Exits at the first layer whose max softmax probability is >= ``threshold``."""

    threshold: float = 1.0
    name: ClassVar[str] = "maxprob"

    def _validate_params(self) -> None:
        _check_float("max-prob threshold", self.threshold, 0.0, 1.0)

    def step(self, state: State, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, State]:
        return max_prob(logits) >= self.threshold, logits, state


@dataclass(frozen=True)
class PCEEExit(ExitPolicy):
    """PCEE-BERT (patient and confident). A counter goes up at every *confident* layer and resets at an unconfident
    one; the row exits when the counter reaches ``patience``, so the earliest exit is layer ``patience`` (one earlier
    than PABEE). Confidence is normalised entropy < ``tau`` (PCEE) or, if ``maxprob`` is given instead, max softmax
    >= ``maxprob`` (PCEE-v1). ``patience = 0`` runs the full model. With ``ensemble`` the answer is the mean of the
    probabilities over the confident streak (PCEE's ablation); otherwise the exit layer's own head answers."""

    patience: int = 1
    tau: float | None = None
    maxprob: float | None = None
    ensemble: bool = False
    name: ClassVar[str] = "pcee"

    def _validate_params(self) -> None:
        _check_int("patience", self.patience, 0)
        if (self.tau is None) == (self.maxprob is None):
            raise UserInputError("pcee needs exactly one confidence threshold: tau (normalised entropy) or maxprob")
        if self.tau is not None:
            _check_float("pcee tau", self.tau, 0.0, 1.0)
        if self.maxprob is not None:
            _check_float("pcee maxprob", self.maxprob, 0.0, 1.0)

    def validate(self, num_labels: int, num_layers: int) -> None:
        if num_labels == 1:
            super().validate(num_labels, num_layers)  # raises: PCEE needs class probabilities
        self._warn_if_never_early(num_layers)

    def earliest_exit(self) -> int:
        return max(self.patience, 1)

    def label(self) -> str:
        return super().label() if self.ensemble else super().label().replace(",ensemble=False", "")

    def init_state(self, batch_size: int, num_labels: int) -> State:
        state = {"counter": torch.zeros(batch_size, dtype=torch.long)}
        if self.ensemble:  # the streak's summed probabilities only matter to the ensemble answer
            state["streak_probs"] = torch.zeros(batch_size, num_labels)
        return state

    def step(self, state: State, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, State]:
        if self.tau is not None:
            confident = normalized_entropy(logits) < self.tau
        else:
            confident = max_prob(logits) >= self.maxprob
        counter = torch.where(confident, state["counter"] + 1, 0)
        exits = (counter == self.patience) if self.patience > 0 else torch.zeros_like(confident)
        if not self.ensemble:
            return exits, logits, {"counter": counter}
        streak_probs = torch.where(confident[:, None], state["streak_probs"] + softmax(logits), 0.0)
        mean_probs = streak_probs / counter.clamp(min=1)[:, None]
        # log of the mean probability keeps argmax and softmax of the answer equal to the ensemble's
        answer = torch.where(exits[:, None], mean_probs.clamp(min=1e-30).log(), logits.float())
        return exits, answer, {"counter": counter, "streak_probs": streak_probs}


ELBERT_CRITERIA = ("monotonic", "range", "same")


@dataclass(frozen=True)
class ELBERTExit(ExitPolicy):
    """ELBERT. Stage 1 exits when the normalised entropy is below ``delta``. Otherwise, from layer ``window`` on,
    stage 2 looks at the last ``window`` layers (i−N+1..i) with c = the argmax at layer i, and exits if:

    * ``monotonic``: p_c rises strictly across the window;
    * ``range``: max − min of the max-probability over the window is below ``range_threshold``;
    * ``same``: the argmax is the same at every layer of the window.

    Works for any number of classes (ELBERT's code only tracked class 0 of the first sample)."""

    delta: float = 0.0
    window: int = 2
    criterion: str = "monotonic"
    range_threshold: float | None = None
    name: ClassVar[str] = "elbert"

    def _validate_params(self) -> None:
        _check_float("elbert delta", self.delta, 0.0, 1.0)
        _check_int("elbert window", self.window, 2)
        if self.criterion not in ELBERT_CRITERIA:
            choices = ", ".join(ELBERT_CRITERIA)
            raise UserInputError(f"elbert criterion must be one of {choices}, got {self.criterion!r}")
        if self.criterion == "range":
            if self.range_threshold is None:
                raise UserInputError("elbert criterion 'range' needs a range threshold (--elbert_range)")
            _check_float("elbert range threshold", self.range_threshold, 0.0, 1.0)

    def init_state(self, batch_size: int, num_labels: int) -> State:
        return {"window_probs": torch.full((batch_size, self.window, num_labels), math.nan)}

    def step(self, state: State, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, State]:
        probs = softmax(logits)
        window_probs = torch.cat([state["window_probs"][:, 1:], probs[:, None]], dim=1)
        exits = normalized_entropy(logits) < self.delta
        if layer >= self.window:
            current_class = probs.argmax(dim=-1)
            if self.criterion == "monotonic":
                p_c = window_probs.gather(2, current_class[:, None, None].expand(-1, self.window, 1))[..., 0]
                window_ok = (p_c[:, 1:] > p_c[:, :-1]).all(dim=1)
            elif self.criterion == "range":
                top = window_probs.amax(dim=2)
                window_ok = (top.amax(dim=1) - top.amin(dim=1)) < self.range_threshold
            else:
                window_ok = (window_probs.argmax(dim=2) == current_class[:, None]).all(dim=1)
            exits = exits | window_ok
        return exits, logits, {"window_probs": window_probs}


POLICIES: dict[str, type[ExitPolicy]] = {
    cls.name: cls for cls in (BudgetExit, PatienceExit, EntropyExit, MaxProbExit, PCEEExit, ELBERTExit)
}


def compact_state(state: State, keep: torch.Tensor) -> State:
    """Keep only the rows in ``keep`` (a bool mask over the current batch) of every per-sample tensor."""
    return {key: value[keep] for key, value in state.items()}


# --------------------------------------------------------------------------------------------------------------------
# The tracker: the one place where decisions are applied, online and offline
# --------------------------------------------------------------------------------------------------------------------


class ExitTracker:
    """Applies ``policy`` layer by layer to a batch whose exited rows leave it.

    Call :meth:`update` once per layer with the logits of the rows still running (in the order of ``active``). It
    returns the bool mask of rows that keep running, or ``None`` when no row exited (so the caller skips the
    compaction). When :attr:`done`, :attr:`exit_layer` (1-indexed, per original row) and :attr:`answer` hold the
    results. Decisions run on CPU in float32: the one device-to-host copy per layer is the exit decision itself.
    """

    def __init__(self, policy: ExitPolicy, batch_size: int, num_layers: int) -> None:
        self.policy = policy
        self.num_layers = num_layers
        self.active = torch.arange(batch_size)
        self.exit_layer = torch.zeros(batch_size, dtype=torch.long)
        self.answer: torch.Tensor | None = None
        self.state: State | None = None

    @property
    def done(self) -> bool:
        return self.active.numel() == 0

    def update(self, logits: torch.Tensor, layer: int) -> torch.Tensor | None:
        # This runs after every layer, so it is kept to few tensor operations (each costs microseconds on CPU, as
        # much as a small layer's share at batch size 1): no copy when the logits already are CPU float32, one
        # host read of the number of exits, and no compaction when nobody or everybody leaves.
        if logits.requires_grad or logits.dtype != torch.float32 or not logits.is_cpu:
            logits = logits.detach().float().cpu()
        if self.state is None:
            self.state = self.policy.init_state(logits.shape[0], logits.shape[-1])
            self.answer = torch.empty(self.active.numel(), logits.shape[-1])
        exits, answer, self.state = self.policy.step(self.state, logits, layer)
        running = self.active.numel()
        if layer >= self.num_layers:  # the last layer answers for everyone still running
            if answer is not logits:
                answer = torch.where(exits[:, None], answer, logits)
            num_exits = running
        else:
            num_exits = int(exits.sum())
        if num_exits == 0:
            return None
        if num_exits == running:  # everyone left (always so at batch size 1): nothing to compact
            self.exit_layer.index_fill_(0, self.active, layer)
            self.answer.index_copy_(0, self.active, answer.float())
            self.active = self.active[:0]
            self.state = {key: value[:0] for key, value in self.state.items()}
            return torch.zeros(running, dtype=torch.bool)
        leaving = self.active[exits]
        self.exit_layer[leaving] = layer
        self.answer[leaving] = answer[exits].float()
        keep = ~exits
        self.active = self.active[keep]
        self.state = compact_state(self.state, keep)
        return keep


@dataclass
class ReplayResult:
    exit_layer: torch.Tensor  # [N] long, 1-indexed
    answer: torch.Tensor  # [N, C] float32 logits (or log-probabilities for an ensemble)


def replay(policy: ExitPolicy, layer_logits: torch.Tensor) -> ReplayResult:
    """Score ``policy`` offline from cached per-layer logits ``[N, L, C]`` with the same tracker as real early exit."""
    if layer_logits.dim() != 3:
        raise ValueError(f"layer_logits must be [N, L, C], got shape {tuple(layer_logits.shape)}")
    layer_logits = torch.as_tensor(layer_logits).float().cpu()
    num_examples, num_layers, _ = layer_logits.shape
    tracker = ExitTracker(policy, num_examples, num_layers)
    for depth in range(num_layers):
        tracker.update(layer_logits[tracker.active, depth], depth + 1)
        if tracker.done:
            break
    return ReplayResult(exit_layer=tracker.exit_layer, answer=tracker.answer)


# --------------------------------------------------------------------------------------------------------------------
# Building policies from command-line values
# --------------------------------------------------------------------------------------------------------------------


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


def make_policy(name: str, **params: object) -> ExitPolicy:
    """Build a policy by name, with UserInputError for an unknown name or parameter."""
    if name not in POLICIES:
        raise UserInputError(f"unknown exit policy {name!r}; choose from {', '.join(POLICIES)}")
    cls = POLICIES[name]
    try:
        return cls(**params)
    except TypeError as error:
        raise UserInputError(f"bad parameters for policy {name!r}: {error}") from None
