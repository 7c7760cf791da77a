"""Tests for repair_pl.metrics on hand-made tensors with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from repair_pl.metrics import ExactMatch, Generalization, Locality, RewriteAccuracy, exact_match, token_accuracy

# Four rows of four positions.
#   row 0: masked 0,1,2 -> matches 1,1,0          -> 2/3   (position 3 matches but is unmasked)
#   row 1: masked 1,2,3 -> matches 0,0,1          -> 1/3   (position 0 matches but is unmasked)
#   row 2: nothing masked                          -> NaN
#   row 3: masked 0,1   -> matches 1,1            -> 1     (positions 2,3 differ but are unmasked)
PREDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1], [9, 9, 9, 9]])
TARGET = torch.tensor([[1, 2, 0, 4], [5, 0, 0, 8], [2, 2, 2, 2], [9, 9, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
ACC = [2 / 3, 1 / 3, math.nan, 1.0]
EM = [0.0, 0.0, math.nan, 1.0]


def assert_rows(actual: torch.Tensor, expected: list[float]):
    assert actual.shape == (len(expected),)
    for got, want in zip(actual.tolist(), expected):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, abs=1e-7)


def test_token_accuracy_by_hand():
    assert_rows(token_accuracy(PREDS, TARGET, MASK), ACC)


def test_token_accuracy_int_mask_equals_bool_mask():
    assert_rows(token_accuracy(PREDS, TARGET, MASK.long()), ACC)


def test_exact_match_by_hand():
    assert_rows(exact_match(PREDS, TARGET, MASK), EM)


def test_single_position_rows():
    preds = torch.tensor([[3, 7], [3, 7]])
    target = torch.tensor([[3, 0], [0, 7]])
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    assert token_accuracy(preds, target, mask).tolist() == [1.0, 0.0]
    assert exact_match(preds, target, mask).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("fn", [token_accuracy, exact_match])
def test_shape_mismatch_is_value_error(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(PREDS, TARGET[:, :3], MASK[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        fn(PREDS, TARGET, MASK[:2])


@pytest.mark.parametrize("cls", [RewriteAccuracy, Generalization, Locality])
def test_row_mean_metrics_over_two_batches(cls):
    metric = cls()
    metric.update(PREDS[:2], TARGET[:2], MASK[:2])   # rows 0, 1
    metric.update(PREDS[2:], TARGET[2:], MASK[2:])   # rows 2 (empty, skipped), 3
    expected = (2 / 3 + 1 / 3 + 1.0) / 3             # mean over the 3 scored rows, not over 4
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    assert int(metric.rows) == 3


def test_row_mean_is_mean_over_rows_not_positions():
    # rows with different numbers of masked positions weigh the same
    preds = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    target = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    metric = RewriteAccuracy()
    metric.update(preds, target, mask)
    assert metric.compute().item() == pytest.approx((0.75 + 1.0) / 2)   # not 4/5


def test_exact_match_metric_over_two_batches():
    metric = ExactMatch()
    metric.update(PREDS[:2], TARGET[:2], MASK[:2])
    metric.update(PREDS[2:], TARGET[2:], MASK[2:])
    assert metric.compute().item() == pytest.approx(1 / 3, abs=1e-6)


def test_batch_split_does_not_matter():
    whole, split = RewriteAccuracy(), RewriteAccuracy()
    whole.update(PREDS, TARGET, MASK)
    for i in range(4):
        split.update(PREDS[i:i + 1], TARGET[i:i + 1], MASK[i:i + 1])
    assert whole.compute().item() == pytest.approx(split.compute().item(), abs=1e-7)


def test_only_empty_rows_compute_nan():
    metric = Locality()
    metric.update(PREDS[2:3], TARGET[2:3], MASK[2:3])
    assert math.isnan(metric.compute().item())


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_reset():
    metric = RewriteAccuracy()
    metric.update(PREDS, TARGET, MASK)
    assert metric.compute().item() == pytest.approx(2 / 3, abs=1e-6)
    metric.reset()
    assert int(metric.rows) == 0
    assert math.isnan(metric.compute().item())
    metric.update(PREDS[3:], TARGET[3:], MASK[3:])
    assert metric.compute().item() == 1.0


@pytest.mark.parametrize("cls", [RewriteAccuracy, Generalization, Locality, ExactMatch])
def test_metric_update_shape_mismatch(cls):
    with pytest.raises(ValueError, match="same shape"):
        cls().update(PREDS, TARGET[:3], MASK)
