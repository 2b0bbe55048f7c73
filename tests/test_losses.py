"""The Lovasz-softmax loss: a hand computation, its meaning (1 - IoU on hard predictions), and a
finite gradient where classes are absent and pixels ignored."""
import math

import pytest
import torch

from losses import LOSSES, LovaszLoss, lovasz_softmax, make_loss
from metrics import ConfusionMatrix


def test_lovasz_equals_a_hand_computation():
    # 3 pixels, 2 classes; class-1 probabilities 0.9, 0.4, 0.2 and truth 1, 1, 0
    p1 = torch.tensor([0.9, 0.4, 0.2])
    probs = torch.stack([1 - p1, p1]).view(1, 2, 1, 3)
    target = torch.tensor([1, 1, 0]).view(1, 1, 3)
    # class 1: errors 0.1, 0.6, 0.2 -> sorted 0.6 (fg), 0.2 (bg), 0.1 (fg); Jaccard losses of the
    # growing sets 1-1/2, 1-1/3, 1-0/3 -> increments 1/2, 1/6, 1/3 -> 0.3 + 0.2/6 + 0.1/3
    class1 = 0.6 / 2 + 0.2 / 6 + 0.1 / 3
    # class 0: errors 0.1, 0.6, 0.2 -> sorted 0.6 (bg), 0.2 (fg), 0.1 (bg); Jaccard losses 1-0/2... :
    # intersections 1, 0, 0 over unions 2, 2, 3 -> 1/2, 1, 1 -> increments 1/2, 1/2, 0
    class0 = 0.6 / 2 + 0.2 / 2
    assert lovasz_softmax(probs, target).item() == pytest.approx((class0 + class1) / 2, abs=1e-6)


def test_lovasz_on_hard_predictions_is_one_minus_the_iou_of_the_present_classes():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 6, 7), generator=g)
    target[target == 3] = 1  # class 3 absent from the truth
    pred = torch.randint(0, 4, (2, 6, 7), generator=g)
    probs = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    iou = ConfusionMatrix(4).metrics_of(torch.bincount((target * 4 + pred).reshape(-1), minlength=16).view(4, 4))
    present = [0, 1, 2]
    expected = sum(1 - iou["per_class_iou"][name] for name in ("unlabeled", "paved-area", "dirt")) / len(present)
    assert lovasz_softmax(probs, target).item() == pytest.approx(expected, abs=1e-6)


def test_lovasz_gradient_is_finite_with_absent_classes_and_ignored_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8), generator=g) * 2  # classes 0 and 2 only
    target[:, :3] = 255
    for name in ("lovasz", "ce+lovasz"):
        logits.grad = None
        loss = make_loss(name)(logits, target)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()
        assert logits.grad[:, :, :3].abs().max() == 0  # ignored pixels take no part
    everything_ignored = torch.full((2, 8, 8), 255)
    loss = LovaszLoss()(logits, everything_ignored)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()
    assert {"lovasz", "ce+lovasz"} <= set(LOSSES)
