"""BCE + Dice on logits: the recipe's value by hand, stable gradients, accepted target types."""
from __future__ import annotations

import pytest
import torch

from scsonet.losses import BceDiceLoss, DiceLoss


def by_hand(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> tuple[float, float]:
    """Pixel-mean BCE from its definition, and 1 - soft Dice per sample averaged over the batch."""
    p = torch.sigmoid(logits.double())
    y = targets.double()
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    dice = [(2 * (pi * yi).sum() + smooth) / (pi.sum() + yi.sum() + smooth) for pi, yi in zip(p, y)]
    return bce.item(), 1 - torch.stack(dice).mean().item()


def sample(seed: int = 0, shape=(3, 1, 16, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 3, (torch.rand(shape, generator=gen) < 0.3).float()


@pytest.mark.parametrize("bce_weight, dice_weight", [(1.0, 1.0), (0.3, 2.0)])
def test_bce_dice_equals_weighted_sum_by_hand(bce_weight, dice_weight):
    logits, targets = sample()
    bce, dice = by_hand(logits, targets)
    got = BceDiceLoss(bce_weight, dice_weight)(logits, targets)
    assert got.item() == pytest.approx(bce_weight * bce + dice_weight * dice, rel=1e-5)
    assert DiceLoss()(logits, targets).item() == pytest.approx(dice, rel=1e-5)


def test_dice_is_per_sample_not_pooled():
    # a sample with a tiny lesion weighs as much as one with a large lesion
    logits = torch.full((2, 1, 8, 8), -20.0)
    targets = torch.zeros(2, 1, 8, 8)
    targets[0, 0, :1, :1] = 1
    targets[1, 0] = 1
    logits[1] = 20.0
    per_sample = [1 - 1 / 2, 0.0]  # sample 0: (0 + 1) / (0 + 1 + 1); sample 1: perfect
    assert DiceLoss()(logits, targets).item() == pytest.approx(sum(per_sample) / 2, abs=1e-6)


def test_extreme_logits_give_finite_loss_and_gradients():
    logits, targets = sample(1)
    logits = (logits.sign() * 1e4).requires_grad_()  # saturated: sigmoid is exactly 0 or 1 in float32
    targets = 1 - (logits.detach() > 0).float()  # every pixel confidently wrong
    loss = BceDiceLoss()(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 1e3
    assert torch.isfinite(logits.grad).all()


def test_perfect_prediction_scores_near_zero_including_empty_masks():
    targets = torch.zeros(2, 1, 8, 8)
    targets[0, 0, 2:5, 2:5] = 1
    logits = (targets * 2 - 1) * 30
    assert BceDiceLoss()(logits, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_integer_and_bool_targets_match_float_and_half_logits_work():
    logits, targets = sample(2)
    loss = BceDiceLoss()
    expected = loss(logits, targets)
    assert loss(logits, targets.to(torch.uint8)).item() == pytest.approx(expected.item())
    assert loss(logits, targets.bool()).item() == pytest.approx(expected.item())
    half = loss(logits.half(), targets)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected.item(), rel=1e-2)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        BceDiceLoss()(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))
