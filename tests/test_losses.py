"""The Lovasz-softmax loss: a hand computation, its meaning (1 - IoU on hard predictions), and a
finite gradient where classes are absent and pixels ignored."""
import math

import pytest
import torch

from losses import LOSSES, LovaszLoss, OhemCELoss, lovasz_softmax, make_loss
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


def test_ohem_averages_the_cross_entropy_of_the_hard_pixels_only():
    # 10 valid pixels, 2 classes; the true class's probability of each pixel:
    p_true = torch.tensor([0.95, 0.9, 0.8, 0.75, 0.72, 0.6, 0.5, 0.3, 0.2, 0.1])
    target = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    p1 = torch.where(target == 1, p_true, 1 - p_true)
    logits = torch.stack([(1 - p1).log(), p1.log()]).view(1, 2, 1, 10).clone().requires_grad_(True)
    target = target.view(1, 1, 10)
    # threshold 0.7: the 5 pixels under it are kept (more than the 10 % minimum)
    loss = OhemCELoss(thresh=0.7, min_kept=0.1)(logits, target)
    assert loss.item() == pytest.approx(-p_true[5:].log().mean().item(), abs=1e-5)
    loss.backward()
    assert logits.grad[..., :5].abs().max() == 0  # the easy pixels take no part
    # a minimum of 80 %: the 8 hardest pixels, although 3 of them are above the threshold
    assert OhemCELoss(thresh=0.7, min_kept=0.8)(logits, target).item() == pytest.approx(
        -p_true[2:].log().mean().item(), abs=1e-5)


def test_ohem_leaves_ignored_pixels_out_and_keeps_a_finite_gradient():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    target[:, :3] = 255
    loss = make_loss("ohem")(logits, target)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()
    assert logits.grad[:, :, :3].abs().max() == 0
    # a model right on every pixel: the hardest 10 % of the valid pixels, rounded up (2 of 15), never
    # of the ignored ones
    confident = torch.full((1, 3, 4, 5), -9.0)
    truth = torch.randint(0, 3, (1, 4, 5), generator=g)
    confident.scatter_(1, truth[:, None], 9.0)
    confident[0, 0, 0, 0] = confident[0, 1, 0, 0] = confident[0, 2, 0, 0] = 0.0  # uncertain, but ignored
    truth[0, 0] = 255  # 5 pixels ignored, 15 valid
    margin = torch.arange(15, dtype=torch.float32) / 10  # valid pixel i: true logit 9 - i/10
    valid = truth != 255
    confident.permute(0, 2, 3, 1)[valid] -= torch.nn.functional.one_hot(truth[valid], 3) * margin[:, None]
    per_pixel = torch.nn.functional.cross_entropy(confident, truth.masked_fill(~valid, 0), reduction="none")[valid]
    expected = per_pixel.sort(descending=True).values[:2].mean()
    assert OhemCELoss()(confident, truth).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(IndexError):  # a label outside the classes fails as in cross-entropy
        OhemCELoss()(confident, truth.masked_fill(truth == 1, 7))
    with pytest.raises(ValueError):  # class weights are refused, not dropped
        make_loss("ohem", weight=torch.ones(3))
    everything_ignored = torch.full((2, 8, 8), 255)
    logits.grad = None
    loss = OhemCELoss()(logits, everything_ignored)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()
    # with --ignore-index 0 the class-0 pixels are left out as well
    target0 = target.clone()
    logits.grad = None
    make_loss("ohem", ignore_index=0)(logits, target0).backward()
    assert logits.grad.permute(1, 0, 2, 3)[:, target0 == 0].abs().max() == 0
    assert "ohem" in LOSSES
