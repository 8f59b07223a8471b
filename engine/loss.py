"""Task loss: Dice + binary cross-entropy on sigmoid outputs, each class its own binary problem.

Classes may overlap (REFUGE: the disc contains the cup), so a softmax over channels would be wrong. For
every image and class: Dice loss 1 - (2 sum(p t) + eps) / (sum p + sum t + eps) with p = sigmoid(logits),
averaged over images and classes, plus the mean binary cross-entropy over all pixels. These are the numbers
of monai's `DiceCELoss(sigmoid=True)` applied class by class and averaged (a test holds them equal),
computed in one pass over all classes and without importing monai, which costs a training process about
5 s and 100 MB.
"""
import torch.nn.functional as F
from torch import Tensor, nn

SMOOTH = 1e-5  # monai's smooth_nr and smooth_dr: an empty mask predicted empty scores Dice 1


class PerClassDiceCE(nn.Module):
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits and target B x C x H x W; target in [0, 1]."""
        probabilities = logits.sigmoid()
        spatial = tuple(range(2, logits.dim()))
        overlap = (probabilities * target).sum(spatial)
        total = probabilities.sum(spatial) + target.sum(spatial)
        dice_loss = 1 - (2 * overlap + SMOOTH) / (total + SMOOTH)
        return dice_loss.mean() + F.binary_cross_entropy_with_logits(logits, target)
