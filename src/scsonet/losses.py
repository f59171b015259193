"""Losses for binary lesion segmentation, on logits (the model never applies a sigmoid).

The paper's recipe is BCE + soft Dice with weights 1:1 and smooth 1, the Dice taken per sample
and averaged over the batch. The published code applied BCE to sigmoid outputs; here BCE is
``binary_cross_entropy_with_logits`` (log-sum-exp form), which stays finite for any logit.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BceDiceLoss", "DiceLoss"]


def _check_pair(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targets as float32 with the logits' shape; bool and integer {0, 1} masks are accepted."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    return targets.to(torch.float32)


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p y) + s) / (sum p + sum y + s)`` per sample, ``p = sigmoid(logits)``, mean over the batch."""
    targets = _check_pair(logits, targets)
    # float32 even under autocast: fp16 sums over 65k pixels lose the small terms
    probs = torch.sigmoid(logits.float()).flatten(1)
    targets = targets.flatten(1)
    intersection = (probs * targets).sum(1)
    dice = (2.0 * intersection + smooth) / (probs.sum(1) + targets.sum(1) + smooth)
    return (1.0 - dice).mean()


class DiceLoss(nn.Module):
    """Soft Dice loss on logits, per sample then averaged over the batch.

    loss = 1 - (2 sum(p y) + smooth) / (sum(p) + sum(y) + smooth), p = sigmoid(logits)

    Args:
        smooth: added to numerator and denominator (1.0); an empty mask predicted empty scores 0 loss.

    Shape:
        logits (N, 1, H, W) float, targets the same shape (float, bool or integer {0, 1}) -> scalar.
    """

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(logits, targets, self.smooth)


class BceDiceLoss(nn.Module):
    """The paper's loss: weighted sum of pixel-mean BCE (on logits) and soft Dice.

    loss = bce_weight * BCE(logits, y) + dice_weight * (1 - Dice(sigmoid(logits), y))

    Args:
        bce_weight: weight of the binary cross-entropy term (1.0).
        dice_weight: weight of the soft Dice term (1.0).
        smooth: Dice smoothing constant (1.0).

    Shape:
        logits (N, 1, H, W) float, targets the same shape (float, bool or integer {0, 1}) -> scalar.

    Note:
        The published code took BCE on sigmoid probabilities, which saturates to log(0); this
        takes it on logits, computed in float32 whatever the autocast dtype.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = _check_pair(logits, targets)
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets)
        return self.bce_weight * bce + self.dice_weight * soft_dice_loss(logits, targets, self.smooth)
