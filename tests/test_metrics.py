"""compute_metrics against values worked out by hand on tiny arrays (never sklearn against sklearn)."""

import math
import warnings

import numpy as np
import pytest

from multiexit.data import TASKS, compute_metrics, get_task


def test_accuracy() -> None:
    # preds [0,1,1,0] vs labels [0,1,0,0]: positions 0, 1, 3 agree -> 3/4.
    assert compute_metrics(get_task("sst2"), np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == {"acc": 0.75}


def test_accuracy_multiclass() -> None:
    # 4 classes; positions 0, 2, 4 agree -> 3/5.
    result = compute_metrics(get_task("ag_news"), np.array([0, 1, 2, 3, 3]), np.array([0, 2, 2, 1, 3]))
    assert result == {"acc": pytest.approx(0.6)}


def test_mcc_symmetric_confusion_matrix() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    preds = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    # TP = 3 (idx 0, 1, 6), FN = 1 (idx 2), FP = 1 (idx 5), TN = 3 (idx 3, 4, 7)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4*4*4*4) = 8 / 16 = 0.5
    assert compute_metrics(get_task("cola"), preds, labels) == {"mcc": pytest.approx(0.5)}


def test_mcc_asymmetric_confusion_matrix() -> None:
    labels = np.array([1, 1, 0, 0])
    preds = np.array([1, 1, 1, 0])
    # TP = 2, FP = 1, TN = 1, FN = 0: MCC = (2*1 - 1*0) / sqrt(3 * 2 * 2 * 1) = 2 / sqrt(12) = 0.57735...
    assert compute_metrics(get_task("cola"), preds, labels)["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_mcc_perfectly_wrong_is_minus_one() -> None:
    # TP = TN = 0, FP = FN = 2: (0 - 4) / sqrt(2*2*2*2) = -1
    assert compute_metrics(get_task("cola"), np.array([1, 1, 0, 0]), np.array([0, 0, 1, 1]))["mcc"] == -1.0


@pytest.mark.parametrize(
    ("preds", "labels"),
    [([1, 1, 1, 1], [0, 1, 0, 1]), ([1, 1, 1], [1, 1, 1]), ([0, 0], [0, 0])],
    ids=["constant-prediction", "all-ones", "all-zeros"],
)
def test_mcc_constant_prediction_is_zero_without_warnings(preds: list[int], labels: list[int]) -> None:
    # One marginal of the confusion matrix is zero, so the denominator is 0: MCC is defined as 0.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics(get_task("cola"), np.array(preds), np.array(labels)) == {"mcc": 0.0}


def test_f1_and_accuracy_for_paraphrase_tasks() -> None:
    labels = np.array([1, 1, 1, 0, 0])
    preds = np.array([1, 0, 1, 1, 0])
    # TP = 2 (idx 0, 2), FN = 1 (idx 1), FP = 1 (idx 3): P = 2/3, R = 2/3, F1 = 2PR/(P+R) = 2/3
    # accuracy: idx 0, 2, 4 correct -> 3/5; acc_and_f1 = (3/5 + 2/3) / 2 = 19/30
    for name in ("mrpc", "qqp"):
        result = compute_metrics(get_task(name), preds, labels)
        assert result == {"acc": pytest.approx(0.6), "f1": pytest.approx(2 / 3), "acc_and_f1": pytest.approx(19 / 30)}


def test_f1_with_unequal_precision_and_recall() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0])
    preds = np.array([1, 0, 0, 0, 1, 0])
    # TP = 1, FP = 1, FN = 3: P = 1/2, R = 1/4, F1 = 2 * (1/2 * 1/4) / (1/2 + 1/4) = (1/4) / (3/4) = 1/3
    assert compute_metrics(get_task("mrpc"), preds, labels)["f1"] == pytest.approx(1 / 3)


def test_f1_without_positives_is_zero_without_warnings() -> None:
    # No positive label and no positive prediction: precision and recall are 0/0, reported as F1 = 0.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(get_task("mrpc"), np.array([0, 0, 0]), np.array([0, 0, 0]))
    assert result == {"acc": 1.0, "f1": 0.0, "acc_and_f1": 0.5}


def test_pearson_and_spearman_on_three_points() -> None:
    preds = np.array([1.0, 2.0, 3.0])
    labels = np.array([1.0, 3.0, 2.0])
    # Both means are 2; deviations dx = [-1, 0, 1], dy = [-1, 1, 0].
    # Pearson = sum(dx*dy) / sqrt(sum(dx^2) * sum(dy^2)) = (1 + 0 + 0) / sqrt(2 * 2) = 1/2.
    # The values are their own ranks, so Spearman is 1/2 as well; corr = (1/2 + 1/2) / 2.
    result = compute_metrics(get_task("stsb"), preds, labels)
    assert result == {"pearson": pytest.approx(0.5), "spearmanr": pytest.approx(0.5), "corr": pytest.approx(0.5)}


def test_spearman_uses_ranks_and_pearson_values() -> None:
    preds = np.array([0.1, 0.5, 4.0, 4.5])
    labels = np.array([1.0, 2.0, 1.5, 5.0])
    # Ranks: preds [1, 2, 3, 4], labels [1, 3, 2, 4]; d = [0, -1, 1, 0], sum d^2 = 2.
    # Spearman = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 12 / 60 = 0.8.
    # Pearson: mean preds = 2.275, dx = [-2.175, -1.775, 1.725, 2.225]; mean labels = 2.375,
    # dy = [-1.375, -0.375, -0.875, 2.625]; sum dx*dy = 2.990625 + 0.665625 - 1.509375 + 5.840625 = 7.9875,
    # sum dx^2 = 15.8075, sum dy^2 = 9.6875 -> r = 7.9875 / sqrt(15.8075 * 9.6875) = 0.64547...
    pearson = 7.9875 / math.sqrt(15.8075 * 9.6875)
    result = compute_metrics(get_task("stsb"), preds, labels)
    assert result["spearmanr"] == pytest.approx(0.8)
    assert result["pearson"] == pytest.approx(pearson)
    assert result["corr"] == pytest.approx((pearson + 0.8) / 2)


def test_constant_regression_prediction_gives_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(get_task("stsb"), np.array([2.5, 2.5, 2.5]), np.array([1.0, 3.0, 2.0]))
    assert all(math.isnan(v) for v in result.values())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_keys_and_plain_float_values(name: str) -> None:
    task = TASKS[name]
    expected_keys = {
        "cola": {"mcc"},
        "mrpc": {"acc", "f1", "acc_and_f1"},
        "qqp": {"acc", "f1", "acc_and_f1"},
        "stsb": {"pearson", "spearmanr", "corr"},
    }.get(name, {"acc"})
    if task.is_regression:
        preds, labels = np.array([0.5, 1.0, 4.0], dtype=np.float32), np.array([1.0, 2.0, 3.0], dtype=np.float32)
    else:
        preds, labels = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 1])
    result = compute_metrics(task, preds, labels)
    assert set(result) == expected_keys
    assert task.main_metric in result
    assert all(type(v) is float for v in result.values())


@pytest.mark.parametrize(
    ("preds", "labels"),
    [
        (np.zeros(3), np.zeros(4)),  # length mismatch
        (np.zeros((3, 2)), np.zeros(3)),  # logits instead of class indices
        (np.zeros(0), np.zeros(0)),  # nothing to score
    ],
    ids=["length-mismatch", "logits", "empty"],
)
def test_bad_shapes_raise_value_error(preds: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="1-D arrays of the same length|zero examples"):
        compute_metrics(get_task("sst2"), preds, labels)
