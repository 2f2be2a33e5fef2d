"""create_loss: CE or BCE (timm) for hard or soft targets; hard_labels for the train top-1."""

from __future__ import annotations

import pytest
import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from trainer.loss import create_loss, hard_labels

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
LABELS = torch.tensor([0, 2])


def test_ce_with_hard_targets_is_torch_cross_entropy_with_smoothing():
    loss = create_loss("ce", 0.1, 0.0, soft_targets=False)
    assert torch.allclose(loss(LOGITS, LABELS), torch.nn.functional.cross_entropy(LOGITS, LABELS, label_smoothing=0.1))


def test_ce_with_soft_targets_is_soft_target_cross_entropy():
    loss = create_loss("ce", 0.1, 0.0, soft_targets=True)
    assert isinstance(loss, SoftTargetCrossEntropy)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    expected = -(soft * LOGITS.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(loss(LOGITS, soft), expected)


def test_bce_smooths_index_targets_and_applies_the_threshold():
    loss = create_loss("bce", 0.1, 0.2, soft_targets=False)
    assert isinstance(loss, BinaryCrossEntropy) and loss.target_threshold == 0.2 and loss.smoothing == 0.1
    # Smoothed one-hot (0.9 + 0.1/3 on, 0.1/3 off), then thresholded at 0.2: exactly one-hot.
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        LOGITS, torch.nn.functional.one_hot(LABELS, 3).float()
    )
    assert torch.allclose(loss(LOGITS, LABELS), expected)


def test_bce_with_soft_targets_leaves_smoothing_to_the_mixer():
    loss = create_loss("bce", 0.1, 0.0, soft_targets=True)
    assert loss.smoothing == 0.0 and loss.target_threshold is None
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(loss(LOGITS, soft), torch.nn.functional.binary_cross_entropy_with_logits(LOGITS, soft))


@pytest.mark.parametrize("name", ["ce", "bce"])
def test_a_zero_weighted_stand_in_adds_no_gradient(name):
    logits = LOGITS.clone().requires_grad_(True)
    (create_loss(name, 0.1, 0.0, soft_targets=False)(logits, LABELS) * 0.0).backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_hard_labels_takes_the_dominant_class_of_a_mix():
    assert torch.equal(hard_labels(LABELS), LABELS)
    assert hard_labels(torch.tensor([[0.3, 0.7, 0.0], [0.55, 0.0, 0.45]])).tolist() == [1, 0]
