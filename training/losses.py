"""Segmentation loss: soft Dice plus cross-entropy, both ignoring unlabelled pixels."""

import torch
import torch.nn.functional as F
from torch import nn

from biopsy.geojson import IGNORE_INDEX


class DiceCrossEntropyLoss(nn.Module):
    """``dice_weight * (1 - mean soft Dice) + ce_weight * cross-entropy``.

    Dice is computed over the whole batch per class (nnU-Net's batch Dice) with a smoothing of 1
    pixel, so a class absent from both truth and prediction scores 1; pixels labelled
    ``ignore_index`` count in neither term.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 class_weights: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.dice_weight, self.ce_weight, self.ignore_index = dice_weight, ce_weight, ignore_index
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = self.ce_weight * cross_entropy(logits, target, self.class_weights, self.ignore_index)
        if self.dice_weight:
            loss = loss + self.dice_weight * (1 - soft_dice(logits, target, self.ignore_index).mean())
        return loss


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None,
                  ignore_index: int) -> torch.Tensor:
    """``F.cross_entropy``'s weighted mean over labelled pixels, summed without atomics so that
    CUDA gives the same value on every run (its 2-D mean reduction does not); 0 when no pixel
    is labelled."""
    pixel_loss = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index,
                                 reduction="none")  # 0 at ignored pixels
    valid = target != ignore_index
    weights = (valid.float() if class_weights is None
               else class_weights[target.where(valid, 0)] * valid)
    return pixel_loss.sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-class soft Dice (C,) of softmax(logits) (N, C, H, W) against labels (N, H, W)."""
    valid = (target != ignore_index).unsqueeze(1)
    probabilities = logits.softmax(dim=1) * valid
    one_hot = F.one_hot(target.where(valid.squeeze(1), 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    return (2 * intersection + 1) / (total + 1)
