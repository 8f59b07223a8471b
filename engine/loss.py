"""Task loss: monai's DiceCE on sigmoid outputs, applied per class and averaged.

monai's DiceCELoss switches to softmax cross-entropy when there is more than one channel, which
is wrong for overlapping sigmoid classes (the disc contains the cup), so each class is scored as
its own one-channel problem (Dice + binary cross-entropy) instead.
"""
import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn


class PerClassDiceCE(nn.Module):
    def __init__(self):
        super().__init__()
        self.dice_ce = DiceCELoss(sigmoid=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        losses = [self.dice_ce(logits[:, c:c + 1], target[:, c:c + 1]) for c in range(logits.shape[1])]
        return torch.stack(losses).mean()
